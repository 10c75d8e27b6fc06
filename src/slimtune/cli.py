"""The ``slimtune`` command: a thin shell over the Python API (data inspect | select | train | eval | bench | demo).

DATA arguments take a file (JSONL, JSONL.gz, JSON, Parquet, CSV, or any other file ``datasets`` reads), a saved
Hugging Face datasets folder or a folder of data files, a Hub id (``org/name``, read from the local cache when
offline; ``--split`` and ``--data-subset`` choose within it), or a recipe such as ``gsm8k:train`` or
``tatoeba:fra-eng`` (see ``slimtune data recipes``).
"""

from __future__ import annotations

import collections.abc
import json
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from slimtune.cachecli import cache_app
from slimtune.config import ConfigOpt

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
                  help="Train LLMs on less data: pick the examples that matter (LESS, DELIFT, UDS, SLAP).")
data_app = typer.Typer(no_args_is_help=True, help="Look at data before training on it.")
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")
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
                                                    "(repeatable); values are parsed as JSON when they can be; a "
                                                    "dotted key sets one value of nested settings "
                                                    "(less: training.epochs=2, training.lora.r=16).")]


def _print_version(value: bool) -> None:
    if value:
        from slimtune import __version__

        console.print(f"slimtune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print slimtune's version and exit.")] = False,
             quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines: results and errors "
                                                 "only.")] = False,
             verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also the libraries' own logs and "
                                                   "loading bars.")] = False) -> None:
    """Options that come before the command (``slimtune --quiet select ...``); --version acts in its callback."""
    from slimtune.progress import set_verbosity

    if quiet and verbose:
        raise typer.BadParameter("give --quiet or --verbose, not both")
    set_verbosity("quiet" if quiet else "verbose" if verbose else "normal")


def _load(spec: str, shape: str | None = None, skip_bad: bool = False, split: str | None = None,
          subset: str | None = None) -> collections.abc.Sequence:
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
    return result.examples


