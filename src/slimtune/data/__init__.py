"""Data in, data out: examples from files, datasets (folders, Hub ids, objects) and recipes, and subsets written
back in the user's own format, as a datasets folder or as indices. Tokenisation lives in
:mod:`slimtune.data.tokenize`, imported on its own (it needs torch).
"""

from slimtune.data.errors import DataError
from slimtune.data.example import Example, make_example
from slimtune.data.loading import as_examples, load_examples
from slimtune.data.recipes import RECIPES, describe_recipes, load_recipe, run_recipe
from slimtune.data.report import LoadReport, LoadResult
from slimtune.data.shapes import SHAPES
from slimtune.data.writers import write_examples

__all__ = ["RECIPES", "SHAPES", "DataError", "Example", "LoadReport", "LoadResult", "as_examples",
           "describe_recipes", "load_examples", "load_recipe", "make_example", "run_recipe", "write_examples"]
