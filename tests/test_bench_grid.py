"""The bench grid end to end on the tiny model: table, caching, corrupted-row accounting."""

import pandas as pd
import pytest

from slimtune.bench.config import load_config
from slimtune.bench.pool import build_bench_data, corrupt
from slimtune.bench.runner import GridRunner, grid_cells, run_grid
from slimtune.data.example import make_example

GRID = """
name: tiny-grid
model: tiny
pool: {sizes: {gsm8k: 8, tatoeba: 8}, max_length: 96, corrupt: {share: 0.25, kinds: [swap, truncate]}}
eval: {gsm8k: {n: 2, generate: [full, best], max_new_tokens: 4}, tatoeba: {n: 3, max_new_tokens: 4},
       p3: {n: 2, options: 1, max_options: 5}}
target_per_task: 1
train: {epochs: 1, batch_size: 4, lora_r: 2, lora_alpha: 4}
budgets: [0.5]
seeds: [0]
methods: [length, {name: big-loss, online: true}]
"""


def test_corruption_swaps_responses_between_rows_and_truncates_others():
    pool = [make_example([{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"answer number {i} is long enough"}], id=str(i))
            for i in range(20)]
    out, ids = corrupt(pool, 0.3, ("swap", "truncate"), seed=0)
    assert len(ids) == 6 and [ex.id for ex in out] == [ex.id for ex in pool]
    changed = {ex.id: ex for ex in out if ex.metadata.get("corrupted")}
    assert set(changed) == ids
    originals = {ex.response for ex in pool}
    for ex in changed.values():
        original = pool[int(ex.id)].response
        if ex.metadata["corrupted"] == "swap":
            assert ex.response != original and ex.response in originals
        else:
            assert original.startswith(ex.response) and len(ex.response) < len(original)
    assert corrupt(pool, 0.3, ("swap", "truncate"), seed=0)[1] == ids


