"""A benchmark grid read from YAML: the pool, the evaluation tasks, training settings, methods, budgets, seeds.

```yaml
name: cpu-quick
model: smollm2
pool: {sizes: {gsm8k: 40, p3: 40, tatoeba: 40, taskmaster4: 20}, max_length: 256,
       corrupt: {share: 0.1, kinds: [swap, truncate]}, seed: 0}
eval: {gsm8k: {n: 16, generate: [full, random, best]}, tatoeba: {n: 16},
       p3: {n: 24, options: 8, max_options: 8}, taskmaster4: {n: 12}}
target_per_task: 3
train: {epochs: 1, learning_rate: 2.0e-4, batch_size: 8, lora_r: 8}
budgets: [0.3]
seeds: [0]
full_seeds: [0]                       # optional: seeds of the full-data reference (default: seeds)
methods:
  - loss                              # a bare name: defaults
  - {name: uds, online: true, label: UDS, params: {alpha: 2.0e-3}}
```
Random at every budget and seed, the untrained model and full data are always part of the grid.

The pool and the eval sets may be the user's own instead of the built-in recipes: any DATA that
:func:`slimtune.data.load_examples` reads (a file, a folder, a Hub id), with ``split`` and ``subset``:

```yaml
pool: {data: my_pool.jsonl, size: 400, max_length: 256, seed: 0}   # size: a seeded draw (default: all rows)
eval: {support: {data: acme/support-chats, split: test, n: 32}}     # targets come from the rows after n
```

A targeted grid (``per_target: true``) treats every eval set as a separate target, the job of a user who has a
few examples of one task and a large pool: each targeted method (one that needs a target, or DELIFT's ``flmi``)
selects for each eval set from that set's ``target_per_task`` examples and its cells are evaluated on that set
alone; untargeted methods train once per budget and seed and are evaluated on every set. ``pool: exclude`` keeps
the rows of recipe specs out of the pool, so that a target can be absent from it (its eval may then read the
recipe's ``split: all``):

```yaml
pool: {sizes: {p3: 500, tatoeba: 300}, exclude: [p3:sciq]}
eval: {p3:sciq: {n: 100, split: all}, tatoeba:deu-eng: {n: 96}}
per_target: true
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimtune import __version__
from slimtune.data.recipes import RECIPES, is_recipe
from slimtune.online import POLICIES
from slimtune.select import SELECTORS

ALWAYS = ("untrained", "full", "random")
#: In an eval's ``generate`` list: the best method at each budget, chosen after the grid by held-out loss.
BEST = "best"


@dataclass(frozen=True)
class MethodSpec:
    """One method of the grid. ``online`` methods train on the whole pool and keep ``budget`` of each batch."""

    name: str
    label: str
    online: bool = False
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    def fingerprint(self) -> str:
        return _digest({"name": self.name, "online": self.online, "params": self.params})


#: Keys that name the user's own data; left out of fingerprints when unset, so that cells cached before they
#: existed are still found.
DATA_KEYS = ("data", "size", "split", "subset")
#: Keys added since, left out of fingerprints when unset for the same reason.
OPTIONAL_KEYS = (*DATA_KEYS, "exclude")


@dataclass
class PoolSpec:
    """Rows per recipe (``sizes``), or the user's own pool (``data``, ``size`` rows drawn, all by default)."""

    sizes: dict[str, int] = field(default_factory=dict)
    max_length: int = 256
    corrupt_share: float = 0.0
    corrupt_kinds: tuple[str, ...] = ("swap", "truncate")
    seed: int = 0
    data: str | None = None
    size: int | None = None
    split: str | None = None
    subset: str | None = None
    #: Recipe specs (``p3:sciq``) whose rows never enter the pool.
    exclude: tuple[str, ...] | None = None

    def describe(self) -> str:
        if self.data:
            return f"{self.data}{f' split {self.split}' if self.split else ''}"
        without = f" (without {', '.join(self.exclude)})" if self.exclude else ""
        return ", ".join(f"{source} {size}" for source, size in self.sizes.items()) + without


@dataclass
class EvalSpec:
    task: str
    n: int
    #: Labels whose cells get generation metrics (None: every cell). ``best`` adds, after the grid, the cells
    #: of the method with the lowest held-out loss on this task at each budget.
    generate: tuple[str, ...] | None = None
    #: Seeds whose cells get those generation metrics (None: every seed). Held-out loss is on every cell.
    generate_seeds: tuple[int, ...] | None = None
    max_new_tokens: int | None = None
    #: How many of the ``n`` rows list answer options (exactly; the rest list none), so that option accuracy
    #: is measured, and the most options such a row may list (option scoring costs a forward pass per option).
    options: int = 0
    max_options: int | None = None
    #: The user's own eval set (a file, folder or Hub id) instead of the recipe named ``task``.
    data: str | None = None
    split: str | None = None
    subset: str | None = None


@dataclass
class TrainSpec:
    epochs: float = 1.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_steps: int = -1
    #: Batches of rows of similar length (:attr:`slimtune.train.TrainSettings.group_by_length`).
    group_by_length: bool = False


