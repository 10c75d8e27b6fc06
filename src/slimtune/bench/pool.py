"""The benchmark data: a "mix" pool from the shared real data (or the user's own pool), held-out evaluation rows
per task (or the user's own eval sets), a few target examples per task for targeted methods, and optional
corruption of a fixed share of the pool.

Corruption is how a benchmark asks whether a method filters noise: a corrupted row keeps its prompt but gets
a wrong response, either another corrupted row's response (``swap``) or its own cut to the first third
(``truncate``). Which rows were corrupted, and how, is recorded so the report can compare the share a
method kept with the share in the pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from slimtune.bench.config import EvalSpec, GridConfig
from slimtune.data import load_examples
from slimtune.data.example import Example
from slimtune.data.recipes import load_recipe
from slimtune.data.report import seeded_sample


@dataclass
class BenchData:
    pool: list[Example]
    evals: dict[str, list[Example]]
    #: Target examples per eval set: what a targeted method is shown of that task.
    targets: dict[str, list[Example]]
    corrupted_ids: set[str]

    @property
    def all_targets(self) -> list[Example]:
        """Every eval set's targets, for a grid that selects once for all of them."""
        return [ex for rows in self.targets.values() for ex in rows]


def _with_response(example: Example, response: str, kind: str) -> Example:
    messages = list(example.messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages[last] = {"role": "assistant", "content": response}
    return replace(example, messages=tuple(messages), metadata={**example.metadata, "corrupted": kind})


def corrupt(pool: list[Example], share: float, kinds: tuple[str, ...], seed: int) -> tuple[list[Example], set[str]]:
    """Corrupt ``share`` of the pool (seeded), cycling through ``kinds``; returns the new pool and the ids."""
    if share <= 0:
        return pool, set()
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pool)), max(2, round(share * len(pool))))
    by_kind = {kind: chosen[i::len(kinds)] for i, kind in enumerate(kinds)}
    out = list(pool)
    for kind, rows in by_kind.items():
        if kind == "swap":
            # a derangement: every swapped row gets another row's response
            for a, b in zip(rows, rows[1:] + rows[:1]):
                out[a] = _with_response(pool[a], pool[b].response, "swap")
        elif kind == "truncate":
            for a in rows:
                words = pool[a].response.split()
                out[a] = _with_response(pool[a], " ".join(words[: max(1, len(words) // 3)]), "truncate")
        else:
            raise ValueError(f"unknown corruption kind '{kind}'; known: swap, truncate")
    return out, {pool[i].id for i in chosen}


def build_bench_data(config: GridConfig) -> BenchData:
    """Evaluation and target rows come from each eval set's held-out split (or the split it names); pool rows
    from each source's training split, without any evaluation or target row and without the rows of
    ``pool.exclude``, so no evaluation row is ever in the pool. A recipe eval set with too few held-out rows
    for its targets takes the rest from the recipe's training split (kept out of the pool like the others)."""
    spec = config.pool
    evals, targets = {}, {}
    for ev in config.evals:
        wanted = ev.n + config.target_per_task
        rows = (load_examples(ev.data, split=ev.split, subset=ev.subset).examples if ev.data
                else load_recipe(ev.task, split=ev.split or "test"))
        if ev.options:
            held_out = _options_first(rows, ev, spec.seed)[:wanted]
        else:
            held_out = seeded_sample(rows, wanted, spec.seed)
        if len(held_out) < wanted and not ev.data and (ev.split or "test") == "test":
            held_out += seeded_sample(load_recipe(ev.task, split="train"), wanted - len(held_out), spec.seed)
        if len(held_out) < wanted:
            raise ValueError(f"eval: {ev.task}: {ev.data or ev.task} has {len(held_out)} usable rows; n "
                             f"({ev.n}) and target_per_task ({config.target_per_task}) need {wanted}")
        evals[ev.task] = held_out[: ev.n]
        targets[ev.task] = held_out[ev.n:]
    banned = {ex.id for rows in (*evals.values(), *targets.values()) for ex in rows}
    for excluded in spec.exclude or ():
        banned |= {ex.id for ex in load_recipe(excluded, split="train")}
    pool: list[Example] = []
    if spec.data:
        pool = load_examples(spec.data, split=spec.split, subset=spec.subset, limit=spec.size,
                             seed=spec.seed).examples
    for source, size in spec.sizes.items():
        rows = load_recipe(source, split="train")
        pool += seeded_sample([ex for ex in rows if ex.id not in banned], size, spec.seed)
    leaked = sorted(ev_task for ev_task, rows in evals.items() if {ex.id for ex in rows} & {ex.id for ex in pool})
    if leaked:
        raise ValueError(f"eval: {', '.join(leaked)}: evaluation rows are in the pool (your pool file holds them); "
                         "a benchmark must evaluate on rows it never trains on")
    pool, corrupted = corrupt(pool, spec.corrupt_share, spec.corrupt_kinds, spec.seed)
    return BenchData(pool=pool, evals=evals, targets=targets, corrupted_ids=corrupted)


def _options_first(rows: list[Example], ev: EvalSpec, seed: int) -> list[Example]:
    """The seeded draw of the held-out rows: ``ev.options`` rows that list answer options (at most
    ``ev.max_options`` of them), then the rows that list none, so exactly that many rows are option-scored.

    Few held-out rows list options (83 of P3's 1,057), so a plain draw of a dozen rarely holds one and the
    option accuracy the evaluator can compute would be missing from the report. The cap exists because option
    scoring runs the prompt once per option: P3's multi-hop rows (20-50 options over 1-4k-token passages) cost
    minutes per cell on a CPU, its multiple-choice QA rows (3-8 options, short prompts) seconds."""
    drawn = seeded_sample(rows, len(rows), seed)
    listing = [ex for ex in drawn if ex.metadata.get("options")]
    eligible = [ex for ex in listing if ev.max_options is None or len(ex.metadata["options"]) <= ev.max_options]
    if len(eligible) < ev.options:
        cap = "" if ev.max_options is None else f" with at most {ev.max_options} options"
        raise ValueError(f"eval: {ev.task}: options: {ev.options} rows listing answer options asked for, but its "
                         f"held-out split has {len(eligible)}{cap}")
    return eligible[: ev.options] + [ex for ex in drawn if not ex.metadata.get("options")]
