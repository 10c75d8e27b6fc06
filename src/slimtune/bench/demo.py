"""The main job, end to end on the embedded model: targeted selection against random at the same budget.

1. Pool: the bundled sample of real data (GSM8K, P3, Tatoeba, Taskmaster-4 rows, mixed).
2. Target: a few GSM8K training questions that are not in the pool; evaluation: GSM8K test questions.
3. LESS keeps a share of the pool aimed at the target; random keeps the same number (seeded).
4. LoRA fine-tuning on each subset with the same settings and seed.
5. GSM8K exact match and response loss of the untuned model and of both fine-tuned ones, side by side.

Sized to finish within 8 minutes on a 2-core CPU; every step caches in ``out`` so a rerun resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimtune.utils import write_json


@dataclass
class DemoSettings:
    pool_sizes: tuple[tuple[str, int], ...] = (("gsm8k", 80), ("p3", 80), ("tatoeba", 80), ("taskmaster4", 20))
    target_examples: int = 4
    eval_examples: int = 24
    budget: float = 0.15
    max_length: int = 256
    epochs: float = 2.0
    learning_rate: float = 3e-4
    max_new_tokens: int = 200
    # one generation batch for all questions: a CPU decoding step costs about as much for 24 rows as for 8
    eval_batch_size: int = 24
    seed: int = 0
    # LESS scaled to a CPU: 1 warm-up epoch (1 checkpoint) of LoRA r=16 on 10% of the pool, features of the
    # top 4 layers' LoRA gradients at 2,048 d, instead of the paper's 4 epochs of r=128 on 5%, all layers and
    # 8,192 d; the lr is raised from 2e-5 because a warm-up of a few dozen rows at 2e-5 barely moves the
    # adapter. Extraction is most of LESS's cost: one checkpoint halves it and the top 4 layers cut its
    # backward pass to 4 of 30 layers; they put the same GSM8K rows first as all layers do on a mixed pool
    # (benchmarks/README.md, "LESS gradient features").
    less: dict[str, object] = field(default_factory=lambda: {
        "warmup_fraction": 0.1, "training": {"epochs": 1.0, "learning_rate": 1e-4, "grad_accum": 1,
                                             "lora": {"r": 16, "alpha": 64}},
        "proj_dim": 2048, "max_length": 256, "layers": 4})


def run_demo(out: Path, *, model: str = "smollm2", console: Console | None = None,
             settings: DemoSettings | None = None) -> dict:
    from slimtune.data.recipes import load_recipe
    from slimtune.select import get_selector
    from slimtune.train import TrainSettings, train

    console = console or Console()
    settings = settings or DemoSettings()
    out.mkdir(parents=True, exist_ok=True)
    pool = [ex for source, n in settings.pool_sizes
            for ex in load_recipe(source, split="train", limit=n, seed=settings.seed)]
    pool_ids = {ex.id for ex in pool}
    targets = [ex for ex in load_recipe("gsm8k", split="train", limit=len(pool) + 50, seed=settings.seed + 1)
               if ex.id not in pool_ids][: settings.target_examples]
    evals = load_recipe("gsm8k", split="test", limit=settings.eval_examples, seed=settings.seed)
    console.print(f"pool: {len(pool)} rows ({', '.join(f'{s} {n}' for s, n in settings.pool_sizes)}); "
                  f"target: {len(targets)} GSM8K questions; evaluation: {len(evals)} GSM8K test questions")

    results = {"untuned": _evaluate_cached(out / "untuned.json", model, None, evals, settings, console)}
    subsets = {}
    for label, selector in (("LESS", get_selector("less", model=model, **settings.less)),
                            ("random", get_selector("random", seed=settings.seed))):
        sel_dir = out / f"select-{label}"
        console.rule(f"[bold]{label}: selecting {settings.budget:.0%} of the pool")
        if (sel_dir / "manifest.json").exists():
            from slimtune.select import Selection

            selection = Selection.load(sel_dir)
        else:
            selection = selector.select(pool, settings.budget, target=targets)
            selection.save(sel_dir, pool)
        subsets[label] = selection
        run_dir = out / f"train-{label}"
        console.rule(f"[bold]{label}: fine-tuning on {len(selection.kept)} examples")
        if not (run_dir / "slimtune_train.json").exists():
            train(selection.subset(pool), model=model, settings=TrainSettings(
                output_dir=str(run_dir), epochs=settings.epochs, learning_rate=settings.learning_rate,
                max_length=settings.max_length, seed=settings.seed))
        results[label] = _evaluate_cached(out / f"eval-{label}.json", model, run_dir, evals, settings, console)
        results[label]["selection_seconds"] = selection.cost.seconds
        results[label]["gsm8k_share"] = sum(ex.task == "gsm8k" for ex in selection.subset(pool)) / len(selection.kept)

    table = Table("model", "train rows", "GSM8K share", "exact match", "response loss", "selection s",
                  title="GSM8K test: untuned vs fine-tuned on a LESS subset vs a random subset of the same size")
    for label, row in results.items():
        kept = len(subsets[label].kept) if label in subsets else 0
        table.add_row(label, str(kept), f"{row.get('gsm8k_share', float('nan')):.2f}" if kept else "-",
                      f"{row['exact_match']:.3f}", f"{row['loss']:.4f}",
                      f"{row['selection_seconds']:.0f}" if kept else "-")
    console.print(table)
    write_json(out / "demo_results.json", results)
    return results


def _evaluate_cached(path: Path, model: str, run_dir: Path | None, evals, settings: DemoSettings,
                     console: Console) -> dict:
    from slimtune.evaluate import evaluate
    from slimtune.models import load_model
    from slimtune.train import load_trained

    if path.exists():
        return json.loads(path.read_text())
    console.rule(f"[bold]evaluating {'the untuned model' if run_dir is None else run_dir.name}")
    lm, tokenizer = load_trained(run_dir) if run_dir else load_model(model)
    start = time.perf_counter()
    report = evaluate(lm, tokenizer, {"gsm8k": evals}, max_new_tokens=settings.max_new_tokens,
                      batch_size=settings.eval_batch_size)
    row = {**report.metrics["gsm8k"], "eval_seconds": time.perf_counter() - start}
    write_json(path, row)
    return row
