import json
from dataclasses import replace

import numpy as np
import pytest

from slimtune.data.example import make_example, pool_hash
from slimtune.features.gradients import FEATURES, NORMS
from slimtune.features.store import FeatureStore
from slimtune.select import Selection, get_selector
from slimtune.select.less import LessSelector, run_checkpoints
from slimtune.train import TrainSettings


def gsm8k(shared_data, split, rows):
    """GSM8K problems short enough to keep their whole answer within the tests' 128 tokens."""
    records = [json.loads(line) for line in open(shared_data / "gsm8k" / f"{split}.jsonl")]
    short = [r for r in records if len(r["question"]) + len(r["answer"]) < 280][rows]
    return [make_example([{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}], task="gsm8k") for r in short]


def tatoeba(shared_data, lang, rows):
    source = open(shared_data / "tatoeba" / f"tatoeba.{lang}-eng.{lang}").read().splitlines()[rows]
    english = open(shared_data / "tatoeba" / f"tatoeba.{lang}-eng.eng").read().splitlines()[rows]
    return [make_example([{"role": "user", "content": f"Translate to English: {s}"},
                          {"role": "assistant", "content": e}], task=f"tatoeba-{lang}")
            for s, e in zip(source, english)]


@pytest.fixture(scope="module")
def pool(shared_data):
    """Interleaved math word problems and French-English translations."""
    math, french = gsm8k(shared_data, "train", slice(0, 10)), tatoeba(shared_data, "fra", slice(0, 10))
    return [ex for pair in zip(math, french) for ex in pair]


SMALL_TRAINING = {"epochs": 2, "batch_size": 2, "grad_accum": 1, "learning_rate": 1e-3,
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}


def small_less(cache, **kw):
    """LESS at test scale: the tiny model, a rank-4 LoRA, a fifth of the pool for a 2-epoch warm-up."""
    base = dict(model="tiny", warmup_fraction=0.2, training=SMALL_TRAINING, max_length=128, proj_dim=512,
                shard_rows=6, grad_batch_size=4, cache_dir=str(cache))
    return get_selector("less", **{**base, **kw})


@pytest.fixture(scope="module")
def warm(tmp_path_factory, pool, shared_data):
    """One full LESS run (warm-up, Adam features at both checkpoints, target gradients) toward GSM8K."""
    cache = tmp_path_factory.mktemp("less")
    target = gsm8k(shared_data, "test", slice(0, 4))
    return cache, target, small_less(cache).select(pool, 10, target=target)


def test_less_keeps_the_pool_examples_of_the_target_task(warm, pool):
    cache, target, selection = warm
    for chosen in (selection, small_less(cache, aggregate="mean-gradient").select(pool, 10, target=target)):
        kept_tasks = [pool[i].task for i in chosen.kept]
        assert kept_tasks.count("gsm8k") >= 8, kept_tasks
    cost = selection.cost
    assert cost.forward_tokens > 0 and cost.backward_tokens == cost.forward_tokens and cost.seconds > 0
    details = cost.details["less"]
    assert len(details["checkpoints"]) == 2 and details["warmup_rows"] == 4
    assert details["pool_features"]["rows"] == 2 * len(pool)  # once per checkpoint
    assert sum(c["weight"] for c in details["checkpoints"]) == pytest.approx(1)


def test_a_repeated_selection_reuses_the_warm_up_and_every_feature_shard(warm, pool):
    cache, target, first = warm
    again = small_less(cache).select(pool, 10, target=target)
    assert np.array_equal(first.scores, again.scores) and first.kept == again.kept
    details = again.cost.details["less"]
    assert "warmup_seconds" not in details and again.cost.forward_tokens == 0
    assert details["pool_features"]["shards"] == {"computed": 0, "reused": 2 * 4}


def test_diverse_less_reads_the_stored_features_of_every_checkpoint(warm, pool):
    """On the real stores (float16 shards, two checkpoints) diverse LESS reuses every shard, keeps the budget
    of distinct rows, and still leans to the target task."""
    cache, target, _ = warm
    diverse = small_less(cache, diverse=True, diverse_k=5).select(pool, 10, target=target)
    assert diverse.cost.forward_tokens == 0 and len(set(diverse.kept)) == 10
    kept_tasks = [pool[i].task for i in diverse.kept]
    # The first pick is the row that covers most relevance, which need not be a target-task row itself; how
    # far the whole selection leans to the target is what diversity may not undo.
    assert kept_tasks.count("gsm8k") >= 5, kept_tasks


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("less-cold")


