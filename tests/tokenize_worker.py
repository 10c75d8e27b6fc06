"""One rank of a ``torchrun`` job building a TokenizedDataset: the two-process test runs it.

Usage: ``torchrun --nproc_per_node N tests/tokenize_worker.py CACHE_DIR REPORT_DIR``. Each rank reports how
many batches it tokenised itself and the rows it sees.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState

import slimtune.data.tokenize as tokenize
from slimtune.data.recipes import load_recipe
from slimtune.models import load_tokenizer


def pool():
    return load_recipe("gsm8k:train", limit=6, seed=0) + load_recipe("taskmaster4", limit=3, seed=0)


def main(cache_dir: str, report_dir: str) -> None:
    batches = 0
    encode = tokenize._encode_batch

    def counted(*args, **kwargs):
        nonlocal batches
        batches += 1
        return encode(*args, **kwargs)

    tokenize._encode_batch = counted
    data = tokenize.TokenizedDataset(pool(), load_tokenizer("tiny"), 96, cache_dir=cache_dir)
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    report = {"batches": batches, "rows": [data[i] for i in range(len(data))], "stats": data.stats.summary()}
    (Path(report_dir) / f"rank-{PartialState().process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
