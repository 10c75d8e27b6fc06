"""SLAP ablation: full SLAP against SLAP without each component, UDS, big-loss, uniform and full data.

Pool: Tatoeba French/German/Spanish -> English and GSM8K training rows (drawn with ``--data-seed``); held out:
the same tasks' test rows. Model: the embedded SmolLM2-135M-Instruct with LoRA (r=8 on q/k/v/o), one
epoch-equivalent, max length 192. Per-step methods draw candidate batches of B rows and backpropagate
K = keep x B of them; ``slap (per epoch)`` scores the whole pool at the epoch start and trains on the kept share
in batches of K; full data trains every row in batches of B, so every run takes the same optimiser steps. Each
method runs once per ``--seeds`` seed (LoRA init, batch order, the policies' draws) on the same pool.

``--corrupt SHARE`` gives every method a pool with a skewed loss distribution: that share of rows get another
corrupted row's response (the bench's ``swap``), so they form a long high-loss tail a selector can chase. It is
the case stratification is meant for: top-score selection fills the batch from the tail, quantile strata give
it only its share of slots. Such runs also report the share of backpropagated rows that were corrupted.

Reported per method (mean over seeds, ± standard error where there are several): rows and tokens
backpropagated, wall seconds of the training call (scoring included), held-out response loss per task and their
mean, and chrF of greedy translations (first line) of a few held-out sentences.

    .venv/bin/python benchmarks/slap_ablation.py --seeds 0 1 2                    # every method
    .venv/bin/python benchmarks/slap_ablation.py --corrupt 0.2 --methods slap "slap -stratify" big-loss uniform

Results are cached per method and seed in the JSON (keyed by the configuration), so an interrupted run resumes
and adding a seed runs only that seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from readme import command_line, replace_section

from slimtune.bench.pool import corrupt
from slimtune.data.recipes import load_recipe
from slimtune.evaluate.generation import generate
from slimtune.evaluate.metrics import chrf, first_line
from slimtune.evaluate.scoring import target_loss
from slimtune.models import LoraSettings, load_model
from slimtune.online.policies.slap import SLAPPolicy
from slimtune.online.pruning import LOG_NAME, train_pruned
from slimtune.online.trainer import read_selection_log, train_online
from slimtune.train import TrainSettings, load_trained, train
from slimtune.utils import write_json

HERE = Path(__file__).resolve().parent
RESULTS = {False: HERE / "results" / "slap_ablation.json", True: HERE / "results" / "slap_ablation_noisy.json"}
HEADING = {False: "## SLAP ablation", True: "## SLAP ablation, noisy pool"}
PAIRS = "fra-eng,deu-eng,spa-eng"

#: name -> (how it trains, policy parameters): "step" selects K of B per step, "epoch" prunes the pool.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "slap": ("step", {}),
    "slap -stratify": ("step", {"stratify": False}),
    "slap -diversity": ("step", {"diversity": False}),
    "slap -curvature": ("step", {"curvature": False}),
    "slap -learnability": ("step", {"learnability": False}),
    "slap (per epoch)": ("epoch", {}),
    "uds": ("step", {}),
    "big-loss": ("step", {}),
    "uniform": ("step", {}),
    "full data": ("full", {}),
}


def build_data(args) -> tuple[list, list, set[str]]:
    """The pool, the held-out rows, and the ids of the pool rows given a swapped response."""
    seed = args.data_seed
    pool = (load_recipe("tatoeba", split="train", limit=args.translation_rows, seed=seed, pairs=PAIRS)
            + load_recipe("gsm8k", split="train", limit=args.qa_rows, seed=seed))
    pool, corrupted = corrupt(pool, args.corrupt, ("swap",), seed)
    held_out = (load_recipe("tatoeba", split="test", limit=args.eval_rows * 3, seed=seed, pairs=PAIRS)
                + load_recipe("gsm8k", split="test", limit=args.eval_rows, seed=seed))
    return pool, held_out, corrupted


def evaluate(model, tokenizer, held_out: list, translations: int) -> dict[str, Any]:
    by_task = target_loss(model, tokenizer, held_out).by_task(held_out)
    losses = {task: round(row["loss"], 4) for task, row in by_task.items()}
    out: dict[str, Any] = {"loss": losses, "mean_loss": round(sum(losses.values()) / len(losses), 4)}
    if translations:
        rows = [ex for ex in held_out if ex.task != "gsm8k"][:translations]
        texts = generate(model, tokenizer, rows, max_new_tokens=40, batch_size=8, progress=False)
        out["chrf"] = round(chrf([first_line(t) for t in texts], [ex.response for ex in rows]), 2)
    return out


def run_method(name: str, seed: int, pool: list, corrupted: set[str], args, workdir: Path) -> dict[str, Any]:
    kind, params = METHODS[name]
    k = round(args.keep * args.candidates)
    settings = TrainSettings(
        output_dir=str(workdir / f"{name.replace(' ', '_')}-s{seed}"), epochs=1,
        batch_size=k if kind == "epoch" else args.candidates, learning_rate=args.lr, max_length=args.max_length,
        seed=seed, lora=LoraSettings(r=8, alpha=16, dropout=0.0), progress=False, logging_steps=5)
    if kind == "full":
        result = train(pool, model="smollm2", settings=settings)
        trained = [ex.id for ex in pool]
    elif kind == "epoch":
        result = train_pruned(pool, SLAPPolicy(**params), keep=args.keep, model="smollm2", settings=settings)
        log = (result.output_dir / LOG_NAME).read_text().splitlines()
        trained = [eid for line in log for eid in json.loads(line)["kept_ids"]]
    else:
        policy = SLAPPolicy(**params) if name.startswith("slap") else name
        result = train_online(pool, policy, keep=k, model="smollm2", settings=settings)
        trained = [eid for step in read_selection_log(result.output_dir) for eid in step["chosen_ids"]]
    row = {"rows_seen": result.examples_seen, "tokens_seen": result.tokens_seen,
           "train_seconds": round(result.seconds, 1), "run_dir": str(result.output_dir)}
    if corrupted:
        row["corrupted_kept"] = round(sum(eid in corrupted for eid in trained) / len(trained), 4)
    return row


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    return statistics.fmean(values), se


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean, se = _mean_se(values)
    return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def table(runs: dict[str, dict[str, dict[str, Any]]], pool_size: int, pool_corrupted: float) -> str:
    """One line per method: means over its seeds (± standard error), seeds counted."""
    tasks = sorted(next(iter(next(iter(runs.values())).values()))["loss"])
    noisy = pool_corrupted > 0
    head = ["method", "seeds", "rows seen", "share", "train s", *[f"loss {t}" for t in tasks], "mean loss",
            "chrF", *([f"corrupted kept (pool {pool_corrupted:.0%})"] if noisy else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, by_seed in runs.items():
        rows = list(by_seed.values())

        def values(key: str, rows: list[dict[str, Any]] = rows) -> list[float]:
            return [r[key] for r in rows if r.get(key) is not None]

        seen = values("rows_seen")
        cells = [name, str(len(rows)), _cell(seen, 0), f"{seen[0] / pool_size:.0%}" if seen else "-",
                 _cell(values("train_seconds"), 0),
                 *[_cell([r["loss"][t] for r in rows], 4) for t in tasks],
                 _cell(values("mean_loss"), 4), _cell(values("chrf"), 2),
                 *([_cell(values("corrupted_kept"), 3)] if noisy else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="NAME")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--translation-rows", type=int, default=110)
    parser.add_argument("--qa-rows", type=int, default=40)
    parser.add_argument("--corrupt", type=float, default=0.0,
                        help="share of pool rows given another row's response (a high-loss tail)")
    parser.add_argument("--eval-rows", type=int, default=12, help="held-out rows per task")
    parser.add_argument("--translations", type=int, default=12, help="held-out sentences for chrF (0: none)")
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--candidates", type=int, default=10, help="B, the candidate batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--data-seed", type=int, default=0, help="draws the pool, the held-out rows, corruption")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    noisy = args.corrupt > 0
    out = args.out or RESULTS[noisy]
    config = {k: v for k, v in vars(args).items() if k not in ("methods", "seeds", "threads", "out", "no_readme")}
    cached = json.loads(out.read_text()) if out.exists() else {}
    runs: dict[str, dict[str, dict[str, Any]]] = cached.get("runs", {}) if cached.get("config") == config else {}

    pool, held_out, corrupted = build_data(args)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="slap_ablation-"))
    try:
        for name in ["untrained", *args.methods]:
            for seed in args.seeds[:1] if name == "untrained" else args.seeds:
                if str(seed) in runs.get(name, {}):
                    continue
                if name == "untrained":
                    row: dict[str, Any] = {}
                    model, tokenizer = load_model("smollm2")
                else:
                    row = run_method(name, seed, pool, corrupted, args, workdir)
                    model, tokenizer = load_trained(row.pop("run_dir"))
                row.update(evaluate(model, tokenizer, held_out, args.translations))
                runs.setdefault(name, {})[str(seed)] = row
                print(f"{name} seed {seed}: {row}", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                write_json(out, {"config": config, "runs": runs, "machine": machine()})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ordered = {name: runs[name] for name in ["untrained", *METHODS] if name in runs}
    text = table(ordered, len(pool), len(corrupted) / len(pool))
    print(text)
    print(f"{time.perf_counter() - started:.0f} s")
    if not args.no_readme:
        command = command_line("slap_ablation.py", sys.argv[1:])
        pool_text = (f"{args.translation_rows} Tatoeba {PAIRS}, {args.qa_rows} GSM8K"
                     + (f", {len(corrupted)} of them given another row's response" if noisy else ""))
        replace_section(HEADING[noisy], f"`{command}` on {machine()}; pool {len(pool)} rows ({pool_text}), "
                        f"{len(held_out)} held out, keep {args.keep}, B = {args.candidates}, lr {args.lr}, "
                        f"max length {args.max_length}, data seed {args.data_seed}. Each line: mean over its "
                        f"seeds ± standard error. Loss: held-out response loss per task (lower is better); chrF "
                        f"on {args.translations} held-out translations. Runs are cached per method and seed, "
                        f"so they may come from different invocations; load average {os.getloadavg()[0]:.1f} "
                        f"at the end of this one. Results: `{shown_path(out)}`.\n\n{text}\n")


def shown_path(path: Path) -> Path:
    path = path.resolve()
    return path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