def _params(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs as a mapping; a dotted key (``training.lora.r=16``) sets one value of a nested
    settings field, so ``training`` becomes ``{"lora": {"r": 16}}``."""
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"'{pair}' is not key=value", param_hint="--param")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *outer, leaf = key.replace("-", "_").split(".")
        into = params
        for depth, name in enumerate(outer, start=1):
            into = into.setdefault(name, {})
            if not isinstance(into, dict):
                raise typer.BadParameter(f"'{pair}': {'.'.join(outer[:depth])} is given a value, not settings "
                                         "to set a key of", param_hint="--param")
        into[leaf] = value
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
    examples, report = result.examples, result.report
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
    method: Annotated[str, typer.Option(help="random, length, loss, ifd, kcenter, less, delift, delift-se, or "
                                        "pkg.module:Class for a Selector of your own.")],
    budget: Annotated[str, typer.Option(help="Fraction (0.05, 5%) or count (200) of the pool to keep.")],
    data: Annotated[str, typer.Option(help="The pool: file, datasets folder or recipe.")],
    out: Annotated[Path, typer.Option(help="Folder for the subset (in the pool's own format) and manifest.json.")],
    target: Annotated[str | None, typer.Option(help="Target examples (file or recipe) for targeted methods.")] = None,
    existing: Annotated[str | None, typer.Option(help="Already-learnt examples (DELIFT --objective flcg).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model for model-aware methods.")] = None,
    objective: Annotated[str | None, typer.Option(help="DELIFT objective: fl, flmi or flcg.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random choices.")] = 0,
    diverse: Annotated[bool, typer.Option(help="LESS: targeted and diverse (FLMI over the LESS kernel).")] = False,
    device_map: Annotated[str | None, typer.Option(help="'auto': spread a model too large for one GPU over "
                                                        "this process's GPUs (run one process per machine).")] = None,
    param: ParamOpt = None,
    shape: ShapeOpt = None,
    skip_bad: SkipBadOpt = False,
    allow_unscored: Annotated[bool, typer.Option("--allow-unscored", help="Keep rows the method could not "
                                                 "score (ranked last) instead of stopping.")] = False,
    config: ConfigOpt = None,
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
    from slimtune.select import Budget, UnscoredRowsError, selector_class

    try:
        cls = selector_class(method)
    except ValueError as err:
        _fail(f"--method: {err}")
    try:
        budget_value = Budget.parse(budget)
    except ValueError as err:
        _fail(f"--budget {budget!r}: {err}; give a fraction in (0, 1] such as 0.05 or 5%, or a whole count "
              "such as 200")
    params = _params(param)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in (("model", model), ("objective", objective), ("seed", seed), ("diverse", diverse or None),
                        ("device_map", device_map)):
        if value is not None and name in fields:
            params.setdefault(name, value)
    selector = _build(cls, params, f"method '{method}'", "--param")
    uses = _inputs_used(selector)
    for option, given in (("--target", target), ("--existing", existing)):
        if option in uses["needs"] and not given:
            _fail(f"{option}: method '{method}'{_objective_note(selector)} selects toward those examples; "
                  f"pass {option} FILE")
        if given and option not in uses["needs"] | uses["may"]:
            _fail(f"{option}: method '{method}'{_objective_note(selector)} does not use it; drop {option} or "
                  "choose a method that does (" + ("less, delift --objective flmi" if option == "--target"
                                                   else "kcenter, delift --objective flcg") + ")")
    try:
        kinds = save_kinds(save_as)
    except ValueError as err:
        _fail(f"--save-as: {err}")
    _check_out_dir(out)
    tokenizer, max_length = _tokenizer_for(selector), getattr(selector, "max_length", None)
    pool, skipped = _checked(_load(data, shape, skip_bad, split, data_subset), data, tokenizer, max_length,
                             skip_bad, "--data")
    extra = {}
    for option, spec in (("--target", target), ("--existing", existing)):
        if spec:
            extra[option], bad = _checked(_load(spec, None, skip_bad), spec, tokenizer, max_length, skip_bad,
                                          option)
            skipped += bad
    try:
        selection = selector.select(pool, budget_value, target=extra.get("--target"),
                                    existing=extra.get("--existing"), allow_unscored=allow_unscored)
    except UnscoredRowsError as err:
        _fail(str(err))
    selection.skipped = skipped
    from slimtune.bench.pictures import clear_kept_report, selection_rows, write_kept_report
    from slimtune.utils import distributed_rank_world

    if distributed_rank_world()[0] != 0:  # every process of a launch holds the same selection: one writes it
        return
    clear_kept_report(out)
    subset_path = selection.save(out, pool, kinds)
    write_kept_report(out, selection_rows(selection, pool))
    cost = selection.cost
    unscored = f"; {len(cost.unscored)} row(s) unscored (see the manifest)" if cost.unscored else ""
    console.print(f"[green]kept {len(selection.kept)} of {len(pool)}[/green] with {method} -> {subset_path} "
                  f"({cost.seconds:.1f} s, {cost.forward_tokens:,} forward / {cost.backward_tokens:,} backward "
                  f"tokens){unscored}; manifest: {out / 'manifest.json'}; pictures: {out / 'report.html'}")


def _fail(message: str) -> NoReturn:
    """Stop with exit status 2 and one line naming the argument or file and the fix (no traceback)."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


_WRONG_TYPE = object()


def _as_type(value: Any, hint: Any) -> Any:
    """``value`` as an instance of ``hint`` (int -> float, number -> str), or ``_WRONG_TYPE``."""
    import math
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        exact = [a for a in args if _as_type(value, a) is value]
        if exact:
            return value
        return next((c for c in (_as_type(value, a) for a in args) if c is not _WRONG_TYPE), _WRONG_TYPE)
    if origin is typing.Literal:
        return value if value in args else _WRONG_TYPE
    if hint is type(None):
        return value if value is None else _WRONG_TYPE
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list):
            return _WRONG_TYPE
        items = [_as_type(v, args[0]) for v in value] if args else value
        return _WRONG_TYPE if any(v is _WRONG_TYPE for v in items) else items
    if origin is dict or hint is dict:
        return value if isinstance(value, dict) else _WRONG_TYPE
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool:
        return value if isinstance(value, bool) else _WRONG_TYPE
    if hint is int:
        return value if number and isinstance(value, int) else _WRONG_TYPE
    if hint is float:
        return float(value) if number and math.isfinite(value) else _WRONG_TYPE
    if hint is str:
        return value if isinstance(value, str) else str(value) if number else _WRONG_TYPE
    if isinstance(hint, type):
        return value if isinstance(value, hint) else _WRONG_TYPE
    return value


