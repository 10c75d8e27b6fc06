"""Run a benchmark grid: every cell selects (offline) or trains with selection (online), fine-tunes, evaluates.

Cells are cached by a fingerprint of everything their result depends on, each written atomically when
finished, so a killed grid resumes at the first unfinished cell and changing one method re-runs only its
cells. A cached cell or selection is used only when its checksum matches: a damaged one is named in a
warning and recomputed, never read as a result. Selections that do not depend on the seed (no ``seed``
parameter) are computed once and shared.
Generation metrics, the expensive ones, go to the cells an eval names and, when it names ``best``, to the
best method at each budget, found after the grid from the cheap held-out loss every cell has.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from slimtune.bench.config import ALWAYS, BEST, EvalSpec, GridConfig, MethodSpec, load_config
from slimtune.bench.pool import BenchData, build_bench_data
from slimtune.utils import atomic_write_text, json_default, write_json

UNTRAINED = MethodSpec(name="untrained", label="untrained")
FULL = MethodSpec(name="full", label="full")
RANDOM = MethodSpec(name="random", label="random")


@dataclass(frozen=True)
class Cell:
    method: MethodSpec
    budget: float | None
    seed: int
    #: The eval set a targeted method selects for, in a ``per_target`` grid.
    target: str | None = None

    @property
    def name(self) -> str:
        budget = "" if self.budget is None else f"-b{self.budget:g}"
        return f"{self.method.label}{self.target_tag}{budget}-s{self.seed}"

    @property
    def target_tag(self) -> str:
        """The target in a file name ("-tatoeba-deu-eng"); "" for a cell without one."""
        return "" if self.target is None else f"-{self.target.replace(':', '-')}"

    @property
    def target_key(self) -> tuple[str, ...]:
        """The target as a part of a fingerprint; none for a cell without one, so keys from before targets
        existed still match."""
        return () if self.target is None else (self.target,)


def grid_cells(config: GridConfig) -> list[Cell]:
    """The untrained model, full data per full seed, random at every budget and seed, then every method
    (once per seed, without a budget, for an online policy that sets its own; once per eval set for a
    targeted method in a ``per_target`` grid)."""
    cells = [Cell(UNTRAINED, None, config.seeds[0])]
    cells += [Cell(FULL, None, seed) for seed in config.full_seeds or config.seeds]
    for method in [RANDOM, *config.methods]:
        budgets = [None] if _sets_own_budget(method) else config.budgets
        targets = [ev.task for ev in config.evals] if config.per_target and is_targeted(method) else [None]
        cells += [Cell(method, budget, seed, target) for target in targets for budget in budgets
                  for seed in config.seeds]
    return cells


def is_targeted(method: MethodSpec) -> bool:
    """Whether the method selects for target examples: it needs them, or it is DELIFT's mutual information."""
    from slimtune.select import selector_class

    if method.online or method.name in ("full", "untrained"):  # the grid's own references, not selectors
        return False
    return selector_class(method.name).needs_target or method.params.get("objective") == "flmi"


def _sets_own_budget(method: MethodSpec) -> bool:
    from slimtune.online import policy_class

    return method.online and policy_class(method.name).sets_own_budget


def _selector_is_seeded(method: MethodSpec) -> bool:
    """Whether the selection follows the cell's seed: the selector takes a seed and the config does not pin one
    (a pinned seed, like the LESS authors' fixed warm-up ``data_seed``, makes one selection for every seed)."""
    from slimtune.select import selector_class

    return "seed" in {f.name for f in dataclasses.fields(selector_class(method.name))} and \
        "seed" not in method.params


def _generates_at(spec: EvalSpec, seed: int) -> bool:
    return spec.generate_seeds is None or seed in spec.generate_seeds


