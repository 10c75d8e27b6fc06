"""Shared fixtures. Models come from the user's slimtune cache (built once, reused across runs)."""

from __future__ import annotations

import json
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


@pytest.fixture
def write_jsonl(tmp_path):
    """``write(rows, name)`` writes a JSONL file in tmp_path: dicts as JSON, str or bytes rows verbatim."""

    def write(rows, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, bytes) else
                 (row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)).encode("utf-8")
                 for row in rows]
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        return path

    return write
