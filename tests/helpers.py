"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

import json
from pathlib import Path

from slimtune.data.example import make_example


def gsm8k_examples(shared_data, n):
    """The first ``n`` GSM8K training rows as single-turn examples, in file order."""
    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "train.jsonl")][:n]
    return [make_example([{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}], task="gsm8k") for r in rows]


def private_cache(root: Path) -> Path:
    """A slimtune cache folder under ``root`` that shares the user's built models (linked) but none of their
    stored features, so a test's feature stores start empty."""
    from slimtune.models import cache_dir

    shared = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("tiny-llama", "smollm2-135m-instruct"):
        if (shared / name).exists() and not (root / name).exists():
            (root / name).symlink_to(shared / name)
    return root