class GridRunner:
    def __init__(self, config: GridConfig, out_dir: Path, console: Console | None = None):
        self.config, self.out, self.console = config, out_dir, console or Console()
        self.cells_dir = out_dir / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self._data: BenchData | None = None

    @property
    def data(self) -> BenchData:
        if self._data is None:
            self._data = build_bench_data(self.config)
        return self._data

    def cell_key(self, cell: Cell) -> str:
        return self.config.fingerprint(cell.method.fingerprint(), str(cell.budget), str(cell.seed),
                                       *cell.target_key)

    def run(self) -> list[dict[str, Any]]:
        rows = []
        cells = grid_cells(self.config)
        for number, cell in enumerate(cells, 1):
            cached = self._cached_row(self.cells_dir / f"{cell.name}.json", self.cell_key(cell))
            if cached is not None:
                rows.append(cached)
                continue
            self.console.rule(f"[bold]cell {number}/{len(cells)}: {cell.name}")
            self._finish(cell, self.run_cell(cell), rows)
        for spec in self.config.evals:
            if BEST in (spec.generate or ()):
                self._generate_for_best(spec, cells, rows)
        return rows

    def _cached_row(self, path: Path, key: str) -> dict[str, Any] | None:
        """The row cached in ``path`` for ``key``; None when there is none, it is another key's, or it is damaged."""
        if not path.exists():
            return None
        try:
            row = json.loads(path.read_bytes())
        except ValueError:  # not JSON (or not UTF-8)
            row = None
        # a row without a checksum was written before checksums existed: trusted, as it was then
        if not isinstance(row, dict) or ("checksum" in row and row.pop("checksum") != _checksum(row)):
            self.console.print(f"[yellow]{path}: damaged (checksum mismatch); the cell is run again[/yellow]")
            return None
        return row if row.get("key") == key else None

    def _finish(self, cell: Cell, row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        row["key"] = self.cell_key(cell)
        row.pop("checksum", None)
        write_json(self.cells_dir / f"{cell.name}.json", {**row, "checksum": _checksum(row)})
        names = [r["cell"] for r in rows]
        if cell.name in names:
            rows[names.index(cell.name)] = row
        else:
            rows.append(row)

    def _generate_for_best(self, spec: EvalSpec, cells: list[Cell], rows: list[dict[str, Any]]) -> None:
        """Generation metrics of ``spec``'s task, at its ``generate_seeds``, of the method whose held-out loss
        on that task is lowest (mean over seeds) at each budget. The cells' adapters are in ``runs/<cell>/``, so
        this only evaluates, and each row is rewritten as soon as it has them: a killed pass resumes where it
        stopped."""
        from slimtune.train import load_trained

        by_name = {cell.name: cell for cell in cells}
        for budget in self.config.budgets:
            losses: dict[str, list[float]] = {}
            for row in rows:  # a targeted cell of another target has no loss on this task
                if row["budget"] == budget and row["method"] not in ALWAYS and f"{spec.task}/loss" in row:
                    losses.setdefault(row["method"], []).append(row[f"{spec.task}/loss"])
            if not losses:
                continue
            best = min(losses, key=lambda method: statistics.fmean(losses[method]))
            for row in [r for r in rows if r["budget"] == budget and r["method"] == best
                        and r.get("target") in (None, spec.task) and _generates_at(spec, r["seed"])]:
                if _has_task_metrics(row, spec.task):
                    continue
                cell = by_name[row["cell"]]
                self.console.rule(f"[bold]{spec.task} generation for the best at {budget:g}: {cell.name}")
                run_dir = self.out / "runs" / cell.name
                if not (run_dir / "slimtune_train.json").exists():  # adapters deleted since: train again
                    row = self.run_cell(cell)
                model, tokenizer = load_trained(run_dir)
                start = time.perf_counter()
                row.update(self._evaluate_task(spec, model, tokenizer, generate=True, loss=False))
                row["eval_seconds"] += time.perf_counter() - start
                self._finish(cell, row, rows)

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        from slimtune.models import load_model

        data, config = self.data, self.config
        row: dict[str, Any] = {"cell": cell.name, "method": cell.method.label, "method_name": cell.method.name,
                               "online": cell.method.online, "budget": cell.budget, "seed": cell.seed,
                               "target": cell.target,
                               "pool_size": len(data.pool), "selection_seconds": 0.0, "selection_tokens": 0,
                               "training_seconds": 0.0, "trained_tokens": 0, "examples_trained": 0}
        if cell.method is UNTRAINED:
            model, tokenizer = load_model(config.model)
        else:
            run_dir = self.out / "runs" / cell.name
            shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run from a killed grid
            result, kept_ids = self._train(cell, run_dir, row)
            row.update(training_seconds=result.seconds, trained_tokens=result.tokens_seen,
                       examples_trained=result.examples_seen)
            row.update(self._corruption(kept_ids))
            from slimtune.train import load_trained

            model, tokenizer = load_trained(run_dir)
        row.update(self._evaluate(cell, model, tokenizer))
        return row

    def _train(self, cell: Cell, run_dir: Path, row: dict[str, Any]):
        from slimtune.models import LoraSettings
        from slimtune.train import TrainSettings, train

        spec = self.config.train
        settings = TrainSettings(
            output_dir=str(run_dir), epochs=spec.epochs, max_steps=spec.max_steps, learning_rate=spec.learning_rate,
            batch_size=spec.batch_size, max_length=self.config.pool.max_length, seed=cell.seed,
            lora=LoraSettings(r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout),
            group_by_length=spec.group_by_length,
            progress=False)
        pool = self.data.pool
        if cell.method.online:
            from slimtune.online import get_policy
            from slimtune.online.trainer import read_selection_log, train_online

            policy = get_policy(cell.method.name, **self._with_seed(cell, cell.method.params, online=True))
            keep = spec.batch_size if cell.budget is None else cell.budget  # K = B: the policy decides alone
            result = train_online(pool, policy, keep=keep, model=self.config.model, settings=settings)
            kept_ids = [eid for step in read_selection_log(run_dir) for eid in step["chosen_ids"]]
            return result, kept_ids
        if cell.method is FULL:
            return train(pool, model=self.config.model, settings=settings), [ex.id for ex in pool]
        selection, seconds, tokens = self._select(cell)
        row.update(selection_seconds=seconds, selection_tokens=tokens)
        subset = selection.subset(pool)
        return train(subset, model=self.config.model, settings=settings), [ex.id for ex in subset]

    def _select(self, cell: Cell):
        """The cell's selection and what the cell spent on it (seconds, model tokens). A selection is cached:
        shared across seeds when the method has no seed (or pins it). The cell that computed it is charged its
        cost, also when a killed grid resumes and that cell loads it back; every other cell that loads it is
        charged the loading, so summing a column counts each selection once."""
        from slimtune.select import Selection, get_selector, selector_class

        seed_part = f"-s{cell.seed}" if _selector_is_seeded(cell.method) else ""
        path = self.out / "selections" / f"{cell.method.label}{cell.target_tag}-b{cell.budget:g}{seed_part}"
        key = self.config.fingerprint(cell.method.fingerprint(), str(cell.budget), seed_part, *cell.target_key)
        key_file = path / "key.txt"
        manifest = path / "manifest.json"
        stored = key_file.read_text().split(" ", 2) if key_file.exists() else []
        if stored[:1] == [key]:
            start = time.perf_counter()
            # a key without a checksum was written before checksums existed: trusted, as the cells are
            if len(stored) == 1 or (manifest.exists() and stored[1] == str(zlib.crc32(manifest.read_bytes()))):
                selection = Selection.load(path)
                if stored[2:3] == [cell.name]:
                    return selection, selection.cost.seconds, selection.cost.tokens
                return selection, time.perf_counter() - start, 0
            self.console.print(f"[yellow]{manifest}: damaged (checksum mismatch); the selection is run "
                               "again[/yellow]")
        params = dict(cell.method.params)
        fields = {f.name for f in dataclasses.fields(selector_class(cell.method.name))}
        if "model" in fields:
            params.setdefault("model", self.config.model)
        if "cache_dir" in fields:
            # The grid's own cache: cells of one grid share warm-ups and kernels (and a killed grid resumes),
            # but nothing built by an earlier run elsewhere makes a selection look cheaper than it is.
            params.setdefault("cache_dir", str(self.out / "cache"))
        selector = get_selector(cell.method.name, **self._with_seed(cell, params, online=False))
        target = None
        if is_targeted(cell.method):
            target = self.data.all_targets if cell.target is None else self.data.targets[cell.target]
        selection = selector.select(self.data.pool, cell.budget, target=target)
        selection.save(path, self.data.pool)
        # written last, with the manifest's checksum and the cell it is charged to: a selection without its key
        # is not trusted
        atomic_write_text(key_file, f"{key} {zlib.crc32(manifest.read_bytes())} {cell.name}")
        return selection, selection.cost.seconds, selection.cost.tokens

    @staticmethod
    def _with_seed(cell: Cell, params: dict[str, Any], *, online: bool) -> dict[str, Any]:
        from slimtune.online import policy_class
        from slimtune.select import selector_class

        cls = policy_class(cell.method.name) if online else selector_class(cell.method.name)
        if "seed" in {f.name for f in dataclasses.fields(cls)}:
            return {"seed": cell.seed, **params}
        return dict(params)

    def _corruption(self, kept_ids: list[str]) -> dict[str, Any]:
        corrupted = self.data.corrupted_ids
        if not corrupted or not kept_ids:
            return {"corrupted_kept_share": None, "corrupted_pool_share": None}
        return {"corrupted_kept_share": sum(eid in corrupted for eid in kept_ids) / len(kept_ids),
                "corrupted_pool_share": len(corrupted) / len(self.data.pool)}

    def _evaluate(self, cell: Cell, model, tokenizer) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        start = time.perf_counter()
        for spec in self.config.evals:
            if cell.target is not None and spec.task != cell.target:
                continue
            generate = (spec.generate is None or cell.method.label in spec.generate
                        or cell.method.name in spec.generate) and _generates_at(spec, cell.seed)
            metrics.update(self._evaluate_task(spec, model, tokenizer, generate=generate))
        metrics["eval_seconds"] = time.perf_counter() - start
        return metrics

    def _evaluate_task(self, spec: EvalSpec, model, tokenizer, *, generate: bool,
                       loss: bool = True) -> dict[str, Any]:
        """``<task>/<metric>`` values: loss (unless the row has it already), the task's own metrics (generation,
        options) if ``generate``."""
        from slimtune.evaluate import evaluate
        from slimtune.evaluate.tasks import LOSS_METRICS, resolve_task

        examples = self.data.evals[spec.task]
        metrics = set(LOSS_METRICS) if loss else set()
        if generate:
            metrics.update(resolve_task(spec.task, examples).metrics)
        kwargs = {"max_new_tokens": spec.max_new_tokens} if spec.max_new_tokens else {}
        report = evaluate(model, tokenizer, {spec.task: examples}, metrics=metrics, **kwargs)
        return {f"{spec.task}/{name}": value for name, value in report.metrics[spec.task].items()}


def _checksum(row: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(row, sort_keys=True, default=json_default).encode())


def _has_task_metrics(row: dict[str, Any], task: str) -> bool:
    from slimtune.evaluate.tasks import LOSS_METRICS

    return any(key.startswith(f"{task}/") and key.split("/", 1)[1] not in LOSS_METRICS for key in row)


def run_grid(config_path: str | Path, out_dir: str | Path | None = None, console: Console | None = None) -> Path:
    """Run (or resume) the grid in ``config_path`` and write the table and the reports; returns report.md."""
    from slimtune.bench.report import write_report

    config = load_config(config_path)
    out = Path(out_dir or config.out_dir or Path("runs") / "bench" / config.name)
    runner = GridRunner(config, out, console)
    rows = runner.run()
    return write_report(config, rows, out)
