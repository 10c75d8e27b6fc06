"""Publish a finished targeted grid (``slimtune bench cpu-targeted``) in benchmarks/README.md.

    python benchmarks/targeted_report.py --grid <the grid's results folder> [--config cpu-targeted]
        [--wall-seconds S] [--commit SHA]

Reads the grid's ``results.csv`` (every cell) and ``targets.csv`` (per target and budget: each method's held-out
loss against random's and the domain oracle's, :func:`slimtune.bench.report.targeted_table`), copies both to
``benchmarks/results/`` and rewrites the README section "Targeted grid" with: the reference points (untrained,
full data), the targets table with issue 17's verdicts, the task metrics of the cells that generated them, and
where the time went (per method, and summed over cells). The hand-written reading after the section's
:data:`readme.READING` marker is kept. Nothing is trained or evaluated: it runs in seconds.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd
from readme import replace_section

from slimtune.bench.config import load_config
from slimtune.bench.report import GRID_ORACLE, markdown_table, targeted_verdicts

HEADING = "## Targeted grid (`slimtune bench cpu-targeted`)"
RESULTS = Path(__file__).resolve().parent / "results"
TASK_METRICS = ("chrf", "accuracy", "exact_match")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return markdown_table(pd.DataFrame(rows, columns=header)).split("\n")


def method_order(config, methods) -> list[str]:
    """random and the oracle first (what the others are measured against), then the config's order."""
    order = ["random", GRID_ORACLE, *(m.label for m in config.methods)]
    return [m for m in dict.fromkeys(order) if m in set(methods)]


def targets_section(config, cells: pd.DataFrame, targets: pd.DataFrame) -> list[str]:
    seeds = cells.groupby(["method", "budget"], dropna=False)["seed"].nunique()
    lines = []
    for reference in ("untrained", "full"):
        at = cells[cells["method"] == reference]
        if not at.empty:
            losses = ", ".join(f"{ev.task} {at[f'{ev.task}/loss'].mean():.3f}" for ev in config.evals)
            lines.append(f"{reference} ({len(at)} cell{'s' if len(at) > 1 else ''}): {losses}")
    out = ["Reference points (held-out loss): " + "; ".join(lines) + ".", ""]
    rows = []
    for (target, budget), group in targets.groupby(["target", "budget"], sort=False):
        group = group.set_index("method")
        for method in method_order(config, group.index):
            r = group.loc[method]
            judged = method not in ("random", GRID_ORACLE)
            rows.append([target, f"{budget:g}", method, seeds.get((method, budget), ""), f"{r['loss']:.3f}",
                         f"{r['se']:.3f}", f"{r['margin_se']:.1f}" if method != "random" else "",
                         f"{r['oracle_share']:.0%}" if judged and pd.notna(r["oracle_share"]) else "",
                         f"{r['vs_full']:+.3f}"])
    out += _table(["target", "budget", "method", "seeds", "held-out loss", "± s.e.", "beats random by (s.e.)",
                   "share of oracle's gain", "minus full data"], rows)
    judged = tuple(m.label for m in config.methods if m.label != GRID_ORACLE and m.name != GRID_ORACLE)
    out += ["", *[f"- {line}" for line in targeted_verdicts(config, targets, judged)]]
    return out


def task_metrics_section(config, cells: pd.DataFrame) -> list[str]:
    """Mean ± standard error over the seeds that generated (``generate_seeds``), per method and budget."""
    columns = [c for c in cells.columns if c.rsplit("/", 1)[-1] in TASK_METRICS]
    generated = cells.dropna(subset=columns, how="all")
    if generated.empty:
        return []
    rows = []
    for (method, budget), group in generated.groupby(["method", "budget"], dropna=False, sort=False):
        values = []
        for column in columns:
            v = group[column].dropna()
            values.append("" if v.empty else f"{v.mean():.3g}" + (f" ± {v.sem():.2g}" if len(v) > 1 else ""))
        rows.append([method, "" if pd.isna(budget) else f"{budget:g}", ", ".join(map(str, sorted(group["seed"]))),
                     *values])
    rank = {m: i for i, m in enumerate(["untrained", "full", *method_order(config, generated["method"])])}
    rows.sort(key=lambda r: (r[1], rank.get(r[0], len(rank))))
    return ["Task metrics of the cells that generated (the config's `generate`, at its `generate_seeds`):", "",
            *_table(["method", "budget", "seeds", *columns], rows)]


def cost_section(config, cells: pd.DataFrame, wall_seconds: float | None) -> list[str]:
    # A selection shared by several cells (one for every seed, when the method has no seed or pins it) is
    # charged to the cell that computed it; grids run before that (the published cpu-targeted run) recorded its
    # cost in every cell that loaded it: count it once either way.
    computed = cells.drop_duplicates(subset=["method", "target", "budget", "selection_seconds"])
    rows = []
    for method in ["untrained", "full", *method_order(config, cells["method"])]:
        mine = cells[cells["method"] == method]
        if mine.empty:
            continue
        rows.append([method, len(mine), f"{mine['selection_seconds'].max():.0f}",
                     f"{computed.loc[computed['method'] == method, 'selection_seconds'].sum():.0f}",
                     f"{mine['training_seconds'].median():.0f}", f"{mine['eval_seconds'].median():.0f}"])
    spent = {part: cells[f"{part}_seconds"].sum() for part in ("training", "eval")}
    spent["selection"] = computed["selection_seconds"].sum()
    total = sum(spent.values())
    summary = (f"Summed over the {len(cells)} cells: selection {spent['selection'] / 60:.0f} min, training "
               f"{spent['training'] / 60:.0f} min, evaluation (generation and option scoring included) "
               f"{spent['eval'] / 60:.0f} min, {total / 60:.0f} min in all")
    if wall_seconds:
        summary += (f"; the run's wall time was {wall_seconds / 60:.0f} min (the rest: loading models and data "
                    "between cells, writing results)")
    return ["Where the time went (seconds; a cell that reuses another cell's warm-up, features or kernel records what "
            "it spent itself):", "", *_table(["method", "cells", "selection s (largest cell)",
                                                "selection s (each selection once)",
                         "training s per cell (median)", "evaluation s per cell (median)"], rows),
            "", summary + "."]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, required=True, help="the grid's results folder")
    parser.add_argument("--config", default="cpu-targeted", help="the grid's config (shipped name or YAML)")
    parser.add_argument("--wall-seconds", type=float, help="the run's wall time, measured outside it")
    parser.add_argument("--commit", help="the commit the run was made from")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    cells = pd.read_csv(args.grid / "results.csv")
    targets = pd.read_csv(args.grid / "targets.csv")
    RESULTS.mkdir(exist_ok=True)
    stem = config.name.replace("-", "_")
    shutil.copyfile(args.grid / "results.csv", RESULTS / f"{stem}.csv")
    shutil.copyfile(args.grid / "targets.csv", RESULTS / f"{stem}_targets.csv")

    origin = f" of commit {args.commit}" if args.commit else ""
    body = [f"Written by `python benchmarks/targeted_report.py` from the run{origin} ({len(cells)} cells; "
            f"`benchmarks/results/{stem}.csv`, every cell, and `benchmarks/results/{stem}_targets.csv`). "
            "Loss is the held-out response loss on each target's evaluation rows, lower is better; \"beats random "
            "by\" is random's mean minus the method's over the standard error of that difference (over seeds); "
            "\"share of oracle's gain\" is (random - method) / (random - oracle).", "",
            *targets_section(config, cells, targets), "", *task_metrics_section(config, cells), "",
            *cost_section(config, cells, args.wall_seconds)]
    replace_section(HEADING, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