def _build(cls: type, params: dict[str, Any], what: str, option: str):
    """An instance of the dataclass ``cls`` from ``params`` (nested mappings for nested settings): unknown keys
    and values of the wrong type stop the command, named in dotted form (``training.lora.r``); ints given for
    float fields and numbers for str fields are converted; a value the class's own checks refuse stops it too."""
    from slimtune.utils import UnknownParameters, build_dataclass

    def typed(key: str, value: Any, hint: Any) -> Any:
        converted = _as_type(value, hint)
        if converted is _WRONG_TYPE:
            shown = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            _fail(f"{option} {key}={json.dumps(value)}: {what} takes {shown} for {key}")
        return converted

    try:
        return build_dataclass(cls, params, check=typed)
    except UnknownParameters as err:
        takes = f"{err.scope} takes" if err.scope else "it takes"
        _fail(f"{option}: {what} has no parameter {', '.join(err.keys)}; {takes}: {', '.join(err.known) or 'none'}")
    except (ValueError, TypeError) as err:
        _fail(f"{option}: {what}: {err}")


def _inputs_used(selector) -> dict[str, set[str]]:
    """The example sets a selector ``needs`` and those it ``may`` use (beyond the pool)."""
    objective = getattr(selector, "objective", None)
    needs = {"--target"} if selector.needs_target or objective == "flmi" else set()
    if objective == "flcg":
        needs.add("--existing")
    may = {"--existing"} if selector.name == "kcenter" else set()
    return {"needs": needs, "may": may}


def _objective_note(selector) -> str:
    objective = getattr(selector, "objective", None)
    return f" with objective '{objective}'" if objective else ""


def _check_out_dir(out: Path, option: str = "--out") -> None:
    """``out`` must be a folder that exists or can be made: checked before any work, not after it."""
    if out.exists() and not out.is_dir():
        _fail(f"{option} {out}: is a file, not a folder; give a folder path (it is created if missing)")
    _check_writable(out if out.exists() else out.parent, option, out)


