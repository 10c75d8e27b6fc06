"""DELIFT's utility kernel, dense versus sparse: cost, agreement and the quality of what each selects.

1. Cost at scale, counted (nothing runs): model tokens the dense kernel (n^2 pairs) and the sparse kernel
   (k nearest candidates by all-MiniLM-L6-v2 embedding, n * k pairs) need for a ``--count-rows`` mix pool of
   GSM8K, P3 and Tatoeba rows, with and without sharing each in-context example's prefix; the sparse counts
   are exact, from the real neighbours.
2. Dense versus sparse on a small pool of short rows (Tatoeba fra->eng, eng->fra and short P3 rows), with the
   embedded SmolLM2-135M-Instruct: model tokens, wall and CPU seconds, the FL selection at ``--budget`` of
   each kernel, its overlap with the dense kernel's, and the held-out target loss after LoRA fine-tuning on
   each subset, beside DELIFT(SE), random subsets and the untuned model.

Facility location's own speed on a 20,000-row sparse kernel is measured by ``benchmarks/submodular_speed.py``.

    .venv/bin/python benchmarks/delift_kernel.py                      # about 20 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/delift_kernel.py --dense-rows 16 --no-train  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from readme import command_line, replace_section

from slimtune.data.example import Example
from slimtune.data.recipes import load_recipe
from slimtune.features.embeddings import knn, minilm_embeddings
from slimtune.features.utility import InContextUtility
from slimtune.models import LoraSettings, load_model, load_tokenizer
from slimtune.select import get_selector

RESULTS = Path(__file__).resolve().parent / "results" / "delift_kernel.json"
HEADING = "## DELIFT kernel: dense versus sparse"
SHORT_TASKS = ("tatoeba:fra-eng", "tatoeba:eng-fra", "p3")


def short_rows(spec: str, split: str, n: int, max_chars: int, seed: int) -> list[Example]:
    """``n`` seeded rows of ``spec`` whose prompt and response together are at most ``max_chars`` long."""
    rows = [ex for ex in load_recipe(spec, split=split, seed=seed)
            if len(ex.prompt_text) + len(ex.response) <= max_chars]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def small_pool(n: int, held_out: int, max_chars: int, seed: int) -> tuple[list[Example], list[Example]]:
    per_task = -(-n // len(SHORT_TASKS))
    pool = [ex for spec in SHORT_TASKS for ex in short_rows(spec, "train", per_task, max_chars, seed)][:n]
    evals = [ex for spec in SHORT_TASKS
             for ex in short_rows(spec, "test", held_out // len(SHORT_TASKS), max_chars, seed)]
    return pool, evals


def task_group(example: Example) -> str:
    return example.task if example.task in ("fra-eng", "eng-fra") else "p3"


def count_at_scale(n: int, k: int, max_text_tokens: int, seed: int) -> dict:
    share = {"gsm8k": 0.25, "p3": 0.5, "tatoeba:fra-eng,deu-eng,spa-eng": 0.25}
    pool = [ex for spec, s in share.items() for ex in load_recipe(spec, limit=round(s * n), seed=seed)][:n]
    tokenizer = load_tokenizer("smollm2")
    start = time.perf_counter()
    embeddings = minilm_embeddings(pool)
    neighbours = knn(embeddings, embeddings, k)[1].numpy()
    out = {"rows": len(pool), "k": k, "max_text_tokens": max_text_tokens,
           "embed_knn_seconds": time.perf_counter() - start}
    for reuse in (False, True):
        utility = InContextUtility(None, tokenizer, max_text_tokens=max_text_tokens, prefix_reuse=reuse,
                                   cache=False)
        for name, count in (("dense", utility.count_tokens(pool)),
                            ("sparse", utility.count_tokens(pool, neighbours=neighbours))):
            label = name if reuse else f"{name} whole sequences"
            out[label] = {"pairs": count.pairs, "model_tokens": count.tokens}
    out["dense_over_sparse"] = out["dense"]["model_tokens"] / out["sparse"]["model_tokens"]
    return out


def fine_tuned_loss(subset: list[Example], evals: list[Example], out: Path, args) -> float:
    from slimtune.evaluate import target_loss
    from slimtune.train import TrainSettings, load_trained, train

    settings = TrainSettings(output_dir=str(out), epochs=args.epochs, batch_size=4, learning_rate=args.lr,
                             max_length=256, lora=LoraSettings(r=8, alpha=16, dropout=0.0), progress=False,
                             seed=args.seed)
    train(subset, model="smollm2", settings=settings)
    model, tokenizer = load_trained(out, device="cpu")
    return target_loss(model, tokenizer, evals).loss


def dense_versus_sparse(args) -> dict:
    pool, evals = small_pool(args.dense_rows, args.eval_rows, args.max_chars, args.seed)
    common = dict(model="smollm2", max_text_tokens=args.max_text_tokens, cache=False, device="cpu")
    methods = {"DELIFT dense": get_selector("delift", sparse_k=None, **common)}
    methods |= {f"DELIFT sparse k={k}": get_selector("delift", sparse_k=k, **common) for k in args.small_k}
    methods |= {"DELIFT(SE)": get_selector("delift-se", device="cpu")}
    methods |= {f"random seed {s}": get_selector("random", seed=s) for s in range(args.random_seeds)}
    groups = sorted({task_group(ex) for ex in pool})
    rows = {}
    for name, selector in methods.items():
        cpu = time.process_time()
        selection = selector.select(pool, args.budget)
        kept = set(selection.kept_ids)
        rows[name] = {"kept": selection.kept_ids, "seconds": selection.cost.seconds,
                      "cpu_seconds": time.process_time() - cpu, "model_tokens": selection.cost.forward_tokens,
                      "pairs": selection.cost.details.get("pool_kernel_pairs_scored"),
                      "tasks": {g: sum(task_group(ex) == g for ex in pool if ex.id in kept) for g in groups}}
        print(f"{name}: {rows[name]['seconds']:.1f} s, {rows[name]['model_tokens']} model tokens", flush=True)
    dense_kept = set(rows["DELIFT dense"]["kept"])
    for row in rows.values():
        row["overlap_with_dense"] = len(set(row["kept"]) & dense_kept) / len(dense_kept)
    base_loss = None
    if args.train:
        from slimtune.evaluate import target_loss

        model, tokenizer = load_model("smollm2", device="cpu")
        base_loss = target_loss(model, tokenizer, evals).loss
        del model
        by_id = {ex.id: ex for ex in pool}
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, row) in enumerate(rows.items()):
                subset = [by_id[j] for j in row["kept"]]
                row["target_loss"] = fine_tuned_loss(subset, evals, Path(tmp) / str(i), args)
                print(f"{name}: target loss {row['target_loss']:.4f}", flush=True)
    return {"pool_rows": len(pool), "eval_rows": len(evals), "budget": args.budget,
            "pool_tasks": {g: sum(task_group(ex) == g for ex in pool) for g in groups},
            "untuned_target_loss": base_loss, "methods": rows}


def table(results: dict) -> str:
    count, small = results["count"], results["small"]
    lines = [f"Kernel cost for a {count['rows']:,}-row mix pool (GSM8K, P3, Tatoeba; counted, not run; "
             f"texts clipped to {count['max_text_tokens']} tokens; sparse = {count['k']} MiniLM neighbours "
             "per row):", "", "| kernel | pairs | model tokens | hours at 520 tokens/s |",
             "| --- | ---: | ---: | ---: |"]
    for name in ("dense whole sequences", "dense", "sparse whole sequences", "sparse"):
        c = count[name]
        label = name.replace("sparse", f"sparse k={count['k']}")
        label += "" if "whole" in name else ", prefix reuse"
        hours = c["model_tokens"] / 520 / 3600
        lines.append(f"| {label} | {c['pairs']:,} | {c['model_tokens']:,} | {hours:.1f} |")
    lines += ["", f"Dense / sparse model tokens (both with prefix reuse): {count['dense_over_sparse']:.1f}x.",
              "", f"Dense vs sparse on {small['pool_rows']} short rows ({small['pool_tasks']}): FL keeps "
              f"{small['budget']:.0%}; LoRA on each subset; target loss on {small['eval_rows']} held-out "
              f"rows (untuned model: {_fmt(small['untuned_target_loss'])}).", "",
              "| method | pairs | model tokens | wall s | CPU s | overlap with dense | kept per task "
              "| target loss |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, row in small["methods"].items():
        tasks = ", ".join(f"{t} {c}" for t, c in row["tasks"].items())
        lines.append(f"| {name} | {_fmt(row['pairs'])} | {row['model_tokens']:,} | {row['seconds']:.1f} "
                     f"| {row['cpu_seconds']:.1f} | {row['overlap_with_dense']:.0%} | {tasks} "
                     f"| {_fmt(row.get('target_loss'))} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-rows", type=int, default=40)
    parser.add_argument("--eval-rows", type=int, default=36)
    parser.add_argument("--max-chars", type=int, default=150, help="longest prompt + response of a pool row")
    parser.add_argument("--max-text-tokens", type=int, default=48)
    parser.add_argument("--small-k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--count-rows", type=int, default=1000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--count-max-text-tokens", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--random-seeds", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", dest="readme", action="store_false")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {"count": count_at_scale(args.count_rows, args.k, args.count_max_text_tokens, args.seed)}
    print(json.dumps(results["count"]), flush=True)
    results["small"] = dense_versus_sparse(args)
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": args.threads, "load_average_at_end": os.getloadavg()}
    results["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results["total_seconds"] = time.perf_counter() - start
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.readme:
        machine = results["machine"]
        replace_section(HEADING, f"`{command_line('delift_kernel.py', sys.argv[1:])}` on {machine['platform']}, "
                        f"{machine['cpus']} cores, torch {machine['torch']} with {machine['torch_threads']} "
                        f"threads ({results['total_seconds']:.0f} s in all). Results: "
                        f"`benchmarks/results/{args.out.name}`.\n\n{table(results)}")


if __name__ == "__main__":
    main()