@dataclass
class GridConfig:
    name: str
    model: str
    pool: PoolSpec
    evals: list[EvalSpec]
    train: TrainSpec
    methods: list[MethodSpec]
    budgets: list[float]
    seeds: list[int]
    target_per_task: int = 3
    #: Seeds of the full-data reference; defaults to ``seeds``. Methods are judged against the random band, which
    #: carries the seed spread, so a CPU grid can afford full data at one seed and save two full fine-tunes.
    full_seeds: list[int] | None = None
    #: Every eval set is its own target (module docstring).
    per_target: bool = False
    out_dir: str | None = None
    source: str | None = None

    def fingerprint(self, *parts: str) -> str:
        """Hash of what a cell's result depends on besides its method: model, pool, training, evaluation, and
        the slimtune version, so cached cells from a release with different training or scoring are not reused."""
        return _digest({"slimtune": __version__, "model": self.model, "pool": _fields(self.pool),
                        "train": _fields(self.train),
                        "evals": [_fields(e) for e in self.evals],
                        "target_per_task": self.target_per_task, "parts": parts,
                        **({"per_target": True} if self.per_target else {})})


#: The grids shipped with slimtune, which ``slimtune bench cpu-small`` finds by name.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def load_config(path: str | Path) -> GridConfig:
    """Read and validate a grid config, a YAML path or the name of a shipped one (``cpu-quick``, ``cpu-small``,
    ``gpu``); errors name the file and the offending key."""
    path = Path(path)
    if not path.exists() and (SHIPPED_CONFIGS / f"{path.stem}.yaml").exists() and path.suffix in ("", ".yaml"):
        path = SHIPPED_CONFIGS / f"{path.stem}.yaml"
    raw = yaml.safe_load(path.read_text()) or {}

    def need(key: str) -> Any:
        if key not in raw:
            raise ValueError(f"{path}: missing key '{key}'")
        return raw[key]

    pool = _pool(path, need("pool"))
    evals = [_eval(path, str(task), spec) for task, spec in (need("eval") or {}).items()]
    for ev in evals:
        if not 0 <= ev.options <= ev.n:
            raise ValueError(f"{path}: eval: {ev.task}: options must be between 0 and n ({ev.n}), got {ev.options}")
    methods = []
    for entry in raw.get("methods") or []:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = entry.pop("name")
        online = bool(entry.pop("online", name in POLICIES and name not in SELECTORS))
        known = POLICIES if online else SELECTORS
        if name not in known:
            raise ValueError(f"{path}: methods: unknown {'online' if online else 'offline'} method '{name}'; "
                             f"known: {', '.join(sorted(known))}")
        methods.append(MethodSpec(name=name, label=str(entry.pop("label", name)), online=online,
                                  params=dict(entry.pop("params", {}))))
        if entry:
            raise ValueError(f"{path}: methods: '{name}' has unknown keys {sorted(entry)}")
    labels = [m.label for m in methods]
    clash = sorted({lab for lab in labels if labels.count(lab) > 1 or lab in (*ALWAYS, BEST)})
    if clash:
        raise ValueError(f"{path}: methods: labels {clash} repeat or clash with the built-in names "
                         f"{(*ALWAYS, BEST)}")
    known_labels = {*ALWAYS, BEST, *labels, *(m.name for m in methods)}
    for ev in evals:
        unknown = sorted(set(ev.generate or ()) - known_labels)
        if unknown:
            raise ValueError(f"{path}: eval: {ev.task}: generate names {unknown}, which are not in the grid; "
                             f"use method labels, {', '.join(ALWAYS)} or {BEST}")
    budgets = [float(b) for b in need("budgets")]
    if any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"{path}: budgets must be fractions in (0, 1], got {budgets}")
    full_seeds = raw.get("full_seeds")
    if full_seeds is not None and (not isinstance(full_seeds, list) or not full_seeds):
        raise ValueError(f"{path}: full_seeds must be a non-empty list of seeds, got {full_seeds!r}")
    return GridConfig(name=str(raw.get("name", path.stem)), model=str(raw.get("model", "smollm2")), pool=pool,
                      evals=evals, train=_train(path, raw.get("train") or {}), methods=methods, budgets=budgets,
                      seeds=[int(s) for s in raw.get("seeds", [0])],
                      target_per_task=int(raw.get("target_per_task", 3)),
                      full_seeds=None if full_seeds is None else [int(s) for s in full_seeds],
                      per_target=bool(raw.get("per_target", False)),
                      out_dir=raw.get("out_dir"),
                      source=str(path))


_POOL_KEYS = {"sizes", "max_length", "corrupt", "seed", *OPTIONAL_KEYS}
_EVAL_KEYS = {"n", "generate", "generate_seeds", "max_new_tokens", "options", "max_options", "data", "split", "subset"}