def _check_writable(folder: Path, option: str, given: Path) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        _fail(f"{option} {given}: {existing} is a file, so nothing can be written under it; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail(f"{option} {given}: {existing} is not writable; choose a folder you can write to")


def _tokenizer_for(selector):
    """The tokenizer of the selector's model (cheap: no weights), or None where the method runs no model
    (random; length in characters; k-center on sentence-encoder embeddings): those get shape checks only."""
    name = getattr(selector, "model", None)
    runs_no_model = getattr(selector, "unit", None) == "chars" or getattr(selector, "embedding", "model") != "model"
    if not isinstance(name, str) or runs_no_model:
        return None
    return _load_tokenizer(name, "--model")


def _load_tokenizer(name: str, option: str):
    from slimtune.models import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as err:
        _fail(f"{option} {name}: cannot load its tokenizer ({str(err).splitlines()[0]}); give a Hugging Face id, "
              "a local model folder, 'smollm2' or 'tiny'")


def _checked(examples: collections.abc.Sequence, spec: str, tokenizer, max_length: int | None, skip_bad: bool,
             option: str) -> tuple[collections.abc.Sequence, list[dict[str, str]]]:
    """``examples`` that the stage can use; the others stop the command, or with ``--skip-bad`` are left out,
    counted and returned as manifest rows."""
    from rich.markup import escape

    from slimtune.data.validate import check_examples

    if not examples:
        _fail(f"{option} {spec}: holds no examples; give a file with at least one record")
    checked = check_examples(examples, tokenizer=tokenizer, max_length=max_length)
    if checked.problems:
        shown = checked.problems[:10]
        for problem in shown:
            console.print(f"  [yellow]problem:[/yellow] {escape(str(problem))}", soft_wrap=True)
        more = f" (the first {len(shown)} above)" if len(checked.problems) > len(shown) else " (above)"
        if not skip_bad:
            _fail(f"{option} {spec}: {len(checked.problems)} of {len(examples)} example(s) cannot be used{more}; "
                  "fix them or pass --skip-bad to leave them out")
        console.print(f"[yellow]left out {len(checked.problems)} example(s) of {spec} that cannot be used[/yellow]")
        if not checked.examples:
            _fail(f"{option} {spec}: no usable example left after --skip-bad")
    return checked.examples, checked.skipped()


def _check_numbers(checks: list[tuple[str, float, bool, str]]) -> None:
    """``(option, value, ok, what it must be)`` for each numeric option: the first that is not ok stops."""
    import math

    for option, value, ok, must in checks:
        if not (math.isfinite(value) and ok):
            _fail(f"{option} {value}: must be {must}")


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
    max_length: Annotated[int, typer.Option(help="Token limit; longer rows lose the start of their prompt "
                                            "(counted).")] = 512,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (0: full fine-tune).")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    checkpoints: Annotated[bool, typer.Option(help="Save a checkpoint every epoch, so a run stopped or killed "
                                              "goes on from its last checkpoint when run again.")] = True,
    group_by_length: Annotated[bool, typer.Option(help="Batch rows of similar length together (less padding; "
                                                  "the Trainer's length-grouped sampler).")] = False,
    online: Annotated[str | None, typer.Option(help="Online selection: uds, slap, big-loss, grad-norm, rho-loss, "
                                               "infobatch, uniform, or pkg.module:Class for a Policy "
                                               "of your own.")] = None,
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
    report_to: Annotated[str | None, typer.Option(help="Loggers for the Trainer's metrics, comma-separated: "
                                                  "tensorboard, wandb, mlflow, all, none (default).")] = None,
    deepspeed: Annotated[str | None, typer.Option(help="DeepSpeed config (JSON file) for the Trainer.")] = None,
    fsdp: Annotated[str | None, typer.Option(help="The Trainer's FSDP options, e.g. 'full_shard auto_wrap'.")]
    = None,
    training_arg: Annotated[list[str] | None, typer.Option(
        "--training-arg", help="Any transformers TrainingArguments field as key=value (repeatable); it wins "
                               "over slimtune's settings.")] = None,
    config: ConfigOpt = None,
    split: SplitOpt = None,
    data_subset: DataSubsetOpt = None,
) -> None:
    """Fine-tune with LoRA through the Hugging Face Trainer, optionally with online batch selection.

    Example: [bold]slimtune train --data gsm8k:train --model smollm2 --out runs/gsm8k --online uds --keep 0.25[/bold]
    """
    from slimtune.models import LoraSettings
    from slimtune.train import TrainSettings
    from slimtune.train import train as run_training

    _check_numbers([
        ("--epochs", epochs, epochs > 0, "a positive number of epochs"),
        ("--lr", lr, lr > 0, "a positive learning rate"),
        ("--batch-size", batch_size, batch_size >= 1, "at least 1"),
        ("--grad-accum", grad_accum, grad_accum >= 1, "at least 1"),
        ("--max-length", max_length, max_length >= 2, "at least 2 tokens (a prompt token and a response token)"),
        ("--max-steps", max_steps, max_steps == -1 or max_steps >= 1, "-1 (epochs decide) or at least 1"),
        ("--lora-r", lora_r, lora_r >= 0, "0 (full fine-tune) or a positive rank"),
        ("--candidates", candidates or 0, candidates is None or candidates >= 1, "at least 1"),
        ("--keep", keep, keep > 0 and (keep < 1 or float(keep).is_integer()),
         "a share in (0, 1) or a whole count >= 1 of each candidate batch"),
    ])
    policy = _online_policy(online, param, seed, max_length, per_epoch) if online else None
    if param and not online:
        _fail("--param: train takes parameters for an --online policy only; add --online NAME or drop --param")
    _check_out_dir(out)
    user_args = _training_args(training_arg, report_to=report_to, deepspeed=deepspeed, fsdp=fsdp)
    examples = _load(data, shape, skip_bad, split, data_subset)
    if subset is not None:
        examples = _subset_of(examples, subset, data)
    examples, _ = _checked(examples, data, _load_tokenizer(model, "--model"), max_length, skip_bad, "--data")
    settings = TrainSettings(
        output_dir=str(out), epochs=epochs, max_steps=max_steps, learning_rate=lr,
        batch_size=candidates or batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed,
        lora=LoraSettings(r=lora_r, alpha=lora_alpha) if lora_r > 0 else None, device=device,
        save_checkpoints=checkpoints, group_by_length=group_by_length)
    console.print(f"training {model} on {len(examples)} examples -> {out}")
    if policy is None:
        result = run_training(examples, model=model, settings=settings, training_args=user_args)
    elif per_epoch:
        from slimtune.online.pruning import train_pruned

        result = train_pruned(examples, policy, keep=keep, model=model, settings=settings,
                              training_args=user_args)
    else:
        from slimtune.bench.pictures import online_rows, write_kept_report
        from slimtune.online.trainer import read_selection_log, train_online

        result = train_online(examples, policy, keep=keep, model=model, settings=settings,
                              training_args=user_args)
        summary_file = out / "selection_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        write_kept_report(out, online_rows(read_selection_log(out), examples, summary))
    console.print(f"[green]done[/green] in {result.seconds:.0f} s: {result.examples_seen} examples, "
                  f"{result.tokens_seen:,} tokens trained; final loss {result.final_loss:.4f}; "
                  f"{result.encode_summary}; adapter in {result.adapter_dir}")


