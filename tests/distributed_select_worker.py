"""Every offline method as one rank of a ``torchrun`` job (or alone): tests/test_distributed_select.py runs it.

Usage: ``[torchrun --nproc_per_node N] tests/distributed_select_worker.py REPORT_DIR DATA_DIR``. Stores go
under ``SLIMTUNE_CACHE``, which the caller makes private to the run: they are what the ranks share.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from helpers import gsm8k_examples

from slimtune.data.example import make_example
from slimtune.models import cache_dir, choose_device, device_for_rank
from slimtune.select import get_selector

TINY = {"model": "tiny", "max_length": 64}
#: name -> (method, parameters): shards of a few rows, so that both ranks of a 2-process run compute some
METHODS = {
    "random": ("random", {"seed": 1}),
    "length": ("length", {"model": "tiny"}),
    "loss": ("loss", {**TINY, "batch_size": 4, "shard_rows": 7}),
    "ifd": ("ifd", {**TINY, "batch_size": 4, "shard_rows": 7}),
    "kcenter-model": ("kcenter", {**TINY, "embedding": "model", "batch_size": 4, "shard_rows": 7}),
    "kcenter-minilm": ("kcenter", {"shard_rows": 7, "seed": 2}),
    "less": ("less", {**TINY, "warmup": False, "training": {"lora": {"r": 4, "alpha": 8}}, "proj_dim": 256,
                      "grad_batch_size": 4, "shard_rows": 7}),
    "delift-sparse": ("delift", {"model": "tiny", "sparse_k": 4, "max_text_tokens": 32}),
    "delift-se": ("delift-se", {}),
    "delift-se-sparse": ("delift-se", {"sparse_k": 4}),
}


def translations(data: Path, n: int):
    french = open(data / "tatoeba" / "tatoeba.fra-eng.fra").read().splitlines()[:n]
    english = open(data / "tatoeba" / "tatoeba.fra-eng.eng").read().splitlines()[:n]
    return [make_example([{"role": "user", "content": f"Translate to English: {f}"},
                          {"role": "assistant", "content": e}], task="translate") for f, e in zip(french, english)]


def main(report_dir: str, data_dir: str) -> None:
    device = choose_device()  # first, as the CLI does: accelerate's state sets up the process group
    state = PartialState()
    data = Path(data_dir)
    math = gsm8k_examples(data, 16)
    pool, target = math[:12] + translations(data, 12), math[12:]
    report = {"process_index": state.process_index, "device": str(device),
              "device_with_two_gpus": str(device_for_rank(state.local_process_index, 2)), "selections": {}}
    for name, (method, params) in METHODS.items():
        if method in ("less", "delift"):
            params = {**params, "cache_dir": str(cache_dir())}
        selection = get_selector(method, **params).select(pool, 8, target=target)
        report["selections"][name] = {"kept": selection.kept, "scores": selection.scores.tolist(),
                                      "forward_tokens": selection.cost.forward_tokens}
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    (Path(report_dir) / f"rank-{state.process_index}.json").write_text(json.dumps(report))
    state.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
