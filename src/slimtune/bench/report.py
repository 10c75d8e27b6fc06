"""The grid's results: one tidy table (Parquet + CSV), a Markdown and a self-contained HTML report.

Quality is compared with random selection at the same budget, whose spread over seeds (mean ± standard
error) is the band a method must leave to have done anything; a method inside the band is reported as a tie.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import pandas as pd

from slimtune.bench.config import GridConfig
from slimtune.utils import atomic_write_bytes, atomic_write_text

#: Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = ("loss", "perplexity")


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def tidy_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame(rows).drop(columns=["key"], errors="ignore")
    # A cell that reuses another cell's cached work (LESS's warm-up and features, DELIFT's kernel blocks, a
    # seed-free selection) reports what it spent itself, next to nothing. A method's selection cost is what
    # computing it from scratch takes: the largest among its cells, charged to every one of them.
    by_method = table.groupby("method", dropna=False)
    table["selection_cost_seconds"] = by_method["selection_seconds"].transform("max")
    table["selection_cost_tokens"] = by_method["selection_tokens"].transform("max")
    table["total_seconds"] = table["selection_cost_seconds"] + table["training_seconds"]
    table["model_tokens"] = table["selection_cost_tokens"] + table["trained_tokens"]
    # Rows backpropagated against full data's: what a cell actually spent of the pool, whatever its budget
    # said (online methods round K up; a policy that sets its own budget ignores it).
    full_rows = table.loc[table["method"] == "full", "examples_trained"].mean()
    table["data_share"] = table["examples_trained"] / full_rows if full_rows else math.nan
    return table


def metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if "/" in c and pd.api.types.is_numeric_dtype(table[c])
            and table[c].notna().any()]


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error over seeds of every metric, per (method, budget)."""
    metrics = [*metric_columns(table), "data_share", "selection_cost_seconds", "total_seconds", "model_tokens",
               "corrupted_kept_share"]
    by_cell = table.groupby(["method", "budget"], dropna=False)
    mean, sem = by_cell[metrics].mean(), by_cell[metrics].sem(ddof=1).fillna(0.0)
    return mean.join(sem.add_suffix("_se")).join(by_cell["seed"].nunique().rename("seeds")).reset_index()


def verdicts(config: GridConfig, summary: pd.DataFrame) -> list[str]:
    """Plain-language lines: per metric and budget, the best method against random's band; a method without a
    budget (one that sets its own) is named with the share of the data it used, not ranked."""
    lines = []
    own = summary[summary["budget"].isna() & ~summary["method"].isin(["untrained", "full"])]
    for _, row in own.iterrows():
        lines.append(f"{row['method']} sets its own budget (it trained {row['data_share']:.0%} of the rows full "
                     f"data trained), so it is not ranked against random at any budget; its quality is in the "
                     f"table beside full data's.")
    trained = summary[summary["budget"].notna()]
    for metric in metric_columns(summary):
        if metric.endswith("_se"):
            continue
        sign = -1 if lower_is_better(metric) else 1
        for budget in config.budgets:
            at = trained[trained["budget"] == budget].dropna(subset=[metric])
            rand = at[at["method"] == "random"]
            others = at[at["method"] != "random"]
            if rand.empty or others.empty:
                continue
            r_mean, r_se = float(rand[metric].iloc[0]), float(rand[f"{metric}_se"].iloc[0])
            best = others.loc[(sign * others[metric]).idxmax()]
            delta = sign * (float(best[metric]) - r_mean)
            band = max(r_se, float(best[f"{metric}_se"]))
            # One seed has no standard error, and seeds that all gave random the same value (chrF of a few
            # greedy translations often does) show a metric too coarse to vary, not a band of width zero.
            no_spread = ("one seed" if int(rand["seeds"].iloc[0]) < 2 else
                         "random scored the same on every seed" if band == 0 else None)
            if no_spread:
                ahead = f"{best['method']} ahead of random by {delta:.4g}" if delta > 0 else \
                    f"nothing ahead of random (best {best['method']})"
                lines.append(f"{metric} at {budget:g}: {ahead} ({best[metric]:.4g} vs {r_mean:.4g}; {no_spread}, "
                             f"so no spread to judge it by).")
            elif delta > band:
                lines.append(f"{metric} at {budget:g}: **{best['method']}** beat random by {delta:.4g} "
                             f"({best[metric]:.4g} vs {r_mean:.4g} ± {r_se:.2g}).")
            else:
                lines.append(f"{metric} at {budget:g}: nothing beat random beyond its spread (best "
                             f"{best['method']} {best[metric]:.4g} vs random {r_mean:.4g} ± {r_se:.2g}).")
    return lines