def _train(path: Path, raw: Any) -> TrainSpec:
    known = sorted(f.name for f in dataclasses.fields(TrainSpec))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: train: expected a mapping of {known}, got {raw!r}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{path}: train: unknown keys {unknown}; known: {known}")
    return TrainSpec(**raw)


def _pool(path: Path, raw: Any) -> PoolSpec:
    """The pool: ``sizes`` per recipe or the user's ``data``, exactly one of them; errors name the key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: pool: expected a mapping with sizes (rows per recipe) or data (your pool)")
    unknown = sorted(set(raw) - _POOL_KEYS)
    if unknown:
        raise ValueError(f"{path}: pool: unknown keys {unknown}; known: {sorted(_POOL_KEYS)}")
    if ("sizes" in raw) == ("data" in raw):
        raise ValueError(f"{path}: pool: give exactly one of sizes (rows per built-in recipe, e.g. "
                         "{gsm8k: 40}) or data (your pool: a file, folder or Hub id)")
    if "sizes" in raw:
        sizes = raw["sizes"]
        if not isinstance(sizes, dict) or not sizes:
            raise ValueError(f"{path}: pool: sizes: expected rows per recipe, e.g. {{gsm8k: 40}}, got {sizes!r}")
        bad = [str(source) for source in sizes if not is_recipe(str(source))]
        if bad:
            raise ValueError(f"{path}: pool: sizes: {bad} are not recipes ({', '.join(RECIPES)}); a pool of your "
                             "own goes under pool: data")
    for key in DATA_KEYS:
        if key in raw and key != "size" and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise ValueError(f"{path}: pool: {key}: expected a non-empty string, got {raw[key]!r}")
    if "size" in raw and "data" not in raw:
        raise ValueError(f"{path}: pool: size: applies to pool: data; recipes take sizes")
    size = raw.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"{path}: pool: size: expected a positive number of rows, got {size!r}")
    exclude = raw.get("exclude")
    if exclude is not None:
        if not isinstance(exclude, list) or not all(isinstance(spec, str) and is_recipe(spec) for spec in exclude):
            raise ValueError(f"{path}: pool: exclude: expected a list of recipe specs such as [p3:sciq], "
                             f"got {exclude!r}")
        if "data" in raw:
            raise ValueError(f"{path}: pool: exclude: applies to recipe pools (sizes); leave the rows out of "
                             "your own pool file instead")
        raw = {**raw, "exclude": tuple(exclude)}
    corrupt = raw.get("corrupt") or {}
    return PoolSpec(sizes={str(k): int(v) for k, v in (raw.get("sizes") or {}).items()},
                    max_length=int(raw.get("max_length", 256)), seed=int(raw.get("seed", 0)),
                    corrupt_share=float(corrupt.get("share", 0.0)),
                    corrupt_kinds=tuple(corrupt.get("kinds", ("swap", "truncate"))),
                    **{key: raw[key] for key in OPTIONAL_KEYS if key in raw})


def _eval(path: Path, task: str, spec: Any) -> EvalSpec:
    """One eval set: the held-out split of the recipe named ``task``, or the user's ``data`` under that name."""
    where = f"{path}: eval: {task}"
    spec = spec or {}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping such as {{n: 16}}, got {spec!r}")
    unknown = sorted(set(spec) - _EVAL_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(_EVAL_KEYS)}")
    for key in ("data", "split", "subset"):
        if key in spec and (not isinstance(spec[key], str) or not spec[key].strip()):
            raise ValueError(f"{where}: {key}: expected a non-empty string, got {spec[key]!r}")
    if "data" not in spec:
        if not is_recipe(task):
            raise ValueError(f"{where}: not a recipe ({', '.join(RECIPES)}); an eval set of your own needs data: "
                             "(a file, folder or Hub id)")
        if "subset" in spec:
            raise ValueError(f"{where}: subset applies to data:; a recipe's options go in its name "
                             "(tatoeba:deu-eng, p3:sciq)")
    n = spec.get("n", 16)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: n: expected a positive number of rows, got {n!r}")
    seeds = spec.get("generate_seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise ValueError(f"{where}: generate_seeds: expected a non-empty list of seeds, got {seeds!r}")
    return EvalSpec(task=task, n=n, generate=tuple(spec["generate"]) if spec.get("generate") is not None else None,
                    generate_seeds=None if seeds is None else tuple(seeds),
                    max_new_tokens=spec.get("max_new_tokens"), options=int(spec.get("options", 0)),
                    max_options=spec.get("max_options"), data=spec.get("data"), split=spec.get("split"),
                    subset=spec.get("subset"))


#: Fields added after grids were cached, with their defaults: left out of fingerprints while they hold the
#: default, so those cells stay valid.
_LATER_FIELDS = {"generate_seeds": None, "group_by_length": False, "lora_dropout": 0.05}


def _fields(spec: PoolSpec | EvalSpec | TrainSpec) -> dict[str, Any]:
    return {key: value for key, value in dataclasses.asdict(spec).items()
            if not (key in OPTIONAL_KEYS and value is None)
            and not (key in _LATER_FIELDS and value == _LATER_FIELDS[key])}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
