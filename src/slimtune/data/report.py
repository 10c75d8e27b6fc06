"""What loading returns, shared by the readers and the recipes: the examples, a report of what was read, kept
and skipped, and the seeded draw both use for ``limit``."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from slimtune.data.errors import DataError
from slimtune.data.example import Example
from slimtune.data.table import take_rows


@dataclass
class LoadReport:
    """What loading found. ``read`` counts records read (bad ones included), ``kept`` the examples returned,
    ``problems`` holds one located :class:`DataError` per skipped record; ``notes`` says what else happened
    (a recipe fell back to the bundled sample, dropped trailing turns, ...)."""

    source: str
    format: str
    read: int = 0
    kept: int = 0
    problems: list[DataError] = field(default_factory=list)
    shapes: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.problems)

    @property
    def shape(self) -> str:
        """The shape of the records, or ``mixed (alpaca 90, messages 10)``."""
        if len(self.shapes) == 1:
            return next(iter(self.shapes))
        if not self.shapes:
            return "none"
        return "mixed (" + ", ".join(f"{name} {count}" for name, count in self.shapes.most_common()) + ")"


@dataclass
class LoadResult:
    """``examples``: a memory-mapped :class:`~slimtune.data.table.ExampleTable` from the readers (a list from
    recipes, which reshape their rows)."""

    examples: Sequence[Example]
    report: LoadReport


def seeded_sample(examples: Sequence[Example], limit: int, seed: int) -> Sequence[Example]:
    """``limit`` examples drawn at random with ``seed``; a smaller limit draws a prefix of a larger one. A
    table's draw is a table."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return take_rows(examples, order[:limit])
