"""One progress vocabulary for every stage longer than a few seconds, and quiet everywhere else.

- :func:`track` / :func:`stage`: a rich progress line (done/total, rows/s, ETA) while a stage runs, then one
  summary line when it ends (``LESS extraction: 260 rows in 41.2 s (6.3 rows/s)``). Drawn on standard error, by
  rank 0 only under a launcher, so N processes print one line and standard output stays the command's result.
- :func:`compact_log_line`: the Trainer's log dicts as one short line per logging step
  (``step 12/40  loss 1.234  lr 2.00e-04  grad 0.81  epoch 0.30``) instead of raw dicts (``train.py`` installs
  it as a Trainer callback).
- :func:`silence_loading_noise`: no download/loading bars or format warnings from transformers, datasets and
  the hub client when a model or data set loads (the GGUF conversion printed bars on every load).

The verbosity is process-wide: ``quiet`` prints no progress (errors and results only), ``normal`` the above,
``verbose`` also the libraries' own logs. The CLI's ``--quiet``/``--verbose`` set it; ``SLIMTUNE_VERBOSITY``
sets it for library use.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slimtune.utils import distributed_rank_world

T = TypeVar("T")
LEVELS = ("quiet", "normal", "verbose")
_level = os.environ.get("SLIMTUNE_VERBOSITY", "normal")
_console = Console(stderr=True)


def set_verbosity(level: str) -> None:
    global _level
    if level not in LEVELS:
        raise ValueError(f"verbosity must be one of {', '.join(LEVELS)}, got {level!r}")
    _level = level
    silence_loading_noise()


def verbosity() -> str:
    return _level


def _shows() -> bool:
    return _level != "quiet" and distributed_rank_world()[0] == 0


def note(message: str) -> None:
    """One line about a stage (a cache hit, a choice made), shown unless quiet."""
    if _shows():
        _console.print(f"[dim]{message}[/dim]", highlight=False)


class Stage:
    """A running stage: call :meth:`advance` with the work done since the last call."""

    def __init__(self, description: str, total: int | None, unit: str, progress: Progress | None):
        self.description, self.total, self.unit = description, total, unit
        self.done = 0
        self._progress = progress
        self._task = progress.add_task(description, total=total) if progress is not None else None
        self._start = time.perf_counter()

    def advance(self, amount: int = 1) -> None:
        self.done += amount
        if self._progress is not None:
            self._progress.update(self._task, advance=amount)

    def summary(self) -> str:
        seconds = time.perf_counter() - self._start
        rate = f" ({self.done / seconds:,.1f} {self.unit}/s)" if seconds > 0 and self.done else ""
        return f"{self.description}: {self.done:,} {self.unit} in {seconds:,.1f} s{rate}"


@contextmanager
def stage(description: str, total: int | None = None, unit: str = "rows", *, live: bool = True) -> Iterator[Stage]:
    """A progress line for the block (``live``), then its summary line; nothing when quiet or not rank 0."""
    if not _shows() or not live:
        current = Stage(description, total, unit, None)
        yield current
        if _shows():
            _console.print(f"[green]✓[/green] {current.summary()}", highlight=False)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(f"{unit}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=_console, transient=True) as progress:
        current = Stage(description, total, unit, progress)
        yield current
    _console.print(f"[green]✓[/green] {current.summary()}", highlight=False)


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "rows",
          size: Any = None) -> Iterator[T]:
    """Iterate ``items`` inside a :func:`stage`; ``size(item)`` is the work one item stands for (default 1)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with stage(description, total, unit) as current:
        for item in items:
            yield item
            current.advance(size(item) if size is not None else 1)


def silence_loading_noise() -> None:
    """Loading bars and format warnings off unless verbose (they are noise on every cached load)."""
    if _level == "verbose":
        return
    import logging
    import warnings

    # deprecations inside transformers/peft calls that users cannot act on, printed on every model load
    for message in (r".*is_gradient_checkpointing.*", r".*past_key_values.*"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    for name in ("gguf", "accelerate", "peft", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def compact_log_line(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """``step 12/40  loss 1.234  lr 2.00e-04  grad 0.81  epoch 0.30`` and any other number the Trainer logged."""
    formats = {"loss": ("loss", "{:.4g}"), "learning_rate": ("lr", "{:.2e}"), "grad_norm": ("grad", "{:.3g}"),
               "epoch": ("epoch", "{:.2f}")}
    parts = [f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"]
    parts += [f"{label} {fmt.format(logs[key])}" for key, (label, fmt) in formats.items() if key in logs]
    parts += [f"{key.removeprefix('train_')} {value:.4g}" for key, value in logs.items()
              if key not in formats and key != "total_flos" and isinstance(value, (int, float))]
    return "  ".join(parts)


def show_log_line(line: str) -> None:
    """A Trainer log line (see :func:`compact_log_line`), on standard error, unless quiet."""
    if _shows():
        print(line, file=sys.stderr, flush=True)


__all__ = ["Stage", "compact_log_line", "note", "set_verbosity", "show_log_line", "silence_loading_noise", "stage",
           "track", "verbosity"]
