"""slimtune: fine-tune LLMs on less data (LESS, DELIFT, UDS, SLAP and the baselines users compare against).

The public API, imported lazily so that ``import slimtune`` and the CLI start fast:
``load_examples``, ``Example``, ``load_model``, ``get_selector``, ``Budget``, ``Selection``, ``get_policy``,
``train``, ``TrainSettings``, ``evaluate``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.1"

_EXPORTS = {
    "Example": "slimtune.data.example",
    "load_examples": "slimtune.data",
    "load_model": "slimtune.models",
    "get_selector": "slimtune.select",
    "Budget": "slimtune.select",
    "Selection": "slimtune.select",
    "get_policy": "slimtune.online",
    "train": "slimtune.train",
    "TrainSettings": "slimtune.train",
    "evaluate": "slimtune.evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimtune' has no attribute '{name}'")


__all__ = sorted(_EXPORTS)
