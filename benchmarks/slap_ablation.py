"""SLAP ablation: full SLAP against SLAP without each component, UDS, big-loss, uniform and full data.

Pool: Tatoeba French/German/Spanish -> English and GSM8K training rows (seeded draws); held out: the same
tasks' test rows. Model: the embedded SmolLM2-135M-Instruct with LoRA (r=8 on q/k/v/o), one epoch-equivalent,
max length 192. Per-step methods draw candidate batches of B rows and backpropagate K = keep x B of them;
``slap (per epoch)`` scores the whole pool at the epoch start and trains on the kept share in batches of K;
full data trains every row in batches of B, so every run takes the same optimiser steps. Reported per run:
rows and tokens backpropagated, wall seconds of the training call (scoring included), held-out response loss
per task and their mean, and chrF of greedy translations (first line) of a few held-out sentences.

    .venv/bin/python benchmarks/slap_ablation.py                      # every method, ~20 min on 2 cores
    .venv/bin/python benchmarks/slap_ablation.py --methods slap uniform --translations 0

Results are cached per method in the JSON (keyed by the configuration), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from readme import command_line, replace_section

from slimtune.data.recipes import load_recipe
from slimtune.evaluate.generation import generate
from slimtune.evaluate.metrics import chrf, first_line
from slimtune.evaluate.scoring import target_loss
from slimtune.models import LoraSettings, load_model
from slimtune.online.policies.slap import SLAPPolicy
from slimtune.online.pruning import train_pruned
from slimtune.online.trainer import train_online
from slimtune.train import TrainSettings, load_trained, train
from slimtune.utils import write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "slap_ablation.json"
HEADING = "## SLAP ablation"
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


def build_data(args) -> tuple[list, list]:
    pool = (load_recipe("tatoeba", split="train", limit=args.translation_rows, seed=args.seed, pairs=PAIRS)
            + load_recipe("gsm8k", split="train", limit=args.qa_rows, seed=args.seed))
    held_out = (load_recipe("tatoeba", split="test", limit=args.eval_rows * 3, seed=args.seed, pairs=PAIRS)
                + load_recipe("gsm8k", split="test", limit=args.eval_rows, seed=args.seed))
    return pool, held_out


def evaluate(model, tokenizer, held_out: list, translations: int) -> dict[str, Any]:
    by_task = target_loss(model, tokenizer, held_out).by_task(held_out)
    losses = {task: round(row["loss"], 4) for task, row in by_task.items()}
    out: dict[str, Any] = {"loss": losses, "mean_loss": round(sum(losses.values()) / len(losses), 4)}
    if translations:
        rows = [ex for ex in held_out if ex.task != "gsm8k"][:translations]
        texts = generate(model, tokenizer, rows, max_new_tokens=40, batch_size=8, progress=False)
        out["chrf"] = round(chrf([first_line(t) for t in texts], [ex.response for ex in rows]), 2)
    return out


def run_method(name: str, pool: list, args, workdir: Path) -> dict[str, Any]:
    kind, params = METHODS[name]
    k = round(args.keep * args.candidates)
    settings = TrainSettings(
        output_dir=str(workdir / name.replace(" ", "_")), epochs=1, batch_size=k if kind == "epoch" else
        args.candidates, learning_rate=args.lr, max_length=args.max_length, seed=args.seed,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0), progress=False, logging_steps=5)
    if kind == "full":
        result = train(pool, model="smollm2", settings=settings)
    elif kind == "epoch":
        result = train_pruned(pool, SLAPPolicy(**params), keep=args.keep, model="smollm2", settings=settings)
    else:
        policy = SLAPPolicy(**params) if name.startswith("slap") else name
        result = train_online(pool, policy, keep=k, model="smollm2", settings=settings)
    return {"rows_seen": result.examples_seen, "tokens_seen": result.tokens_seen,
            "train_seconds": round(result.seconds, 1), "run_dir": str(result.output_dir)}


def table(rows: dict[str, dict[str, Any]], pool_size: int) -> str:
    tasks = sorted(next(iter(rows.values()))["loss"])
    head = ["method", "rows seen", "share", "train s", *[f"loss {t}" for t in tasks], "mean loss", "chrF"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, row in rows.items():
        cells = [name, str(row.get("rows_seen", "-")),
                 f"{row['rows_seen'] / pool_size:.0%}" if "rows_seen" in row else "-",
                 str(row.get("train_seconds", "-")), *[f"{row['loss'][t]:.4f}" for t in tasks],
                 f"{row['mean_loss']:.4f}", str(row.get("chrf", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="NAME")
    parser.add_argument("--translation-rows", type=int, default=110)
    parser.add_argument("--qa-rows", type=int, default=40)
    parser.add_argument("--eval-rows", type=int, default=12, help="held-out rows per task")
    parser.add_argument("--translations", type=int, default=12, help="held-out sentences for chrF (0: none)")
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--candidates", type=int, default=10, help="B, the candidate batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {k: v for k, v in vars(args).items() if k not in ("methods", "threads", "out", "no_readme")}
    cached = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows: dict[str, dict[str, Any]] = cached.get("rows", {}) if cached.get("config") == config else {}

    pool, held_out = build_data(args)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="slap_ablation-"))
    try:
        for name in ["untrained", *args.methods]:
            if name in rows:
                continue
            if name == "untrained":
                row: dict[str, Any] = {}
                model, tokenizer = load_model("smollm2")
            else:
                row = run_method(name, pool, args, workdir)
                model, tokenizer = load_trained(row.pop("run_dir"))
            row.update(evaluate(model, tokenizer, held_out, args.translations))
            rows[name] = row
            print(f"{name}: {row}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, {"config": config, "rows": rows, "machine": machine()})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ordered = {name: rows[name] for name in ["untrained", *METHODS] if name in rows}
    text = table(ordered, len(pool))
    print(text)
    print(f"{time.perf_counter() - started:.0f} s")
    if not args.no_readme:
        command = command_line("slap_ablation.py", sys.argv[1:])
        replace_section(HEADING, f"`{command}` on {machine()}; pool {len(pool)} rows "
                      f"({args.translation_rows} Tatoeba {PAIRS}, {args.qa_rows} GSM8K), {len(held_out)} "
                      f"held out, keep {args.keep}, B = {args.candidates}, lr {args.lr}, max length "
                      f"{args.max_length}, seed {args.seed}. Loss: held-out response loss per task "
                      f"(lower is better); chrF on {args.translations} held-out translations. Rows are "
                      f"cached per method, so they may come from different runs; load average "
                      f"{os.getloadavg()[0]:.1f} at the end of this one.\n\n{text}\n")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    main()