def _training_args(pairs: list[str] | None, **flags: str | None) -> dict[str, Any]:
    """The user's TrainingArguments fields from --training-arg and the named flags (which win)."""
    from slimtune.train import parse_training_args

    try:
        user = parse_training_args(pairs or [])
    except ValueError as err:
        _fail(f"--training-arg: {err}")
    if flags.get("report_to"):
        flags["report_to"] = [name.strip() for name in flags["report_to"].split(",") if name.strip()]
    return {**user, **{key: value for key, value in flags.items() if value}}


def _online_policy(name: str, pairs: list[str] | None, seed: int, max_length: int, per_epoch: bool):
    """The online policy ``name`` built from checked ``-p`` pairs; the training seed and length are its
    defaults (a sketch over sequences shorter than the training rows could not take them)."""
    import dataclasses

    from slimtune.online import policy_class

    try:
        cls = policy_class(name)
    except ValueError as err:
        _fail(f"--online: {err}")
    params = _params(pairs)
    fields = {f.name for f in dataclasses.fields(cls)}
    if "seed" in fields:
        params.setdefault("seed", seed)
    if "max_length" in fields:
        given = params.setdefault("max_length", max_length)
        if isinstance(given, int) and given < max_length:
            _fail(f"--param max_length={given}: '{name}' must cover the training rows (--max-length "
                  f"{max_length}); drop it or raise it to {max_length}")
    policy = _build(cls, params, f"online method '{name}'", "--param")
    if per_epoch and not hasattr(policy, "prune"):
        _fail(f"--per-epoch: '{name}' chooses per step only; --per-epoch needs slap")
    return policy


def _subset_of(examples: collections.abc.Sequence, subset: Path, data: str) -> collections.abc.Sequence:
    """The examples a ``select`` output kept (a table of them when the pool is one); a selection made on another
    pool stops the command."""
    from slimtune.data.example import pool_hash
    from slimtune.data.table import example_ids, take_rows
    from slimtune.select import Selection

    manifest = subset / "manifest.json" if subset.is_dir() else subset
    try:
        selection = Selection.load(subset)
    except FileNotFoundError:
        _fail(f"--subset {subset}: no {manifest}; give a `slimtune select` --out folder or its manifest.json")
    except (ValueError, KeyError, TypeError) as err:
        _fail(f"--subset {manifest}: not a selection manifest ({err}); give a `slimtune select` --out folder")
    kept = set(selection.kept_ids)
    ids = example_ids(examples)
    positions = [i for i, example_id in enumerate(ids) if example_id in kept]
    found = {ids[i] for i in positions}
    missing = len(kept) - len(found)
    if missing:
        absent = next(i for i in selection.kept_ids if i not in found)
        _fail(f"--subset {subset}: {missing} of its {len(kept)} kept id(s) are not in --data {data} (first: "
              f"{absent}); it was selected from another pool (pool hash {selection.pool_hash}, this data "
              f"{pool_hash(examples)}); pass the --data the selection was made on")
    return take_rows(examples, positions)


