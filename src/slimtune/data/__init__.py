"""Data in, data out: examples from files, datasets folders and recipes, and subsets written back in the
user's own format. Tokenisation lives in :mod:`slimtune.data.tokenize`, imported on its own (it needs torch).
"""

from slimtune.data.errors import DataError
from slimtune.data.example import Example, make_example
from slimtune.data.readers import LoadReport, LoadResult, read_examples
from slimtune.data.recipes import RECIPES, describe_recipes, load_recipe, run_recipe
from slimtune.data.shapes import SHAPES
from slimtune.data.sources import load_examples
from slimtune.data.writers import write_examples

__all__ = ["RECIPES", "SHAPES", "DataError", "Example", "LoadReport", "LoadResult", "describe_recipes",
           "load_examples", "load_recipe", "make_example", "read_examples", "run_recipe", "write_examples"]
