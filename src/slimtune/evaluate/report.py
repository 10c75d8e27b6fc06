"""EvalReport: per-task metrics, counts and timings of one evaluation, as JSON and as a table."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from slimtune.utils import write_json

#: Column order of the table; any other metric follows these.
METRIC_ORDER = ("exact_match", "chrf", "bleu", "accuracy", "accuracy_sum", "loss", "perplexity")


def _format(metric: str, value: float) -> str:
    if metric in ("chrf", "bleu"):
        return f"{value:.1f}"
    return f"{value:.4f}" if metric == "loss" else f"{value:.3f}"


@dataclass
class EvalReport:
    """Results keyed by the name each set of examples was given to :func:`~slimtune.evaluate.evaluate`.

    ``metrics[key]``: metric name -> value (``loss`` is the token-weighted mean response loss, ``perplexity``
    its exp; chrF and BLEU are 0-100, the rest 0-1). ``tasks[key]``: the task that scored it.
    ``counts[key]``: examples, response_tokens, truncated and the task's own counts. ``seconds[key]``: wall
    time. ``breakdown[key]``: loss, perplexity and tokens per ``example.task`` within the set.
    ``predictions[key]``: one record per example (id, loss, prediction, reference, correct ...), if kept.
    """

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    tasks: dict[str, str] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    breakdown: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, task: str, metrics: dict[str, float], counts: dict[str, int], seconds: float,
            predictions: list[dict[str, Any]] | None = None) -> None:
        self.metrics[key], self.tasks[key] = metrics, task
        self.counts[key], self.seconds[key] = counts, seconds
        if predictions is not None:
            self.predictions[key] = predictions

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        return cls(**{name: data.get(name, {}) for name in cls.__dataclass_fields__})

    def to_json(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvalReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def table(self) -> Table:
        names = {name for values in self.metrics.values() for name in values}
        columns = [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))
        table = Table(title="evaluation")
        for header in ("set", "task", "examples", *columns, "seconds"):
            table.add_column(header, justify="left" if header in ("set", "task") else "right")
        for key, values in self.metrics.items():
            cells = [_format(m, values[m]) if m in values else "-" for m in columns]
            table.add_row(key, self.tasks[key], str(self.counts[key]["examples"]), *cells,
                          f"{self.seconds[key]:.1f}")
        return table

    def __str__(self) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=160, color_system=None, force_terminal=False).print(self.table())
        return buffer.getvalue().rstrip()
