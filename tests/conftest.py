"""Shared fixtures. Models come from the user's slimtune cache (built once, reused across runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real rows: the shared data folder (``$SLIMTUNE_SHARED_DATA``, else ``../shared/data``) when there is one,
    else the sample bundled with slimtune, which has the same layout and fewer rows, so that a plain clone runs
    every test that needs real rows."""
    from slimtune.data.recipes import SAMPLE_DIR, shared_data_dir

    return shared_data_dir() or SAMPLE_DIR


@pytest.fixture(scope="session")
def full_shared_data() -> Path:
    """The full shared data, for tests of facts about it (row counts, that the sample is drawn from it)."""
    from slimtune.data.recipes import shared_data_dir

    path = shared_data_dir()
    if path is None:
        pytest.skip("the full shared data (../shared/data or $SLIMTUNE_SHARED_DATA) is not here")
    return path


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