@pytest.mark.parametrize("aggregate", ["mean-gradient", "mean-cosine"])
def test_chunked_scoring_equals_in_memory_scoring(cold_cache, pool, shared_data, aggregate):
    """Without warm-up (plain gradients of a fresh LoRA), two target subtasks, the pool read two rows at a
    time: the scores are the in-memory formula's, max over subtasks of the aggregated cosines."""
    # Rows after the pool's, from files the bundled sample has enough short rows of (for a clone without the data)
    target = gsm8k(shared_data, "train", slice(10, 13)) + tatoeba(shared_data, "fra", slice(100, 102))
    less = small_less(cold_cache, warmup=False, chunk_rows=2, aggregate=aggregate)
    chunked = less.select(pool, 6, target=target)
    stores = {store.key["rows"]: store for store in map(FeatureStore, (cold_cache / "features").iterdir())}
    features = np.asarray(stores[pool_hash(pool)].open(FEATURES), dtype=np.float32)
    targets = np.asarray(stores[pool_hash(target)].open(FEATURES), dtype=np.float32)
    subtasks = [slice(0, 3), slice(3, 5)]
    if aggregate == "mean-cosine":
        cosines = features @ targets.T
        per_subtask = [cosines[:, rows].mean(1) for rows in subtasks]
    else:  # cosine with each subtask's mean (unnormalised) gradient
        grads = targets * np.asarray(stores[pool_hash(target)].open(NORMS))[:, None]
        means = [grads[rows].mean(0) for rows in subtasks]
        per_subtask = [features @ (m / np.linalg.norm(m)) for m in means]
    assert np.allclose(chunked.scores, np.max(per_subtask, axis=0), atol=1e-5)
    assert chunked.cost.details["less"]["subtasks"] == ["gsm8k", "tatoeba-fra"]


