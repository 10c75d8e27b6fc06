"""What every recipe shares: its description, and the fixed held-out split for data sets that ship none."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from slimtune.data.report import LoadResult

#: Share of rows held out as "test" where a data set has no test split of its own.
TEST_SHARE = 0.1


@dataclass(frozen=True)
class Recipe:
    """A real data set turned into examples. ``build(root, split, **options)`` returns the split's examples in
    file order; ``option`` is the keyword that the extra part of a spec fills (``tatoeba:fra-eng`` sets
    ``pairs="fra-eng"``)."""

    name: str
    about: str
    licence: str
    build: Callable[..., LoadResult]
    splits: tuple[str, ...] = ("train", "test", "all")
    option: str | None = None
    option_help: str = ""


def in_split(key: str, split: str) -> bool:
    """Whether the row keyed ``key`` belongs to ``split``: a fixed 10% of keys, chosen by hash, is "test" and
    the rest "train", so a pool drawn from "train" never meets an evaluation row from "test"."""
    if split == "all":
        return True
    held_out = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) < TEST_SHARE * 16**8
    return held_out == (split == "test")
