"""Shared fixtures. Models come from the user's slimtune cache (built once, reused across runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"the shared data folder {SHARED_DATA} is not beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny():
    """``(model, tokenizer)``: a 2-layer random Llama with SmolLM2's tokenizer, in eval mode on the CPU."""
    from slimtune.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]
