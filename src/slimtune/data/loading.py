"""The one entry point for data: :func:`load_examples` tells a recipe from a path, a Hub id or a ``datasets``
object, and :func:`as_examples` lets the Python API take a ``datasets.Dataset`` wherever it takes examples.

It sits above both the readers and the recipes (which read their files through the readers), so that neither
imports the other's caller.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimtune.data.example import Example
from slimtune.data.readers import is_datasets_folder, looks_like_hub_id, read_examples
from slimtune.data.recipes import RECIPES, is_recipe, run_recipe
from slimtune.data.report import LoadResult
from slimtune.data.table import ExampleTable


def load_examples(data: Any, *, shape: str | None = None, skip_bad: bool = False, source: str | None = None,
                  task_field: str | None = None, id_field: str | None = None, limit: int | None = None,
                  seed: int | None = None, split: str | None = None, subset: str | None = None) -> LoadResult:
    """Examples from a file, a folder, a Hub id (``org/name``), a ``datasets.Dataset``/``IterableDataset``,
    or a recipe (``gsm8k:test``, ``p3``, ``tatoeba:fra-eng``; see :func:`slimtune.data.describe_recipes`).

    The arguments are :func:`slimtune.data.readers.read_examples`'s. Recipes always sample (seed 0 unless
    given) and skip bad rows, counting them; ``split`` chooses a recipe's split too.
    """
    if isinstance(data, (str, os.PathLike)):
        location = Path(data)
        # A folder that merely shares a recipe's name (shared/data/gsm8k) is not what the user meant.
        if not location.is_file() and not is_datasets_folder(location) and is_recipe(str(data)):
            if shape or source or task_field or id_field or subset:
                raise ValueError("shape, source, task_field, id_field and subset apply to files and datasets; "
                                 "a recipe sets its own")
            return run_recipe(str(data), split=split, limit=limit, seed=seed or 0)
        if not location.exists() and not looks_like_hub_id(str(data)):
            raise FileNotFoundError(f"{data}: no such file or folder, not a recipe (known recipes: "
                                    f"{', '.join(RECIPES)}) and not a Hugging Face Hub id (org/name)")
    return read_examples(data, shape=shape, skip_bad=skip_bad, source=source, task_field=task_field,
                         id_field=id_field, limit=limit, seed=seed, split=split, subset=subset)


def as_examples(data: Any) -> Sequence[Example]:
    """Examples as given (a table stays a table, other sequences become a list), or read from a
    ``datasets.Dataset``/``IterableDataset`` (bad rows raise)."""
    if isinstance(data, ExampleTable):
        return data
    if isinstance(data, (list, tuple)) and all(isinstance(item, Example) for item in data):
        return list(data)
    return load_examples(data).examples
