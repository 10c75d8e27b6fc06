"""The offline vocabulary: a Budget, the Selection a method returns, and the Selector every method implements.

Every offline method is a dataclass subclass of :class:`Selector`: its parameters are plain constructor
arguments (scikit-learn style) and the dataclass doubles as the method's config (PEFT style). It speaks one
verb, :meth:`Selector.select`, and returns a :class:`Selection` that records what was kept, every example's
score, the parameters and the cost, and can write the subset plus ``manifest.json``.

A row a method cannot score (a NaN or infinite score) is counted with its reason and never enters the kept
set silently: :meth:`Selector.select` raises :class:`UnscoredRowsError` unless ``allow_unscored`` is set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from slimtune.data import as_examples
from slimtune.data.example import Example, pool_hash
from slimtune.data.table import example_ids
from slimtune.utils import write_json


@dataclass(frozen=True)
class Budget:
    """How much of the pool to keep: a fraction in (0, 1] or an absolute count."""

    fraction: float | None = None
    count: int | None = None

    def __post_init__(self):
        if (self.fraction is None) == (self.count is None):
            raise ValueError("a Budget is either a fraction or a count")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"budget fraction must be in (0, 1], got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"budget count must be >= 1, got {self.count}")

    @classmethod
    def parse(cls, value: str | float | int | Budget) -> Budget:
        """``0.05`` or ``"5%"`` is a fraction; ``200`` or ``"200"`` is a count."""
        if isinstance(value, Budget):
            return value
        text = str(value).strip()
        if text.endswith("%"):
            return cls(fraction=float(text[:-1]) / 100)
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(f"budget {value!r} is not a finite number")
        if number < 1 or (number == 1 and "." in text):
            return cls(fraction=number)
        if number != int(number):
            raise ValueError(f"budget {value!r} is neither a fraction in (0, 1] nor a whole count")
        return cls(count=int(number))

    def resolve(self, n: int) -> int:
        """The number of examples to keep from a pool of ``n`` (at least one, at most ``n``)."""
        k = self.count if self.count is not None else math.ceil(self.fraction * n - 1e-9)
        return max(1, min(n, k))

    def __str__(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else str(self.count)


@dataclass
class Cost:
    """What a selection spent: wall seconds and model tokens pushed through forward (and backward) passes."""

    seconds: float = 0.0
    forward_tokens: int = 0
    backward_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    #: pool index -> why the method could not score that row; a method that knows the cause records it here
    unscored: dict[int, str] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.forward_tokens + self.backward_tokens

    def add(self, other: Cost) -> None:
        self.seconds += other.seconds
        self.forward_tokens += other.forward_tokens
        self.backward_tokens += other.backward_tokens
        self.details.update(other.details)
        self.unscored.update(other.unscored)


@dataclass
class StoredFeatures:
    """For selectors whose features (kernels, embeddings, losses) go through a keyed feature store, so a
    repeated or interrupted run reuses them: under ``cache_dir/features`` if given (a benchmark grid's own
    folder, so nothing an earlier run built elsewhere makes a selection look cheaper), else the slimtune
    cache; with ``cache=False`` in a temporary folder, gone once read."""

    cache: bool = True
    cache_dir: str | None = None

    def _store_root(self) -> bool | Path:
        """The ``cache`` argument of :meth:`FeatureStore.cached <slimtune.features.store.FeatureStore.cached>`."""
        if self.cache and self.cache_dir:
            return Path(self.cache_dir) / "features"
        return self.cache


class UnscoredRowsError(ValueError):
    """Rows the method could not score would be among the kept ones; the message has the count and cause."""


@dataclass
class Selection:
    """The outcome of one selection: ``kept`` indexes the pool in the order the method chose them."""

    method: str
    params: dict[str, Any]
    pool_ids: list[str]
    scores: np.ndarray
    kept: list[int]
    pool_hash: str
    cost: Cost
    model: str | None = None
    #: records left out before selection (``--skip-bad``): where each was and what was wrong with it
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def kept_ids(self) -> list[str]:
        return [self.pool_ids[i] for i in self.kept]

    def subset(self, pool: Sequence[Example]) -> list[Example]:
        return [pool[i] for i in self.kept]

    def manifest(self) -> dict[str, Any]:
        kept = set(self.kept)
        rank = {i: r for r, i in enumerate(self.kept)}
        return {
            "method": self.method,
            "params": self.params,
            "model": self.model,
            "pool_hash": self.pool_hash,
            "pool_size": len(self.pool_ids),
            "kept": len(self.kept),
            "unscored": len(self.cost.unscored),
            "skipped": self.skipped,
            "cost": {k: v for k, v in dataclasses.asdict(self.cost).items() if k != "unscored"},
            "examples": [
                {"id": eid, "score": None if not np.isfinite(s) else float(s), "kept": i in kept,
                 "rank": rank.get(i), **({"unscored": self.cost.unscored[i]} if i in self.cost.unscored else {})}
                for i, (eid, s) in enumerate(zip(self.pool_ids, self.scores.tolist()))
            ],
        }

    def save(self, out_dir: str | os.PathLike, pool: Sequence[Example], save_as: Sequence[str] = ("source",)) -> Path:
        """Write the kept records in the pool's own format (``subset.<ext>``), or as each of ``save_as``
        (see :func:`slimtune.data.writers.save_subset`), and ``manifest.json``; returns the first written.

        ``manifest.json`` is the commit marker: an earlier run's manifest and subset files are removed first
        and the new manifest is written last (each file atomically), so a folder with a manifest always
        holds the subsets it names, and no stale ``subset.csv`` outlives a new ``subset.jsonl``.
        """
        from slimtune.data.writers import save_subset

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for earlier in [out / "manifest.json", *(p for p in [*out.glob("subset.*"), *out.glob("indices.*")]
                                                 if p.is_file())]:
            earlier.unlink(missing_ok=True)
        shutil.rmtree(out / "subset_dataset", ignore_errors=True)
        subset_path, *_ = written = save_subset(self.subset(as_examples(pool)), out, save_as)
        write_json(out / "manifest.json", {**self.manifest(), "subset_file": subset_path.name,
                                           "subset_files": [path.name for path in written]})
        return subset_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Selection:
        path = Path(path)
        data = json.loads((path / "manifest.json" if path.is_dir() else path).read_text())
        rows = data["examples"]
        kept = sorted((r["rank"], i) for i, r in enumerate(rows) if r["kept"])
        cost = Cost(**data["cost"], unscored={i: r["unscored"] for i, r in enumerate(rows) if "unscored" in r})
        return cls(method=data["method"], params=data["params"], pool_ids=[r["id"] for r in rows],
                   scores=np.array([np.nan if r["score"] is None else r["score"] for r in rows]),
                   kept=[i for _, i in kept], pool_hash=data["pool_hash"], cost=cost, model=data.get("model"),
                   skipped=data.get("skipped", []))


class Selector(ABC):
    """An offline selection method. Subclasses are dataclasses; their fields are the method's parameters."""

    name: ClassVar[str]
    needs_target: ClassVar[bool] = False

    @abstractmethod
    def score(self, pool: Sequence[Example], *, target: Sequence[Example] | None = None,
              existing: Sequence[Example] | None = None, cost: Cost) -> np.ndarray | tuple[np.ndarray, list[int]]:
        """Per-example scores (higher = keep first); a method whose choice is not a top-k of independent
        scores (a greedy set function) returns ``(scores, order)`` with ``order`` its full pick order."""

    def select(self, pool: Sequence[Example], budget: Budget | float | int | str, *,
               target: Sequence[Example] | None = None,
               existing: Sequence[Example] | None = None, allow_unscored: bool = False) -> Selection:
        """Score ``pool`` and keep ``budget`` of it. Rows the method could not score are recorded in
        ``cost.unscored``; if any would be kept, :class:`UnscoredRowsError` says how many and why, unless
        ``allow_unscored`` (they are then kept after every scored row, as ranked)."""
        # A datasets.Dataset becomes examples here, so every method sees the same records and ids.
        pool, target, existing = (None if data is None else as_examples(data) for data in (pool, target, existing))
        if len(pool) == 0:
            raise ValueError("the pool is empty: nothing to select from")
        if self.needs_target and not target:
            raise ValueError(f"method '{self.name}' selects toward a target task: pass target examples")
        budget = Budget.parse(budget)
        k = budget.resolve(len(pool))
        cost = Cost()
        start = time.perf_counter()
        result = self.score(pool, target=target, existing=existing, cost=cost)
        cost.seconds = time.perf_counter() - start
        if isinstance(result, tuple):
            scores, order = result
        else:
            scores = result
            # stable descending order; NaN scores go last
            order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable").tolist()
        scores = np.asarray(scores, dtype=np.float64)
        for i in np.flatnonzero(~np.isfinite(scores)).tolist():
            cost.unscored.setdefault(i, f"the method gave no finite score ({scores[i]})")
        kept = list(order[:k])
        unscored_kept = [i for i in kept if i in cost.unscored]
        if unscored_kept and not allow_unscored:
            raise UnscoredRowsError(_unscored_message(self.name, cost.unscored, len(pool), len(unscored_kept), k,
                                                      [pool[i] for i in unscored_kept]))
        params = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return Selection(method=self.name, params={"budget": str(budget), **params},
                         pool_ids=example_ids(pool), scores=scores,
                         kept=kept, pool_hash=pool_hash(pool), cost=cost,
                         model=getattr(self, "model", None) if isinstance(getattr(self, "model", None), str)
                         else None)


def _unscored_message(method: str, unscored: dict[int, str], n: int, n_kept: int, k: int,
                      examples: Sequence[Example]) -> str:
    causes = Counter(unscored.values()).most_common(3)
    first = examples[0]
    where = (f"{first.metadata['file']}:{first.metadata['line']}" if "file" in first.metadata
             and "line" in first.metadata else f"id {first.id}")
    return (f"{method}: {len(unscored)} of {n} rows could not be scored and {n_kept} of them would be among the "
            f"{k} kept (first: {where}); cause: " + "; ".join(f"{reason} ({count} rows)" for reason, count in causes)
            + ". Fix the cause (e.g. raise max_length) or pass --allow-unscored (allow_unscored=True) to keep "
            "them ranked after every scored row.")


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # nested settings: a dict get_selector reads
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value)
