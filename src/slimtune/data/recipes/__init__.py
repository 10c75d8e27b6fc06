"""Recipes: the shared real data sets (GSM8K, P3, Tatoeba, Taskmaster-4) as examples, with deterministic
sampling and a held-out split wherever the data has none.

A recipe is named by a spec, ``name[:split][:option]``: ``gsm8k:test``, ``tatoeba:fra-eng``, ``p3:sciq:test``.
The data are read from ``$SLIMTUNE_SHARED_DATA``, else ``../shared/data`` beside the repository or the working
directory, else from the small sample bundled with slimtune (with a warning), so the demo runs anywhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from slimtune.data.example import Example
from slimtune.data.recipes import gsm8k, p3, taskmaster4, tatoeba
from slimtune.data.recipes.common import Recipe
from slimtune.data.recipes.gsm8k import final_answer
from slimtune.data.recipes.p3 import answer_options
from slimtune.data.report import LoadResult, seeded_sample

__all__ = ["RECIPES", "SAMPLE_DIR", "Recipe", "answer_options", "data_root", "describe_recipes",
           "final_answer", "is_recipe", "load_recipe", "run_recipe", "shared_data_dir"]

log = logging.getLogger(__name__)

RECIPES: dict[str, Recipe] = {m.RECIPE.name: m.RECIPE for m in (gsm8k, p3, tatoeba, taskmaster4)}

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "samples"
_REPOSITORY = Path(__file__).resolve().parents[4]
_announced: set[str] = set()


def shared_data_dir() -> Path | None:
    """The shared real data folder: ``$SLIMTUNE_SHARED_DATA``, else ``../shared/data`` beside the repository
    or the working directory; None when there is none."""
    configured = os.environ.get("SLIMTUNE_SHARED_DATA")
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"SLIMTUNE_SHARED_DATA={configured} is not a folder")
        return path
    beside = (_REPOSITORY.parent / "shared" / "data", Path.cwd().parent / "shared" / "data")
    return next((path for path in beside if path.is_dir()), None)


def data_root(data_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """The folder recipes read, and a note when it is the bundled sample rather than the full data."""
    if data_dir is not None:
        return Path(data_dir), None
    shared = shared_data_dir()
    if shared is not None:
        return shared, None
    return SAMPLE_DIR, (f"../shared/data not found (set SLIMTUNE_SHARED_DATA to point at it): using the "
                        f"small sample bundled in {SAMPLE_DIR}")


def is_recipe(spec: str) -> bool:
    return spec.split(":", 1)[0].strip().lower() in RECIPES


def _parse(spec: str) -> tuple[Recipe, str | None, dict[str, str]]:
    name, *parts = spec.split(":")
    recipe = RECIPES.get(name.strip().lower())
    if recipe is None:
        raise ValueError(f"unknown recipe '{name}'; known: {', '.join(RECIPES)}")
    split, options = None, {}
    for part in parts:
        if part in recipe.splits:
            if split:
                raise ValueError(f"'{spec}' names two splits")
            split = part
        elif recipe.option and recipe.option not in options:
            options[recipe.option] = part
        else:
            hint = f"; give all {recipe.option} in one part, comma-separated" if recipe.option else ""
            raise ValueError(f"'{part}' in '{spec}' is not a split of {recipe.name} "
                             f"({', '.join(recipe.splits)}){hint}")
    return recipe, split, options


def run_recipe(spec: str, *, split: str | None = None, limit: int | None = None, seed: int = 0,
               data_dir: str | os.PathLike | None = None, **options: Any) -> LoadResult:
    """A recipe's examples and report. ``spec`` is a name or ``name[:split][:option]``; ``split`` is
    ``train`` (default), ``test`` or ``all``; ``limit`` draws that many at random with ``seed`` (a smaller
    limit gives a prefix of a larger one's draw); ``options`` are the recipe's own (``pairs=`` for tatoeba,
    ``templates=`` for p3)."""
    recipe, spec_split, spec_options = _parse(spec)
    if split and spec_split and split != spec_split:
        raise ValueError(f"'{spec}' names split {spec_split}, but split={split!r} was passed")
    split = spec_split or split or "train"
    if split not in recipe.splits:
        raise ValueError(f"{recipe.name} has no split '{split}'; it has {', '.join(recipe.splits)}")
    unknown = set(options) - {recipe.option}
    if unknown:
        raise TypeError(f"recipe {recipe.name} takes no option {', '.join(sorted(unknown))}"
                        + (f"; it takes {recipe.option}" if recipe.option else ""))
    root, fallback = data_root(data_dir)
    result = recipe.build(root, split, **spec_options, **options)
    report = result.report
    report.source = spec if spec_split else f"{spec}:{split}"
    if fallback:
        report.notes.insert(0, fallback)
        if fallback not in _announced:
            _announced.add(fallback)
            log.warning(fallback)
    if limit is not None:
        result.examples = seeded_sample(result.examples, limit, seed)
    report.kept = len(result.examples)
    return result


def load_recipe(spec: str, *, split: str | None = None, limit: int | None = None, seed: int = 0,
                data_dir: str | os.PathLike | None = None, **options: Any) -> list[Example]:
    """A recipe's examples; see :func:`run_recipe` for the arguments (it also returns the report)."""
    return run_recipe(spec, split=split, limit=limit, seed=seed, data_dir=data_dir, **options).examples


def describe_recipes() -> list[str]:
    """Lines for ``slimtune data recipes``: where the data are read from, then each recipe."""
    root, fallback = data_root()
    lines = [fallback or f"reading {root}", "spec: name[:split][:option]; the split is train unless named"]
    for recipe in RECIPES.values():
        option = f" Option: {recipe.option_help}." if recipe.option else ""
        lines.append(f"{recipe.name}: {recipe.about}. Splits: {', '.join(recipe.splits)}. "
                     f"Licence: {recipe.licence}.{option}")
    return lines
