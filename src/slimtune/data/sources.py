"""Where examples come from: a file or saved datasets folder (:mod:`slimtune.data.readers`) or a recipe
(:mod:`slimtune.data.recipes`, which builds on the readers). :func:`load_examples` takes any of them."""

from __future__ import annotations

import os
from pathlib import Path

from slimtune.data.readers import LoadResult, _is_datasets_folder, read_examples
from slimtune.data.recipes import RECIPES, is_recipe, run_recipe


def load_examples(path: str | os.PathLike, *, shape: str | None = None, skip_bad: bool = False,
                  source: str | None = None, task_field: str | None = None, id_field: str | None = None,
                  limit: int | None = None, seed: int | None = None) -> LoadResult:
    """Examples from a file, a saved Hugging Face datasets folder, or a recipe (``gsm8k:test``, ``p3``,
    ``tatoeba:fra-eng``; see :func:`slimtune.data.recipes.describe_recipes`).

    Files and folders read as :func:`slimtune.data.readers.read_examples` says (the arguments are its).
    Recipes always sample (seed 0 unless given) and skip bad rows, counting them.
    """
    location = Path(path)
    # A folder that merely shares a recipe's name (shared/data/gsm8k) holds nothing slimtune reads as is.
    if not location.exists() or (location.is_dir() and not _is_datasets_folder(location)):
        if is_recipe(str(path)):
            if shape or source or task_field or id_field:
                raise ValueError("shape, source, task_field and id_field apply to files; a recipe sets its "
                                 "own")
            return run_recipe(str(path), limit=limit, seed=seed or 0)
        if not location.exists():
            raise FileNotFoundError(f"{path}: no such file or folder, and not a recipe (known recipes: "
                                    f"{', '.join(RECIPES)})")
    return read_examples(path, shape=shape, skip_bad=skip_bad, source=source, task_field=task_field,
                         id_field=id_field, limit=limit, seed=seed)