#: What a targeted method must do in a ``per_target`` grid (issue 17's targets, reported as met or not).
MARGIN_IN_SE = 3.0
ORACLE_SHARE = 0.8
GRID_ORACLE = "oracle"


def targeted_table(config: GridConfig, summary: pd.DataFrame) -> pd.DataFrame:
    """Per target and budget, each method's held-out target loss against random's and the domain oracle's.

    ``margin_se``: random's mean loss minus the method's, in standard errors of that difference
    (sqrt(se_random^2 + se_method^2), over seeds); ``oracle_share``: the share of the oracle's gain over random
    that the method recovers, (random - method) / (random - oracle); ``vs_full``: the method's loss minus full
    data's (negative: the subset beat training on every row)."""
    rows = []
    full = summary[summary["method"] == "full"]
    for ev in config.evals:
        metric = f"{ev.task}/loss"
        if metric not in summary:
            continue
        full_loss = float(full[metric].iloc[0]) if not full.empty else math.nan
        for budget in config.budgets:
            at = summary[(summary["budget"] == budget)].dropna(subset=[metric]).set_index("method")
            if "random" not in at.index:
                continue
            r_mean, r_se = float(at.loc["random", metric]), float(at.loc["random", f"{metric}_se"])
            oracle_gain = r_mean - float(at.loc[GRID_ORACLE, metric]) if GRID_ORACLE in at.index else math.nan
            for method, row in at.iterrows():
                loss, se = float(row[metric]), float(row[f"{metric}_se"])
                spread = math.hypot(r_se, se)
                gain = r_mean - loss
                rows.append({"target": ev.task, "budget": budget, "method": method, "loss": loss, "se": se,
                             "gain_over_random": gain,
                             "margin_se": gain / spread if spread > 0 else math.nan,
                             "oracle_share": gain / oracle_gain if oracle_gain and oracle_gain > 0 else math.nan,
                             "vs_full": loss - full_loss})
    return pd.DataFrame(rows)


def targeted_verdicts(config: GridConfig, table: pd.DataFrame, judged: tuple[str, ...]) -> list[str]:
    """Whether each ``judged`` method beat random by more than :data:`MARGIN_IN_SE` standard errors on every
    target and budget, recovered :data:`ORACLE_SHARE` of the oracle's gain, and whether at the largest budget
    the best method reached full data's loss on each target."""
    lines = []
    if table.empty:
        return lines
    for method in judged:
        mine = table[table["method"] == method]
        if mine.empty:
            continue
        beat = mine["margin_se"] > MARGIN_IN_SE
        recovered = mine["oracle_share"] >= ORACLE_SHARE
        worst = mine.loc[mine["margin_se"].idxmin()] if mine["margin_se"].notna().any() else None
        lines.append(f"{method}: beat random by more than {MARGIN_IN_SE:g} s.e. on {int(beat.sum())} of "
                     f"{len(mine)} target-budget pairs" + (f" (weakest: {worst['target']} at {worst['budget']:g}, "
                     f"{worst['margin_se']:.1f} s.e.)" if worst is not None else "") +
                     f"; recovered >= {ORACLE_SHARE:.0%} of the oracle's gain on {int(recovered.sum())} of "
                     f"{len(mine)} (median {mine['oracle_share'].median():.0%}).")
    top = max(config.budgets)
    for target, group in table[(table["budget"] == top) & ~table["method"].isin(["random", GRID_ORACLE])
                               ].groupby("target"):
        best = group.loc[group["loss"].idxmin()]
        relation = "at or below" if best["vs_full"] <= 0 else "above"
        lines.append(f"{target} at {top:g}: the best method, {best['method']}, reached {best['loss']:.4g}, "
                     f"{relation} full data's {best['loss'] - best['vs_full']:.4g}.")
    return lines


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _figure_png(fig) -> str:
    return base64.b64encode(png_bytes(fig)).decode("ascii")


