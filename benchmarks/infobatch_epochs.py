"""InfoBatch's saving over whole epochs: the same pool trained for the same epochs with full data and with
InfoBatch, wall and CPU time of each whole run and held-out loss.

InfoBatch (Qin et al., ICLR 2024) prunes at the sampler from the previous epoch's training losses: the first
epoch trains every row; each later one drops a random share r = 0.5 of the rows whose loss was below the mean
(the kept ones' gradients weighted by 1 / (1 - r)), and the last 12.5% of epochs train everything again. Its
saving is fewer optimiser steps, so it shows only over several epochs, which `benchmarks/online.py` (a few
steps per policy, times per step) cannot show. Issue 15's target: >= 20% less wall time than full-data
training at equal held-out loss.

Both runs use what a user gets: full data through `slimtune.train.train` (the stock Trainer), InfoBatch
through `train_online` (its loss-hook trainer); same pool, seed, model, LoRA, learning rate and epochs. With
``--repeats 2`` the order is full, InfoBatch, InfoBatch, full, so a drifting machine load falls on both alike.

The defaults (64 rows, batches of 8, 5 epochs) leave room for the saving to show: an epoch keeps whole batches
(pruned rows are restored up to a multiple of the batch), so a pool of a few batches prunes nothing, and the
first epoch and the annealed tail train every row. With half the rows below the mean loss, the most r = 0.5
can save is a quarter of each pruned epoch: here 4 of 5 epochs, at most 20% of the steps.

    .venv/bin/python benchmarks/infobatch_epochs.py        # ~25 min on 2 idle CPU cores (SmolLM2-135M)

Prints the table and writes benchmarks/results/infobatch_epochs.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from online import gsm8k, held_out_loss, now, since

from slimtune.models import LoraSettings
from slimtune.online import get_policy
from slimtune.online.trainer import train_online
from slimtune.train import TrainSettings, train

HERE = Path(__file__).resolve().parent


def run(name: str, repeat: int, pool: list, held_out: list, args) -> dict:
    run_dir = args.out / f"{name}-{repeat}"
    settings = TrainSettings(output_dir=str(run_dir), epochs=args.epochs, batch_size=args.batch_size,
                             learning_rate=args.lr, max_length=256, seed=args.seed,
                             lora=LoraSettings(r=8, alpha=16), progress=False, logging_steps=1)
    started = now()
    if name == "full":
        result = train(pool, model=args.model, settings=settings)
    else:
        result = train_online(pool, get_policy("infobatch", seed=args.seed), keep=1.0, model=args.model,
                              settings=settings)
    wall, cpu = since(started)
    steps = max(row.get("step", 0) for row in result.log_history)
    return {"method": name, "repeat": repeat, "wall_seconds": wall, "cpu_seconds": cpu, "steps": steps,
            "examples_trained": result.examples_seen, "tokens_trained": result.tokens_seen,
            "held_out_loss": held_out_loss(run_dir, held_out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, choices=(1, 2))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-infobatch-epochs"))
    args = parser.parse_args()

    pool, held_out = gsm8k("train", args.pool, seed=args.seed), gsm8k("test", args.held_out)
    order = ["full", "infobatch"] + (["infobatch", "full"] if args.repeats == 2 else [])
    rows = []
    for i, name in enumerate(order):
        rows.append(run(name, i, pool, held_out, args))
        print(json.dumps(rows[-1]), flush=True)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(r[key] for r in rows if r["method"] == name)

    summary = {key: 1 - mean("infobatch", key) / mean("full", key) for key in ("wall_seconds", "cpu_seconds")}
    summary["held_out_loss_difference"] = mean("infobatch", "held_out_loss") - mean("full", "held_out_loss")
    print("\n| method | run | wall s | CPU s | steps | rows trained | tokens trained | held-out loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['repeat']} | {r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['steps']} | "
              f"{r['examples_trained']} | {r['tokens_trained']:,} | {r['held_out_loss']:.4f} |")
    print(f"\nInfoBatch saves {summary['wall_seconds']:.0%} of full data's wall time ({summary['cpu_seconds']:.0%} "
          f"of its CPU time); held-out loss {summary['held_out_loss_difference']:+.4f} against full "
          "(target: >= 20% at equal loss)")
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
               "runs": rows, "summary": summary}
    (HERE / "results" / "infobatch_epochs.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