@app.command("eval")
def evaluate_cmd(
    data: Annotated[str | None, typer.Option(help="Evaluation examples: file, datasets folder or recipe.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model to evaluate (id, path, smollm2).")]
    = None,
    run: Annotated[Path | None, typer.Option(help="A `slimtune train` run folder (base model + adapter).")] = None,
    task: Annotated[str, typer.Option(help="gsm8k, translation, choice, loss, or auto (from the data).")] = "auto",
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N examples only.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation length (default: per task, 256 for "
                                                       "GSM8K, 64 for translation).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size for scoring (generation takes at least 32 "
                                               "prompts at a time).")] = 8,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda ... (default: auto).")] = None,
    shape: ShapeOpt = None,
    harness: Annotated[str | None, typer.Option(help="lm-evaluation-harness tasks, comma-separated (needs "
                                                "slimtune[harness]); slimtune_gsm8k runs offline.")] = None,
    harness_include: Annotated[Path | None, typer.Option(help="Folder of your own lm-eval task "
                                                         "definitions (YAML).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval: few-shot examples per task.")] = None,
    config: ConfigOpt = None,
    split: SplitOpt = None,
    data_subset: DataSubsetOpt = None,
) -> None:
    """Target loss and task metrics (GSM8K exact match, chrF/BLEU, option accuracy), and lm-eval tasks.

    Example: [bold]slimtune eval --run runs/gsm8k --data gsm8k:test --limit 40 --harness slimtune_gsm8k[/bold]
    """
    from slimtune.evaluate import EvalReport, evaluate
    from slimtune.evaluate.tasks import TASKS
    from slimtune.models import load_model
    from slimtune.train import load_trained

    if (model is None) == (run is None):
        _fail("--model / --run: give exactly one of them (a model to evaluate, or a `slimtune train` run folder)")
    if data is None and harness is None:
        _fail("--data / --harness: give evaluation examples, lm-eval tasks, or both")
    if run is not None and not (run / "slimtune_train.json").is_file():
        _fail(f"--run {run}: no slimtune_train.json in it; give a folder written by `slimtune train --out`")
    if task != "auto" and task not in TASKS:
        _fail(f"--task {task}: unknown; known: auto, {', '.join(sorted(TASKS))}")
    _check_numbers([("--limit", limit or 0, limit is None or limit >= 1, "at least 1"),
                    ("--batch-size", batch_size, batch_size >= 1, "at least 1"),
                    ("--max-new-tokens", max_new_tokens or 0, max_new_tokens is None or max_new_tokens >= 1,
                     "at least 1")])
    if out is not None:
        if out.is_dir():
            _fail(f"--out {out}: is a folder; give a file path for the JSON results")
        _check_writable(out.parent, "--out", out)
    report = EvalReport()
    if data is not None:
        examples, _ = _checked(_load(data, shape, split=split, subset=data_subset)[:limit], data, None, None,
                               False, "--data")
        lm, tokenizer = load_trained(run, device=device) if run else load_model(model, device=device)
        report = evaluate(lm, tokenizer, {_task_name(task, examples): examples}, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
        del lm  # lm-eval loads its own copy below; two copies of a large model need not coexist
    if harness is not None:
        from slimtune.evaluate.harness import run_harness

        try:
            run_harness([t.strip() for t in harness.split(",") if t.strip()], model=model, run=run,
                        include_path=harness_include, limit=limit, num_fewshot=num_fewshot,
                        batch_size=batch_size, device=device, max_new_tokens=max_new_tokens or 256,
                        report=report)
        except (ImportError, ValueError, FileNotFoundError) as err:
            _fail(f"--harness: {err}")
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


@app.command("env")
def env_cmd() -> None:
    """Versions, devices, threads and cache folders: what a bug report needs.

    Example: [bold]slimtune env[/bold]
    """
    table = Table("", "", show_header=False, box=None)
    for key, value in environment().items():
        table.add_row(key, value)
    console.print(table)


def environment() -> dict[str, str]:
    """What ``slimtune env`` prints, as ``{label: value}``."""
    import platform
    from importlib import metadata

    import torch
    from datasets import config as datasets_config
    from huggingface_hub import constants as hub

    from slimtune import __version__
    from slimtune.models import cache_dir

    info = {"slimtune": __version__, "python": f"{platform.python_version()} ({platform.platform()})"}
    for package in ("torch", "transformers", "peft", "accelerate", "datasets", "trl"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["devices"] = f"{len(names)} CUDA: {', '.join(names)} (CUDA {torch.version.cuda}, bf16 " \
                          f"{'yes' if torch.cuda.is_bf16_supported() else 'no'})"
    else:
        info["devices"] = "cpu only"
    info["threads"] = f"torch {torch.get_num_threads()}, {os.cpu_count()} cores, " \
                      f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    info["slimtune cache"] = str(cache_dir())
    info["hub cache"] = f"{hub.HF_HUB_CACHE} (offline: {'yes' if hub.HF_HUB_OFFLINE else 'no'})"
    info["datasets cache"] = str(datasets_config.HF_DATASETS_CACHE)
    return info


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
