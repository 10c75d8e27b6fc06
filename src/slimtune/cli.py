"""The ``slimtune`` command: a thin shell over the Python API (data inspect | select | train | eval | bench | demo).

DATA arguments take a file (JSONL, JSONL.gz, JSON, Parquet, CSV, or any other file ``datasets`` reads), a saved
Hugging Face datasets folder or a folder of data files, a Hub id (``org/name``, read from the local cache when
offline; ``--split`` and ``--data-subset`` choose within it), or a recipe such as ``gsm8k:train`` or
``tatoeba:fra-eng`` (see ``slimtune data recipes``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                  help="Train LLMs on less data: pick the examples that matter (LESS, DELIFT, UDS, SLAP).")
data_app = typer.Typer(no_args_is_help=True, help="Look at data before training on it.")
app.add_typer(data_app, name="data")
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hugging Face id, local path, 'smollm2' (embedded "
                                       "default) or 'tiny' (random test model).")]
ShapeOpt = Annotated[str | None, typer.Option(help="Force the record shape: alpaca, prompt-completion, "
                                              "question-answer, messages, sharegpt, taskmaster.")]
SkipBadOpt = Annotated[bool, typer.Option("--skip-bad", help="Skip bad records (counted and reported) "
                                          "instead of stopping at the first.")]
SplitOpt = Annotated[str | None, typer.Option(help="The split of a dataset (Hub id or folder) or recipe that "
                                              "holds several: train, test, ...")]
DataSubsetOpt = Annotated[str | None, typer.Option("--data-subset", help="The subset (configuration name) of a "
                                                   "Hub dataset that has several.")]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", "-p", help="Method parameter as key=value "
                                                    "(repeatable); values are parsed as JSON when they can be.")]


def _load(spec: str, shape: str | None = None, skip_bad: bool = False, split: str | None = None,
          subset: str | None = None) -> list:
    """Examples from a file, folder or recipe; a bad record stops with its file:line:field unless skipped."""
    from slimtune.data import load_examples
    from slimtune.data.errors import DataError

    try:
        result = load_examples(spec, shape=shape, skip_bad=skip_bad, split=split, subset=subset)
    except DataError as err:
        console.print(f"[red]error:[/red] {err}")
        if not skip_bad:
            console.print("(pass --skip-bad to skip such records and continue)")
        raise typer.Exit(2) from None
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    for note in result.report.notes:
        console.print(f"[dim]{note}[/dim]")
    if result.report.skipped:
        console.print(f"[yellow]skipped {result.report.skipped} bad record(s) in {spec}[/yellow]; first: "
                      f"{result.report.problems[0]}")
    return list(result.examples)


def _params(pairs: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"'{pair}' is not key=value", param_hint="--param")
        try:
            params[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            params[key.replace("-", "_")] = value
    return params


@data_app.command("inspect")
def data_inspect(
    data: Annotated[str, typer.Argument(help="File, datasets folder or recipe.")],
    shape: ShapeOpt = None,
    skip_bad: SkipBadOpt = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Count tokens with this model's "
                                              "tokenizer (default: characters).")] = None,
    max_length: Annotated[int, typer.Option(help="Length limit to report truncation against.")] = 512,
    split: SplitOpt = None,
    data_subset: DataSubsetOpt = None,
) -> None:
    """Shape, counts, tasks, a length histogram and the problems found.

    Example: [bold]slimtune data inspect train.jsonl --model smollm2 --skip-bad[/bold]
    """
    from slimtune.data import load_examples
    from slimtune.data.errors import DataError

    try:
        result = load_examples(data, shape=shape, skip_bad=True, split=split, subset=data_subset)
    except (DataError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    examples, report = list(result.examples), result.report
    console.print(f"[bold]{data}[/bold]: shape [cyan]{report.shape}[/cyan], {report.read} records read, "
                  f"{len(examples)} usable, {report.skipped} bad")
    for problem in report.problems[:20]:
        console.print(f"  [yellow]problem:[/yellow] {problem}")
    if report.skipped > 20:
        console.print(f"  ... and {report.skipped - 20} more")
    if not examples:
        raise typer.Exit(2 if report.skipped and not skip_bad else 0)
    tasks: dict[str, int] = {}
    for ex in examples:
        tasks[ex.task] = tasks.get(ex.task, 0) + 1
    table = Table("task", "examples", title="tasks")
    for task, count in sorted(tasks.items(), key=lambda kv: -kv[1])[:25]:
        table.add_row(task, str(count))
    if len(tasks) > 25:
        table.add_row(f"... {len(tasks) - 25} more", str(sum(sorted(tasks.values())[:-25])))
    console.print(table)
    turns = [sum(m["role"] == "assistant" for m in ex.messages) for ex in examples]
    console.print(f"assistant turns per example: min {min(turns)}, max {max(turns)}, "
                  f"multi-turn {sum(t > 1 for t in turns)}")
    if model:
        from slimtune.data.tokenize import encode_example
        from slimtune.models import load_tokenizer

        tokenizer = load_tokenizer(model)
        lengths = [len(encode_example(ex, tokenizer)["input_ids"]) for ex in examples]
        unit = "tokens"
        console.print(f"over {max_length} tokens (would be truncated): {sum(n > max_length for n in lengths)}")
    else:
        lengths = [sum(len(m["content"]) for m in ex.messages) for ex in examples]
        unit = "characters"
    _print_histogram(lengths, unit)
    if report.skipped and not skip_bad:
        raise typer.Exit(2)


def _print_histogram(lengths: list[int], unit: str, bins: int = 10) -> None:
    import numpy as np

    values = np.asarray(lengths)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)).round())
    counts, edges = np.histogram(values, bins=edges if len(edges) > 1 else bins)
    table = Table(f"length ({unit})", "examples", "", title=f"lengths: median {int(np.median(values))}, "
                  f"max {values.max()}")
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        table.add_row(f"{int(lo)}-{int(hi)}", str(count), "#" * int(40 * count / max(counts.max(), 1)))
    console.print(table)


@data_app.command("recipes")
def data_recipes() -> None:
    """List the built-in recipes for the shared real data sets.

    Example: [bold]slimtune data recipes[/bold]
    """
    from slimtune.data import describe_recipes

    for line in describe_recipes():
        console.print(line)


@app.command()
def select(
    method: Annotated[str, typer.Option(help="random, length, loss, ifd, kcenter, less, delift, delift-se.")],
    budget: Annotated[str, typer.Option(help="Fraction (0.05, 5%) or count (200) of the pool to keep.")],
    data: Annotated[str, typer.Option(help="The pool: file, datasets folder or recipe.")],
    out: Annotated[Path, typer.Option(help="Folder for the subset (in the pool's own format) and manifest.json.")],
    target: Annotated[str | None, typer.Option(help="Target examples (file or recipe) for targeted methods.")] = None,
    existing: Annotated[str | None, typer.Option(help="Already-learnt examples (DELIFT --objective flcg).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model for model-aware methods.")] = None,
    objective: Annotated[str | None, typer.Option(help="DELIFT objective: fl, flmi or flcg.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random choices.")] = 0,
    param: ParamOpt = None,
    shape: ShapeOpt = None,
    skip_bad: SkipBadOpt = False,
    split: SplitOpt = None,
    data_subset: DataSubsetOpt = None,
    save_as: Annotated[str, typer.Option(help="What to write, comma-separated: source (the pool's own format), "
                                         "jsonl/csv/parquet/..., datasets (a save_to_disk folder), indices "
                                         "(indices.json: positions for Dataset.select) or indices.npy.")]
    = "source",
) -> None:
    """Score a pool once and keep a budget of it.

    Example: [bold]slimtune select --method less --budget 0.05 --data pool.jsonl --target dev.jsonl --out sel/[/bold]
    """
    import dataclasses

    from slimtune.data.writers import save_kinds
    from slimtune.select import selector_class

    try:
        cls = selector_class(method)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--method") from None
    params = _params(param)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in (("model", model), ("objective", objective), ("seed", seed)):
        if value is not None and name in fields:
            params.setdefault(name, value)
    unknown = set(params) - fields
    if unknown:
        raise typer.BadParameter(f"'{method}' has no parameter {', '.join(sorted(unknown))}; it takes: "
                                 f"{', '.join(sorted(fields))}", param_hint="--param")
    try:
        kinds = save_kinds(save_as)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--save-as") from None
    pool = _load(data, shape, skip_bad, split, data_subset)
    target_examples = _load(target, None, skip_bad) if target else None
    existing_examples = _load(existing, None, skip_bad) if existing else None
    selection = cls(**params).select(pool, budget, target=target_examples, existing=existing_examples)
    subset_path = selection.save(out, pool, kinds)
    cost = selection.cost
    console.print(f"[green]kept {len(selection.kept)} of {len(pool)}[/green] with {method} -> {subset_path} "
                  f"({cost.seconds:.1f} s, {cost.forward_tokens:,} forward / {cost.backward_tokens:,} backward "
                  f"tokens); manifest: {out / 'manifest.json'}")


@app.command()
def train(
    data: Annotated[str, typer.Option(help="Training data: file, datasets folder or recipe.")],
    out: Annotated[Path, typer.Option(help="Run folder: adapter/, slimtune_train.json, train_log.jsonl.")],
    model: ModelOpt = "smollm2",
    subset: Annotated[Path | None, typer.Option(help="A `slimtune select` output folder (or its manifest) "
                                                "whose kept ids restrict the data.")] = None,
    epochs: Annotated[float, typer.Option(help="Epochs over the (selected) data.")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimiser steps (-1: epochs decide).")] = -1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Examples per step (the candidate batch B when online).")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    max_length: Annotated[int, typer.Option(help="Token limit; longer rows are cut, rows left without a "
                                            "response are dropped (both counted).")] = 512,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (0: full fine-tune).")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    online: Annotated[str | None, typer.Option(help="Online selection: uds, slap, big-loss, grad-norm, rho-loss, "
                                               "infobatch, uniform.")] = None,
    keep: Annotated[float, typer.Option(help="Online: share (<1) or count (>=1) of each candidate batch "
                                        "to backpropagate.")] = 0.25,
    candidates: Annotated[int | None, typer.Option(help="Online: candidate batch size B (default: "
                                                   "--batch-size).")] = None,
    per_epoch: Annotated[bool, typer.Option(help="Online, SLAP: choose per epoch instead of per step (score the "
                                            "pool at each epoch start, train that epoch on the --keep share "
                                            "of it).")] = False,
    param: ParamOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for data order, LoRA init and selection.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: auto).")] = None,
    shape: ShapeOpt = None,
    skip_bad: SkipBadOpt = False,
    split: SplitOpt = None,
    data_subset: DataSubsetOpt = None,
) -> None:
    """Fine-tune with LoRA through the Hugging Face Trainer, optionally with online batch selection.

    Example: [bold]slimtune train --data gsm8k:train --model smollm2 --out runs/gsm8k --online uds --keep 0.25[/bold]
    """
    from slimtune.models import LoraSettings
    from slimtune.select import Selection
    from slimtune.train import TrainSettings
    from slimtune.train import train as run_training

    examples = _load(data, shape, skip_bad, split, data_subset)
    if subset is not None:
        kept = set(Selection.load(subset).kept_ids)
        examples = [ex for ex in examples if ex.id in kept]
        missing = len(kept) - len(examples)
        if missing:
            console.print(f"[yellow]{missing} selected id(s) are not in {data}[/yellow]")
    settings = TrainSettings(
        output_dir=str(out), epochs=epochs, max_steps=max_steps, learning_rate=lr,
        batch_size=candidates or batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed,
        lora=LoraSettings(r=lora_r, alpha=lora_alpha) if lora_r > 0 else None, device=device)
    console.print(f"training {model} on {len(examples)} examples -> {out}")
    if online:
        from slimtune.online import get_policy
        from slimtune.online.trainer import train_online

        params = _params(param)
        if "seed" in _policy_fields(online):
            params.setdefault("seed", seed)
        policy = get_policy(online, **params)
        if per_epoch:
            from slimtune.online.pruning import train_pruned

            if not hasattr(policy, "prune"):
                raise typer.BadParameter(f"'{online}' chooses per step only; --per-epoch needs slap",
                                         param_hint="--per-epoch")
            result = train_pruned(examples, policy, keep=keep, model=model, settings=settings)
        else:
            result = train_online(examples, policy, keep=keep, model=model, settings=settings)
    else:
        result = run_training(examples, model=model, settings=settings)
    console.print(f"[green]done[/green] in {result.seconds:.0f} s: {result.examples_seen} examples, "
                  f"{result.tokens_seen:,} tokens trained; final loss {result.final_loss:.4f}; "
                  f"{result.encode_summary}; adapter in {result.adapter_dir}")


def _policy_fields(name: str) -> set[str]:
    import dataclasses

    from slimtune.online import policy_class

    return {f.name for f in dataclasses.fields(policy_class(name))}


@app.command("eval")
def evaluate_cmd(
    data: Annotated[str, typer.Option(help="Evaluation examples: file, datasets folder or recipe.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to evaluate (id, path, smollm2).")]
    = None,
    run: Annotated[Path | None, typer.Option(help="A `slimtune train` run folder (base model + adapter).")] = None,
    task: Annotated[str, typer.Option(help="gsm8k, translation, choice, loss, or auto (from the data).")] = "auto",
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N examples only.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length (default: per task, 256 for "
                                                       "GSM8K, 64 for translation).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size for scoring and generation.")] = 8,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: auto).")] = None,
    shape: ShapeOpt = None,
    split: SplitOpt = None,
    data_subset: DataSubsetOpt = None,
) -> None:
    """Target loss and task metrics (GSM8K exact match, chrF/BLEU, option accuracy).

    Example: [bold]slimtune eval --run runs/gsm8k --data gsm8k:test --limit 40[/bold]
    """
    from slimtune.evaluate import evaluate
    from slimtune.models import load_model
    from slimtune.train import load_trained

    if (model is None) == (run is None):
        raise typer.BadParameter("give exactly one of --model or --run")
    examples = _load(data, shape, split=split, subset=data_subset)[:limit]
    lm, tokenizer = load_trained(run, device=device) if run else load_model(model, device=device)
    report = evaluate(lm, tokenizer, {_task_name(task, examples): examples}, max_new_tokens=max_new_tokens,
                      batch_size=batch_size)
    console.print(report.table())
    if out:
        report.to_json(out)
        console.print(f"results -> {out}")


def _task_name(task: str, examples: list) -> str:
    if task != "auto":
        return task
    from slimtune.evaluate import infer_task

    return infer_task(examples)


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="Grid config (YAML), or a shipped one by name: cpu-quick, "
                                                "cpu-small, gpu (src/slimtune/bench/configs/).")],
    out: Annotated[Path | None, typer.Option(help="Results folder (default: from the config).")] = None,
) -> None:
    """Run a benchmark grid (select -> train -> evaluate per cell, cached and resumable) and write the report.

    Example: [bold]slimtune bench cpu-quick[/bold]
    """
    from slimtune.bench.runner import run_grid

    report_path = run_grid(config, out_dir=out)
    console.print(f"[green]report:[/green] {report_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the runs and the comparison.")] = Path("runs/demo"),
    model: ModelOpt = "smollm2",
) -> None:
    """The main job: select a targeted subset of the bundled pool, fine-tune on it and on a random subset of
    the same size, and compare both with the untuned model on the target task.

    Example: [bold]slimtune demo --out runs/demo[/bold]
    """
    from slimtune.bench.demo import run_demo

    run_demo(out, model=model, console=console)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
