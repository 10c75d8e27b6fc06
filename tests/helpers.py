"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

import json

from slimtune.data.example import make_example


def gsm8k_examples(shared_data, n):
    """The first ``n`` GSM8K training rows as single-turn examples, in file order."""
    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "train.jsonl")][:n]
    return [make_example([{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}], task="gsm8k") for r in rows]
