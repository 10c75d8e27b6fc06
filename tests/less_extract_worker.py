"""Gradient-feature extraction as one rank of a ``torchrun`` job (or alone): the two-process test runs it.

Usage: ``[torchrun --nproc_per_node N] tests/less_extract_worker.py STORE_DIR REPORT_DIR DATA_DIR``.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from slimtune.data.example import make_example
from slimtune.data.tokenize import TokenizedDataset
from slimtune.features.gradients import extract_gradient_features
from slimtune.features.projection import SparseJLProjector
from slimtune.features.store import FeatureStore
from slimtune.models import LoraSettings, apply_lora, load_model


def examples(data: Path):
    math = [json.loads(line) for line in open(data / "gsm8k" / "train.jsonl")][:4]
    french = open(data / "tatoeba" / "tatoeba.fra-eng.fra").read().splitlines()[:3]
    english = open(data / "tatoeba" / "tatoeba.fra-eng.eng").read().splitlines()[:3]
    return ([make_example([{"role": "user", "content": r["question"]},
                           {"role": "assistant", "content": r["answer"]}]) for r in math]
            + [make_example([{"role": "user", "content": f"Translate to English: {f}"},
                             {"role": "assistant", "content": e}]) for f, e in zip(french, english)])


def main(store_dir: str, report_dir: str, data_dir: str) -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("gloo")
    model, tokenizer = load_model("tiny", device="cpu")
    torch.manual_seed(0)
    model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # as after some training, so every factor has a gradient
            torch.nn.init.normal_(param, std=0.05)
    data = TokenizedDataset(examples(Path(data_dir)), tokenizer, 96)
    stats = extract_gradient_features(model, data, FeatureStore(store_dir), projector=SparseJLProjector(256),
                                      batch_size=2, shard_rows=2, pad_token_id=tokenizer.pad_token_id)
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    (Path(report_dir) / f"rank-{rank}.json").write_text(json.dumps({"rows": stats.rows, **stats.shards}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
