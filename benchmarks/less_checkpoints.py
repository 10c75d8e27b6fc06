"""How much LESS's selection depends on each warm-up checkpoint, from a finished `slimtune bench` grid's cache.

LESS sums the train-target cosines of every warm-up checkpoint (weighted by its epoch's learning rate), and
extracting features costs one forward and backward per pool row and checkpoint: in `cpu-targeted` (two
checkpoints) that is about 2 x 4 minutes per seed. Before the grid drops a checkpoint to save time, this
measures what it would change: for every seed and target of the grid's ``less`` method, the selection from
each checkpoint alone against the selection from all of them (top-k overlap at the grid's budgets and
Spearman of the scores). Nothing is trained or extracted: the warm-ups and the per-checkpoint feature stores
are read from the grid's cache (a checkpoint alone is given to the selector as its own run folder).

    .venv/bin/python benchmarks/less_checkpoints.py --grid-out runs/bench/cpu-targeted   # ~2 minutes

Prints the table and writes benchmarks/results/less_checkpoints.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from slimtune.bench.config import load_config
from slimtune.bench.runner import GridRunner
from slimtune.select import get_selector

HERE = Path(__file__).resolve().parent


def ranking(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="src/slimtune/bench/configs/cpu-targeted.yaml")
    parser.add_argument("--grid-out", type=Path, required=True, help="the grid's output folder (its cache)")
    parser.add_argument("--label", default="less", help="the grid method's label")
    args = parser.parse_args()

    config = load_config(args.config)
    data = GridRunner(config, args.grid_out).data
    method = next(m for m in config.methods if m.label == args.label)
    sizes = sorted({max(1, round(b * len(data.pool))) for b in config.budgets})
    rows = []
    for seed in config.seeds:
        for target, examples in data.targets.items():
            params = {**method.params, "model": config.model, "cache_dir": str(args.grid_out / "cache"),
                      "seed": seed, "diverse": False}
            every = get_selector("less", **params).select(data.pool, sizes[-1], target=examples)
            checkpoints = [c["path"] for c in every.cost.details["less"]["checkpoints"]]
            for number, path in enumerate(checkpoints, 1):
                alone = Path(tempfile.mkdtemp())
                os.symlink(path, alone / Path(path).name)
                one = get_selector("less", **{**params, "checkpoints": str(alone)}).select(
                    data.pool, sizes[-1], target=examples)
                a, b = ranking(every.scores), ranking(one.scores)
                row = {"target": target, "seed": seed, "checkpoint": number, "of": len(checkpoints),
                       "spearman": float(spearmanr(np.nan_to_num(every.scores), np.nan_to_num(one.scores)).statistic)}
                row.update({f"top_{k}_overlap": len(set(a[:k]) & set(b[:k])) / k for k in sizes})
                rows.append(row)
                print(json.dumps(row), flush=True)
    columns = [f"top_{k}_overlap" for k in sizes]
    print(f"\n| target | seed | checkpoint alone | {' | '.join(f'top-{k} overlap' for k in sizes)} | Spearman |")
    print("| --- | --- | --- |" + " --- |" * (len(sizes) + 1))
    for r in rows:
        print(f"| {r['target']} | {r['seed']} | {r['checkpoint']} of {r['of']} | "
              + " | ".join(f"{r[c]:.2f}" for c in columns) + f" | {r['spearman']:.4f} |")
    # the grid's name and settings, not this machine's paths: a reader elsewhere can rerun it from them
    (HERE / "results" / "less_checkpoints.json").write_text(json.dumps(
        {"config": config.name, "less_params": method.params, "seeds": list(config.seeds), "rows": rows},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
