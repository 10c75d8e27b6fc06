"""Shared fixtures. Models come from the user's slimtune cache (built once, reused across runs)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fault tests fork the runs they kill; the child of a process whose OpenMP thread pool has started can hang
# on a lock another pool thread held at the fork (seen here: a forked run waited forever with 2 threads). One
# intra-op thread from the start means no pool exists to fork.
os.environ.setdefault("OMP_NUM_THREADS", "1")



@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """Real rows: the shared data folder (``$SLIMTUNE_SHARED_DATA``, else ``../shared/data``) when there is one,
    else the sample bundled with slimtune, so that a plain clone runs every test that needs real rows.

    Tests take the first rows of a file and expect them to fit a short token window, as the first rows of the
    full GSM8K and Tatoeba files do; the sample's rows are a random draw, so its copy here lists them shortest
    first (Tatoeba's two files stay line-aligned). Other files are the sample's, unchanged."""
    from slimtune.data.recipes import SAMPLE_DIR, shared_data_dir

    shared = shared_data_dir()
    if shared is not None:
        return shared
    root = tmp_path_factory.mktemp("sample_shortest_first")
    shutil.copytree(SAMPLE_DIR, root, dirs_exist_ok=True)
    for name in ("train", "test"):
        path = root / "gsm8k" / f"{name}.jsonl"
        path.write_text("".join(sorted(path.read_text(encoding="utf-8").splitlines(keepends=True), key=len)),
                        encoding="utf-8")
    foreign, english = (root / "tatoeba" / f"tatoeba.fra-eng.{code}" for code in ("fra", "eng"))
    pairs = sorted(zip(_lines(foreign), _lines(english)), key=lambda pair: len(pair[0]) + len(pair[1]))
    for path, lines in ((foreign, [f for f, _ in pairs]), (english, [e for _, e in pairs])):
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


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