def figure_html(png_base64: str, caption: str) -> str:
    """A figure embedded in the page itself, so a report folder can be moved or mailed whole."""
    return (f'<figure><img src="data:image/png;base64,{png_base64}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_page(title: str, body: list[str]) -> str:
    """The one page style of slimtune's HTML reports (bench grids, selections, online runs)."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}figure{display:inline-block}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def plot_quality_vs_budget(summary: pd.DataFrame, metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    trained = summary[summary["budget"].notna()].sort_values("budget")
    for method, group in trained.groupby("method"):
        if method == "random":
            ax.fill_between(group["budget"], group[metric] - group[f"{metric}_se"],
                            group[metric] + group[f"{metric}_se"], color="grey", alpha=0.3, label="random ± s.e.")
            ax.plot(group["budget"], group[metric], color="grey", linestyle="--")
        else:
            ax.errorbar(group["budget"], group[metric], yerr=group[f"{metric}_se"], marker="o", label=method,
                        capsize=3)
    for method, style in (("full", "-"), ("untrained", ":")):
        ref = summary[summary["method"] == method][metric].dropna()
        if not ref.empty:
            ax.axhline(float(ref.iloc[0]), color="black", linestyle=style, linewidth=1, label=method)
    ax.set_xlabel("budget (share of the pool)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, loc="best")
    return _figure_png(fig)


def plot_quality_vs_compute(summary: pd.DataFrame, metric: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, group in summary.dropna(subset=[metric]).groupby("method"):
        ax.scatter(group["total_seconds"], group[metric], label=method)
    ax.set_xlabel("selection + training seconds")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, loc="best")
    return _figure_png(fig)


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_report(config: GridConfig, rows: list[dict[str, Any]], out: Path) -> Path:
    """Write results.parquet, results.csv, report.md and report.html into ``out``; return report.md."""
    table = tidy_table(rows)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(out / "results.parquet", buffer.getvalue())
    atomic_write_text(out / "results.csv", table.to_csv(index=False))
    summary = summarise(table)
    metrics = metric_columns(table)
    lines = verdicts(config, summary)
    cost_cols = ["method", "budget", "data_share", "selection_cost_seconds", "total_seconds", "model_tokens"]
    cost = summary[cost_cols + [m for m in metrics if m.endswith(("loss", "exact_match", "chrf", "accuracy"))]]
    corrupt = summary[["method", "budget", "corrupted_kept_share"]].dropna(subset=["corrupted_kept_share"])
    pool_share = table["corrupted_pool_share"].dropna()

    md = [f"# slimtune bench: {config.name}", "",
          f"Model `{config.model}`; pool of {int(table['pool_size'].iloc[0])} rows "
          f"({config.pool.describe()}); budgets {config.budgets}; "
          f"seeds {config.seeds}; config `{config.source}`.", ""]
    targeted = targeted_table(config, summary) if config.per_target else pd.DataFrame()
    if not targeted.empty:
        judged = tuple(m.label for m in config.methods if m.label != GRID_ORACLE and m.name != GRID_ORACLE)
        md += ["## Targets", "", "Each eval set is a separate target: targeted methods selected for it from its "
               f"{config.target_per_task} target examples. margin_se: random's loss minus the method's, in "
               "standard errors of the difference; oracle_share: the share of the domain oracle's gain over random "
               "recovered; vs_full: loss minus full data's.", "",
               *[f"- {line}" for line in targeted_verdicts(config, targeted, judged)], "",
               markdown_table(targeted), ""]
        atomic_write_text(out / "targets.csv", targeted.to_csv(index=False))
    md += ["## Summary", "", *[f"- {line}" for line in lines], "", "## Quality and cost (mean over seeds)", "",
           markdown_table(cost), ""]
    if not corrupt.empty:
        md += ["## Corrupted rows kept", "",
               f"Share of corrupted rows in the pool: {float(pool_share.iloc[0]):.3f}. A method that filters "
               "noise keeps less than that.", "", markdown_table(corrupt), ""]
    md += ["## Every cell", "", markdown_table(table[[c for c in table.columns if c != "cell"]]), ""]
    atomic_write_text(out / "report.md", "\n".join(md))

    figures = []
    for metric in metrics:
        figures.append((f"{metric} against budget", plot_quality_vs_budget(summary, metric)))
        figures.append((f"{metric} against compute", plot_quality_vs_compute(summary, metric)))
    body = [f"<h1>slimtune bench: {html.escape(config.name)}</h1>", "<h2>Summary</h2><ul>",
            *[f"<li>{html.escape(line).replace('**', '')}</li>" for line in lines], "</ul>",
            "<h2>Quality and cost</h2>", cost.to_html(index=False, float_format=lambda v: f"{v:.4g}")]
    if not corrupt.empty:
        body += ["<h2>Corrupted rows kept</h2>",
                 f"<p>Share in the pool: {float(pool_share.iloc[0]):.3f}</p>",
                 corrupt.to_html(index=False, float_format=lambda v: f"{v:.3f}")]
    body += ["<h2>Curves</h2>"]
    body += [figure_html(png, caption) for caption, png in figures]
    body += ["<h2>Every cell</h2>", table.to_html(index=False, float_format=lambda v: f"{v:.4g}")]
    atomic_write_text(out / "report.html", html_page("slimtune bench", body))
    return out / "report.md"
