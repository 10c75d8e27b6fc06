"""Pictures of what a selection kept: ``report.html`` (figures embedded) and one PNG per figure, in the folder
of a ``slimtune select`` (beside ``manifest.json``) or of an online ``slimtune train`` (beside its selection log).

Both describe the same thing, rows offered against rows kept, so one renderer serves both:
- the score distribution, kept and passed over, with the cut (the lowest kept score);
- the kept share per task (``Example.task``: the data set, template or language pair a row came from);
- the length distribution (characters of the conversation) of the pool against the kept rows;
- the cost (seconds, tokens) and, online, the kept share per step.
A person sees at a glance whether a method kept one task only, only short rows, or rows past a cut that a
score's tail decides.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimtune.bench.report import figure_html, html_page, png_bytes
from slimtune.data.example import Example
from slimtune.utils import atomic_write_bytes, atomic_write_text

#: Tasks shown one bar each; the rest are summed into one bar.
MAX_TASK_BARS = 20


@dataclass
class KeptRows:
    """Rows offered to a method and whether it kept each: the one input of the renderer."""

    title: str
    scores: np.ndarray  # NaN where a row has no score
    kept: np.ndarray  # bool
    tasks: list[str]
    lengths: np.ndarray
    score_label: str = "score"
    facts: dict[str, Any] = field(default_factory=dict)
    steps: tuple[np.ndarray, np.ndarray] | None = None  # (step, kept share) online


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _score_figure(rows: KeptRows):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    finite = np.isfinite(rows.scores)
    values = rows.scores[finite]
    if len(values):
        bins = np.histogram_bin_edges(values, bins=min(40, max(5, int(math.sqrt(len(values))))))
        ax.hist(values[~rows.kept[finite]], bins=bins, color="#bbbbbb", label="passed over")
        ax.hist(values[rows.kept[finite]], bins=bins, color="#1f77b4", alpha=0.85, label="kept")
        kept_values = rows.scores[rows.kept & finite]
        if len(kept_values):
            ax.axvline(kept_values.min(), color="#d62728", linestyle="--", label="cut (lowest kept)")
        ax.legend(fontsize=8)
    unscored = int((~finite).sum())
    hidden = f" ({unscored} unscored row{'s' if unscored > 1 else ''} not shown)" if unscored else ""
    ax.set_title(f"{rows.score_label} distribution{hidden}", fontsize=10)
    ax.set_xlabel(rows.score_label)
    ax.set_ylabel("rows")
    return fig


def _task_figure(rows: KeptRows):
    plt = _plt()
    offered, kept = Counter(rows.tasks), Counter(t for t, k in zip(rows.tasks, rows.kept) if k)
    order = [task for task, _ in offered.most_common(MAX_TASK_BARS)]
    rest = set(offered) - set(order)
    labels = order + ([f"{len(rest)} more"] if rest else [])
    pool_counts = [offered[t] for t in order] + ([sum(offered[t] for t in rest)] if rest else [])
    kept_counts = [kept[t] for t in order] + ([sum(kept[t] for t in rest)] if rest else [])
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.28 * len(labels)))
    y = np.arange(len(labels))
    ax.barh(y, pool_counts, color="#dddddd", label="offered")
    ax.barh(y, kept_counts, color="#1f77b4", label="kept")
    for i, (n, k) in enumerate(zip(pool_counts, kept_counts)):
        ax.text(n, i, f" {k / n:.0%}" if n else "", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("rows (share kept at the bar's end)")
    ax.set_title("kept share per task", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _length_figure(rows: KeptRows):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    lengths = rows.lengths.astype(float)
    bins = np.histogram_bin_edges(np.log10(np.maximum(lengths, 1)), bins=30)
    ax.hist(np.log10(np.maximum(lengths, 1)), bins=bins, color="#bbbbbb", label="offered", density=True)
    ax.hist(np.log10(np.maximum(lengths[rows.kept], 1)), bins=bins, color="#1f77b4", alpha=0.7,
            label="kept", density=True)
    ax.set_xlabel("log10 characters per row")
    ax.set_ylabel("density")
    ax.set_title(f"lengths: median {np.median(lengths):.0f} offered, "
                 f"{np.median(lengths[rows.kept]) if rows.kept.any() else 0:.0f} kept", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _steps_figure(rows: KeptRows):
    plt = _plt()
    steps, share = rows.steps
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.plot(steps, share, marker=".", linewidth=1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("kept share of candidates")
    ax.set_title("kept share per step", fontsize=10)
    return fig


#: Every file :func:`write_kept_report` may write.
REPORT_FILES = ("report.html", "scores.png", "tasks.png", "lengths.png", "steps.png")


def clear_kept_report(out_dir: str | os.PathLike) -> None:
    """Remove an earlier report, so a run stopped before it drew its own never shows another run's pictures."""
    for name in REPORT_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)