@pytest.mark.usefixtures("shared_data")
def test_two_method_grid_on_the_tiny_model_writes_the_table_and_reuses_every_cell(tmp_path, monkeypatch):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    import slimtune.evaluate.tasks as tasks

    in_best_pass, plain_target_loss, plain_best_pass = [], tasks.target_loss, GridRunner._generate_for_best

    def best_pass(self, *args):
        in_best_pass.append(True)
        plain_best_pass(self, *args)
        in_best_pass.clear()

    def target_loss(*args, **kwargs):
        assert not in_best_pass, "the generation pass for the best method recomputed a held-out loss"
        return plain_target_loss(*args, **kwargs)

    monkeypatch.setattr(GridRunner, "_generate_for_best", best_pass)
    monkeypatch.setattr(tasks, "target_loss", target_loss)
    report = run_grid(path, out_dir=tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert sorted(table["cell"]) == sorted(["untrained-s0", "full-s0", "random-b0.5-s0", "length-b0.5-s0",
                                            "big-loss-b0.5-s0"])
    for column in ("method", "budget", "seed", "selection_seconds", "training_seconds", "model_tokens",
                   "tatoeba/loss", "tatoeba/chrf", "gsm8k/loss", "corrupted_kept_share", "corrupted_pool_share"):
        assert column in table.columns
    full = table.set_index("cell").loc["full-s0"]
    assert full["corrupted_kept_share"] == pytest.approx(full["corrupted_pool_share"]) == pytest.approx(0.25)
    assert pd.isna(table.set_index("cell").loc["random-b0.5-s0", "gsm8k/exact_match"])
    assert not pd.isna(full["gsm8k/exact_match"])
    assert table["p3/accuracy"].notna().all()  # the eval asked for a row that lists options

    # GSM8K generation for `best`: the method with the lower GSM8K loss at the budget, and only that one
    methods = table[table["method"].isin(["length", "big-loss"])].set_index("method")
    best = methods["gsm8k/loss"].idxmin()
    assert methods["gsm8k/exact_match"].notna().to_dict() == {m: m == best for m in methods.index}

    # the kept share is what the selection actually kept
    config = load_config(path)
    runner = GridRunner(config, tmp_path / "out")
    from slimtune.select import Selection

    kept = Selection.load(tmp_path / "out" / "selections" / "length-b0.5").kept_ids
    share = sum(i in runner.data.corrupted_ids for i in kept) / len(kept)
    assert table.set_index("cell").loc["length-b0.5-s0", "corrupted_kept_share"] == pytest.approx(share)

    monkeypatch.setattr(GridRunner, "run_cell", lambda self, cell: pytest.fail(f"{cell.name} re-ran"))
    assert run_grid(path, out_dir=tmp_path / "out") == report


@pytest.mark.usefixtures("shared_data")
def test_an_eval_asking_for_option_rows_gets_them_first_and_keeps_targets_apart(tmp_path):
    path = tmp_path / "grid.yaml"
    # The bundled sample's held-out P3 rows list options for two rows with at most 8 (the full data for dozens).
    path.write_text(GRID.replace("p3: {n: 2, options: 1, max_options: 5}", "p3: {n: 10, options: 2, max_options: 8}"))
    data = GridRunner(load_config(path), tmp_path / "out").data
    p3 = data.evals["p3"]
    assert [len(ex.metadata.get("options") or ()) for ex in p3][2:] == [0] * 8  # exactly 2 are option-scored
    assert all(1 < len(ex.metadata["options"]) <= 8 for ex in p3[:2])
    assert not {ex.id for ex in p3} & {ex.id for ex in data.all_targets}
    assert not {ex.id for ex in p3} & {ex.id for ex in data.pool}

    path.write_text(GRID.replace("p3: {n: 2, options: 1, max_options: 5}",
                                 "p3: {n: 2}, taskmaster4: {n: 2, options: 1}"))
    with pytest.raises(ValueError, match="taskmaster4: options: 1 rows listing answer options asked for"):
        build_bench_data(load_config(path))


def test_a_seed_pinned_in_a_methods_params_makes_one_selection_for_every_seed():
    from slimtune.bench.config import MethodSpec
    from slimtune.bench.runner import _selector_is_seeded

    assert _selector_is_seeded(MethodSpec(name="less", label="less", online=False, params={}))
    assert not _selector_is_seeded(MethodSpec(name="less", label="less", online=False, params={"seed": 0}))
    assert not _selector_is_seeded(MethodSpec(name="length", label="length", online=False, params={}))


def test_shipped_grids_load_by_name_and_between_them_run_every_registered_method():
    from slimtune.online import POLICIES
    from slimtune.select import SELECTORS

    grids = {name: load_config(name) for name in ("cpu-quick", "cpu-small", "cpu-targeted", "gpu")}
    assert {name: grid.name for name, grid in grids.items()} == {name: name for name in grids}
    in_grid = {method.name for name in ("cpu-small", "cpu-targeted") for method in grids[name].methods}
    always = {"random", "uniform"}  # the grid adds random itself; uniform is random drawn online
    assert (set(SELECTORS) | set(POLICIES)) - always <= in_grid


@pytest.mark.usefixtures("shared_data")
def test_a_grid_builds_selection_artifacts_in_its_own_cache_so_costs_are_from_scratch(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace("methods: [length, {name: big-loss, online: true}]",
                                 "methods: [{name: delift, params: {sparse_k: null, max_text_tokens: 16}}]"))
    config = load_config(path)
    first, second = (GridRunner(config, tmp_path / name) for name in ("first", "second"))
    cell = next(c for c in grid_cells(config) if c.method.name == "delift")
    built, _, _ = first._select(cell)
    assert list((tmp_path / "first" / "cache" / "features").iterdir())  # the kernel blocks, kept for a resume
    again, _, _ = second._select(cell)  # another grid: the first one's blocks are not its own
    assert again.cost.details["pool_kernel_blocks_from_cache"] == 0
    assert again.cost.forward_tokens == built.cost.forward_tokens > 0


@pytest.mark.usefixtures("shared_data")
def test_a_shared_selection_is_charged_to_the_cell_that_computed_it_even_after_a_resume(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace("seeds: [0]", "seeds: [0, 1]").replace(
        "methods: [length, {name: big-loss, online: true}]", "methods: [loss]"))
    config = load_config(path)
    seed0, seed1 = (c for c in grid_cells(config) if c.method.name == "loss")
    runner = GridRunner(config, tmp_path / "grid")
    selection, seconds, tokens = runner._select(seed0)  # loss has no seed: one selection for both cells
    assert (seconds, tokens) == (selection.cost.seconds, selection.cost.tokens) and tokens > 0
    shared, _, tokens1 = runner._select(seed1)
    assert shared.kept == selection.kept and tokens1 == 0  # the second cell only loads it
    # a grid killed after seed 0 selected but before its row was written: the resumed cell loads its own
    # selection back, and is charged what computing it cost, or nobody would be
    resumed = GridRunner(config, tmp_path / "grid")
    assert resumed._select(seed0)[1:] == (selection.cost.seconds, tokens)
    assert resumed._select(seed1)[2] == 0


USER_GRID = """
name: my-data
model: tiny
pool: {data: POOL, size: 6, max_length: 96}
eval: {support: {data: EVAL, n: 2}, gsm8k: {n: 2}}
target_per_task: 1
train: {epochs: 1, batch_size: 4}
budgets: [0.5]
methods: [length]
"""


def test_a_grid_takes_the_users_pool_and_eval_sets(tmp_path):
    pool, dev = tmp_path / "pool.jsonl", tmp_path / "dev.jsonl"
    pool.write_text("".join(f'{{"question": "q{i}", "answer": "{"a" * (i + 1)}"}}\n' for i in range(10)))
    dev.write_text("".join(f'{{"question": "d{i}", "answer": "b"}}\n' for i in range(3)))
    path = tmp_path / "grid.yaml"
    path.write_text(USER_GRID.replace("POOL", str(pool)).replace("EVAL", str(dev)))
    config = load_config(path)
    assert (config.pool.data, config.pool.size, config.pool.sizes) == (str(pool), 6, {})
    assert [(ev.task, ev.data) for ev in config.evals] == [("support", str(dev)), ("gsm8k", None)]
    data = build_bench_data(config)
    assert len(data.pool) == 6 and {ex.metadata["source"] for ex in data.pool} == {"pool"}
    assert len(data.evals["support"]) == 2 and {ex.metadata["source"] for ex in data.all_targets} >= {"dev"}


POOL_LINE, EVAL_ENTRY = "pool: {data: POOL, size: 6, max_length: 96}", "support: {data: EVAL, n: 2}"


@pytest.mark.parametrize(("old", "new", "message"), [
    (POOL_LINE, "pool: {data: POOL, sizes: {gsm8k: 4}}", "pool: give exactly one of sizes"),
    (POOL_LINE, "pool: {sizes: {mine: 4}}", r"pool: sizes: \['mine'\] are not recipes"),
    (POOL_LINE, "pool: {data: POOL, size: 0}", "pool: size: expected a positive number of rows, got 0"),
    (POOL_LINE, "pool: {data: POOL, rows: 6}", r"pool: unknown keys \['rows'\]"),
    (POOL_LINE, "pool: {data: '', size: 6}", "pool: data: expected a non-empty string"),
    (EVAL_ENTRY, "support: {n: 2}", "eval: support: not a recipe .* needs data:"),
    (EVAL_ENTRY, "support: {data: EVAL, n: 2, shape: alpaca}", r"eval: support: unknown keys \['shape'\]"),
    ("gsm8k: {n: 2}", "gsm8k: {n: 2, subset: main}", "eval: gsm8k: subset applies to data:"),
    (EVAL_ENTRY, "support: {data: EVAL, n: two}", "eval: support: n: expected a positive number of rows"),
    (EVAL_ENTRY, "support: {data: EVAL, n: 2, generate_seeds: 0}", "eval: support: generate_seeds: expected a "
                                                                    "non-empty list of seeds"),
    ("train: {epochs: 1, batch_size: 4}", "train: {epochs: 1, batch: 4}", r"train: unknown keys \['batch'\]"),
    ("train: {epochs: 1, batch_size: 4}", "train: [1, 4]", "train: expected a mapping of"),
])
def test_a_grid_config_error_names_the_key(tmp_path, old, new, message):
    path = tmp_path / "grid.yaml"
    path.write_text(USER_GRID.replace(old, new).replace("POOL", "pool.jsonl").replace("EVAL", "dev.jsonl"))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_config(path)


TARGETED_GRID = """
name: tiny-targeted
model: tiny
pool: {sizes: {p3: 12, tatoeba: 12}, exclude: [p3:sciq], max_length: 96}
eval: {tatoeba:deu-eng: {n: 3, max_new_tokens: 4, generate: [random, best], generate_seeds: [0]},
       p3:sciq: {n: 3, split: all}}
per_target: true
target_per_task: 2
train: {epochs: 1, batch_size: 4, lora_r: 2, lora_alpha: 4}
budgets: [0.25]
seeds: [0, 1]
full_seeds: [0]
methods: [length, oracle]
"""


@pytest.mark.usefixtures("shared_data")
def test_a_targeted_grid_selects_per_target_and_keeps_held_out_targets_out_of_the_pool(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(TARGETED_GRID)
    config = load_config(path)
    data = build_bench_data(config)
    assert not any(ex.task.startswith("sciq") for ex in data.pool)  # the absent target is absent
    everything = {ex.id for rows in (*data.evals.values(), *data.targets.values()) for ex in rows}
    assert not everything & {ex.id for ex in data.pool}
    assert {task: len(rows) for task, rows in data.targets.items()} == {"tatoeba:deu-eng": 2, "p3:sciq": 2}

    run_grid(path, out_dir=tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "results.csv").set_index("cell")
    # the oracle selects once per target; random and length once for both
    assert {c for c in table.index if c.startswith("oracle")} == {
        f"oracle-{t}-b0.25-s{s}" for t in ("tatoeba-deu-eng", "p3-sciq") for s in (0, 1)}
    assert {c for c in table.index if c.startswith("random")} == {"random-b0.25-s0", "random-b0.25-s1"}
    # a targeted cell is evaluated on its own target only; an untargeted one on both
    assert pd.isna(table.loc["oracle-p3-sciq-b0.25-s0", "tatoeba:deu-eng/loss"])
    assert table.loc["random-b0.25-s0", ["tatoeba:deu-eng/loss", "p3:sciq/loss"]].notna().all()
    # generation only at the seeds the eval names, for the cells it names and for the best; loss everywhere
    chrf = table["tatoeba:deu-eng/chrf"].dropna()
    assert "random-b0.25-s0" in chrf.index and not any(cell.endswith("-s1") for cell in chrf.index)
    assert any(cell.startswith(("length", "oracle")) for cell in chrf.index)
    assert table.filter(like="-s1", axis=0)["tatoeba:deu-eng/loss"].notna().sum() == 3
    # the oracle kept the target's own rows first: every Tatoeba German -> English row of the pool
    from slimtune.select import Selection

    kept = Selection.load(tmp_path / "out" / "selections" / "oracle-tatoeba-deu-eng-b0.25-s0").subset(data.pool)
    own = [ex for ex in data.pool if ex.task == "deu-eng"]
    assert {ex.id for ex in own} <= {ex.id for ex in kept}
    assert all(ex.metadata["source"] == "tatoeba" for ex in kept)
    targets = pd.read_csv(tmp_path / "out" / "targets.csv")
    assert set(targets["target"]) == {"tatoeba:deu-eng", "p3:sciq"}
    oracle = targets[targets["method"] == "oracle"]
    assert all(share == pytest.approx(1.0) for share in oracle["oracle_share"].dropna())
    assert "## Targets" in (tmp_path / "out" / "report.md").read_text()