def test_checkpoint_weights_are_the_epochs_mean_learning_rates(tmp_path):
    history = [{"step": s, "learning_rate": lr} for s, lr in enumerate([4, 4, 3, 3, 2, 2], start=1)]
    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    checkpoints = run_checkpoints(tmp_path)
    assert [c.weight for c in checkpoints] == pytest.approx([4 / 9, 3 / 9, 2 / 9])
    assert [c.path.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_a_selector_rebuilt_from_its_saved_manifest_equals_the_one_that_selected(warm, pool, tmp_path):
    cache, _, selection = warm
    selection.save(tmp_path / "sel", pool)
    params = dict(Selection.load(tmp_path / "sel").params)
    assert params["training"]["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}
    params.pop("budget")
    assert get_selector("less", **params) == small_less(cache)


def test_the_default_warm_up_is_the_papers_and_a_nested_mapping_changes_only_the_keys_it_names():
    paper = LessSelector().training
    assert (paper.epochs, paper.learning_rate, paper.lr_scheduler, paper.warmup_ratio, paper.weight_decay,
            paper.batch_size * paper.grad_accum) == (4, 2e-5, "linear", 0.03, 0.0, 32)
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout) == (128, 512, 0.1)
    changed = get_selector("less", training={"epochs": 1, "lora": {"r": 16}}).training
    assert changed == replace(paper, epochs=1, lora=replace(paper.lora, r=16))
    with pytest.raises(TypeError, match=r"no parameter training\.lora\.rr; it takes: alpha, dropout, r"):
        get_selector("less", training={"lora": {"rr": 16}})
    with pytest.raises(ValueError, match=r"training\.seed: the selector sets this"):
        get_selector("less", training={"seed": 3})
    with pytest.raises(ValueError, match=r"training\.lora must be LoRA settings"):
        LessSelector(training=TrainSettings(lora=None))


class _NoTraining(Exception):
    pass


def test_the_warm_up_folder_changes_with_every_training_value(tmp_path, pool, shared_data, monkeypatch):
    """The cached warm-up is keyed by every warm-up setting: the same settings find the same folder, a change
    anywhere in ``training`` (a top-level number or one of the LoRA's) another."""
    import slimtune.select.less as less

    folders = []

    def record(subset, *, model, settings):
        folders.append(settings.output_dir)
        raise _NoTraining

    monkeypatch.setattr(less, "train", record)
    target = gsm8k(shared_data, "test", slice(0, 1))
    for training in (SMALL_TRAINING, SMALL_TRAINING, {**SMALL_TRAINING, "learning_rate": 2e-3},
                     {**SMALL_TRAINING, "lora": {**SMALL_TRAINING["lora"], "dropout": 0.1}}):
        with pytest.raises(_NoTraining):
            small_less(tmp_path, training=training).select(pool, 2, target=target)
    assert folders[0] == folders[1] and len(set(folders)) == 3


def test_dotted_params_on_the_command_line_set_the_warm_up(tmp_path, pool, shared_data):
    from typer.testing import CliRunner

    from slimtune.cli import app

    files = {}
    for name, rows in (("pool", pool), ("target", gsm8k(shared_data, "test", slice(0, 2)))):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"messages": list(ex.messages)}) + "\n" for ex in rows))
    cache, out = tmp_path / "cache", tmp_path / "sel"
    params = {"training.epochs": 1, "training.batch-size": 2, "training.grad_accum": 1, "training.lora.r": 4,
              "training.lora.alpha": 8, "warmup_fraction": 0.2, "proj_dim": 256, "max_length": 128,
              "cache_dir": str(cache)}
    result = CliRunner().invoke(app, ["select", "--method", "less", "--model", "tiny", "--budget", "4",
                                      "--data", str(files["pool"]), "--target", str(files["target"]),
                                      "--out", str(out), *[a for k, v in params.items() for a in ("-p", f"{k}={v}")]])
    assert result.exit_code == 0, result.output
    [warmup] = (cache / "less-warmup").iterdir()
    [checkpoint] = warmup.glob("checkpoint-*")  # one epoch, one checkpoint
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 4
    training = json.loads((out / "manifest.json").read_text())["params"]["training"]
    assert (training["epochs"], training["batch_size"], training["learning_rate"]) == (1, 2, 2e-5)
    assert training["lora"] == {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": None}


def test_less_is_registered_and_refuses_unknown_options():
    assert isinstance(get_selector("less", model="tiny"), LessSelector)
    with pytest.raises(ValueError, match="aggregate"):
        LessSelector(aggregate="max")
    with pytest.raises(ValueError, match="unknown projector"):
        LessSelector(projector="gaussian")


def test_default_aggregation_is_the_authors_mean_cosine_not_the_norm_weighted_mean_gradient(tmp_path):
    """One subtask of three target rows: row 0's gradient is 100 times longer than the others'. Pool row 0
    points along it, pool row 1 along the direction the other two share. The authors' mean of cosines gives
    each target row one vote (pool row 1: 2/3 beats 1/3); the mean gradient is row 0's direction alone."""
    e = np.eye(4, dtype=np.float32)
    pool, target = FeatureStore(tmp_path / "pool"), FeatureStore(tmp_path / "target")
    pool.write(FEATURES, 0, 2, np.stack([e[0], e[1]]))
    target.write(FEATURES, 0, 3, np.stack([e[0], e[1], e[1]]))
    target.write(NORMS, 0, 3, np.array([100.0, 1.0, 1.0], dtype=np.float32))
    subtasks = {"task": [0, 1, 2]}

    def similarity(selector: LessSelector) -> np.ndarray:
        return selector._similarity(pool, target, subtasks, 2, 3)[:, 0].numpy()

    authors = similarity(LessSelector())
    np.testing.assert_allclose(authors, [1 / 3, 2 / 3], atol=1e-6)
    paper = similarity(LessSelector(aggregate="mean-gradient"))
    assert paper[0] > 0.99 and paper[1] < 0.03  # the long row's direction wins


def test_diverse_less_covers_the_relevant_clusters_where_plain_less_takes_near_duplicates(tmp_path,
                                                                                           monkeypatch):
    """Constructed features (one checkpoint, one target along e0): three near-duplicates with LESS score
    0.9, two rows of a second relevant cluster (0.7), two of a third (0.5), three irrelevant rows. Plain LESS
    keeps the three duplicates; diverse LESS keeps one row of each relevant cluster."""
    from slimtune.select.less import Checkpoint

    rng = np.random.default_rng(0)
    e = np.eye(8)

    def row(relevance, direction, jitter=1e-3):
        v = relevance * e[0] + np.sqrt(1 - relevance ** 2) * e[direction] + jitter * rng.normal(size=8)
        return v / np.linalg.norm(v)

    features = np.stack([row(0.9, 1) for _ in range(3)] + [row(0.7, 2) for _ in range(2)]
                        + [row(0.5, 3) for _ in range(2)] + [e[d] for d in (4, 5, 6)]).astype(np.float32)
    cluster = ["a", "a", "a", "b", "b", "c", "c", "-", "-", "-"]
    pool_store, target_store = FeatureStore(tmp_path / "pool"), FeatureStore(tmp_path / "target")
    pool_store.write(FEATURES, 0, len(features), features)
    target_store.write(FEATURES, 0, 1, e[:1].astype(np.float32))
    monkeypatch.setattr(LessSelector, "_checkpoints", lambda self, pool, cost, details: [Checkpoint(None, 1.0)])
    monkeypatch.setattr(LessSelector, "_features", lambda self, *args: (pool_store, target_store))
    pool = [make_example([{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}], task="pool") for i in range(10)]
    target = [make_example([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], task="t")]

    plain = LessSelector(model="tiny").select(pool, 3, target=target)
    assert sorted(cluster[i] for i in plain.kept) == ["a", "a", "a"]
    diverse = LessSelector(model="tiny", diverse=True, diverse_k=4).select(pool, 3, target=target)
    assert sorted(cluster[i] for i in diverse.kept) == ["a", "b", "c"]
    assert diverse.params["diverse"] is True and len(diverse.kept) == 3