def write_kept_report(out_dir: str | os.PathLike, rows: KeptRows) -> Path:
    """``report.html`` with every figure embedded, and each figure as a PNG beside it; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [("scores.png", "scores, kept and passed over, with the cut", _score_figure),
               ("tasks.png", "kept share per task", _task_figure),
               ("lengths.png", "lengths offered and kept", _length_figure)]
    if rows.steps is not None:
        figures.append(("steps.png", "kept share per step", _steps_figure))
    body = [f"<h1>{html.escape(rows.title)}</h1>", "<table>"]
    body += [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fact(v))}</td></tr>"
             for k, v in rows.facts.items()]
    body.append("</table>")
    for name, caption, draw in figures:
        png = png_bytes(draw(rows))
        atomic_write_bytes(out / name, png)
        body.append(figure_html(base64.b64encode(png).decode("ascii"), caption))
    atomic_write_text(out / "report.html", html_page(rows.title, body))
    return out / "report.html"


def _fact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def row_length(example: Example) -> int:
    return sum(len(m["content"]) for m in example.messages)


def selection_rows(selection, pool: Sequence[Example]) -> KeptRows:
    """What an offline :class:`~slimtune.select.Selection` kept of ``pool``."""
    kept = np.zeros(len(pool), dtype=bool)
    kept[selection.kept] = True
    cost = selection.cost
    facts = {"method": selection.method, "model": selection.model or "-", "pool rows": len(pool),
             "kept rows": int(kept.sum()), "kept share": kept.mean() if len(pool) else 0.0,
             "seconds": cost.seconds, "forward tokens": cost.forward_tokens,
             "backward tokens": cost.backward_tokens, "unscored rows": int((~np.isfinite(selection.scores)).sum()),
             "parameters": selection.params}
    return KeptRows(title=f"slimtune select: {selection.method}", scores=np.asarray(selection.scores, float),
                    kept=kept, tasks=[ex.task for ex in pool], lengths=np.array([row_length(ex) for ex in pool]),
                    facts=facts)


def online_rows(records: Sequence[Mapping[str, Any]], examples: Sequence[Example] | None = None,
                summary: Mapping[str, Any] | None = None) -> KeptRows:
    """What an online run kept of the candidates it scored, from its selection log records (warm-up steps,
    which train every candidate, are left out). A row offered at several steps counts at each."""
    by_id = {ex.id: ex for ex in examples or ()}
    scores, kept, tasks, lengths, steps, shares = [], [], [], [], [], []
    for record in records:
        if record.get("phase") != "select":
            continue
        chosen = set(record["chosen_ids"])
        values = record.get("scores") or record.get("loss") or [None] * len(record["ids"])
        for eid, value in zip(record["ids"], values):
            example = by_id.get(eid)
            scores.append(np.nan if value is None else value)
            kept.append(eid in chosen)
            tasks.append(example.task if example else "unknown")
            lengths.append(row_length(example) if example else 0)
        steps.append(record["step"])
        shares.append(len(record["chosen_ids"]) / max(1, len(record["ids"])))
    summary = dict(summary or {})
    facts = {"policy": summary.get("policy", "-"), "candidates scored": len(scores), "kept": int(sum(kept)),
             "kept share": (sum(kept) / len(kept)) if kept else 0.0,
             **{k: summary[k] for k in ("scoring_seconds", "train_seconds", "examples_trained", "tokens_trained")
                if k in summary}}
    uses_scores = any(r.get("scores") for r in records)
    return KeptRows(title=f"slimtune train --online {summary.get('policy', '')}".rstrip(),
                    scores=np.array(scores, float), kept=np.array(kept, bool), tasks=tasks,
                    lengths=np.array(lengths), score_label="policy score" if uses_scores else "loss", facts=facts,
                    steps=(np.array(steps), np.array(shares)))
