"""Fault injection (issue 18): ``kill -9`` at exact points of every long job, and a damaged byte in every kind of
cache file, each followed by a rerun that must give the uninterrupted run's result (or a named error).

Each job runs as the user runs it, through the CLI, on the tiny model, 16 short rows, max_length 64, seeded,
in a cache of its own (``SLIMTUNE_CACHE``). The uninterrupted run happens once per job, in this process; the
interrupted one in a forked child that SIGKILLs itself at the n-th occurrence of an event (a shard written,
a checkpoint half saved, a training step, ...; hooks in tests/fault_worker.py), the event and n drawn by a
seeded RNG from the points the uninterrupted run passes, so a failure names its point and reproduces; the
rerun in this process again, with everything it had verified forgotten, as a new process. After the
rerun the result must be equal bit for bit (all arithmetic here is deterministic on the CPU) and no claim or
temporary file may be left. The store's own cases (a killed ``fill``, damaged shards and kernel blocks, stale
claims) are in tests/test_features_store.py and tests/test_cache_cli.py; the table of all of them is
"Faults and bad inputs" in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import traceback
import zipfile
from pathlib import Path

import fault_worker
import pytest
import torch

# The killed runs are forked children, and CUDA cannot be used across a fork; bit-exact equality is a CPU fact.
pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or torch.cuda.is_available(),
                                reason="needs fork() and a CPU-only torch")
ROWS, TARGETS = 16, 2

LESS_PARAMS = {"warmup_fraction": 0.5, "training.epochs": 2, "training.batch_size": 4, "training.grad_accum": 1,
               "training.lora.r": 4, "training.lora.alpha": 8, "training.learning_rate": 1e-3, "proj_dim": 64,
               "max_length": 64, "shard_rows": 4, "grad_batch_size": 4}
ONLINE_ARGS = ["--online", "uds", "--keep", "0.5", "--batch-size", "4", "--epochs", "2", "--max-length", "64",
               "--lora-r", "4", "--lora-alpha", "8", "--lr", "0.001"]
GRID = """
name: fault-grid
model: tiny
pool: {sizes: {tatoeba: 8}, max_length: 64}
eval: {tatoeba: {n: 2, generate: []}}
target_per_task: 1
train: {epochs: 1, batch_size: 4, lora_r: 2, lora_alpha: 4}
budgets: [0.5]
seeds: [0]
methods: [length]
"""


# -- helpers -----------------------------------------------------------------------------------------------
def arithmetic(first: int, n: int) -> list[dict]:
    rng = random.Random(first)
    rows = []
    for i in range(first, first + n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op, value = rng.choice([("plus", a + b), ("times", a * b), ("minus", a - b)])
        rows.append({"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {a} {op} {b}?"},
                                                 {"role": "assistant", "content": f"{a} {op} {b} is {value}."}]})
    return rows


def draw(job: str) -> random.Random:
    """The RNG that picks ``job``'s kill points: fixed, unless FAULT_SEED is set to try other points (a soak:
    ``for s in $(seq 20); do FAULT_SEED=$s pytest tests/test_faults.py; done``)."""
    return random.Random(f"{job}{os.environ.get('FAULT_SEED', '')}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def params(values: dict) -> list[str]:
    return [arg for key, value in values.items() for arg in ("-p", f"{key}={json.dumps(value)}")]


def new_cache(path: Path) -> Path:
    """A cache holding only the tiny model (copied from the user's cache, so nothing is built)."""
    from slimtune.models import resolve_model

    path.mkdir(parents=True)
    shutil.copytree(resolve_model("tiny"), path / "tiny-llama")
    return path


def killed(kill: str, cache: Path, *args) -> None:
    """Run ``slimtune args`` with cache ``cache`` in a child process that SIGKILLs itself at ``kill`` (see
    tests/fault_worker.py). The child is forked, so it starts with torch imported instead of paying ~10 s
    for it, and it is killed exactly as a ``kill -9`` from outside would: nothing of it runs after."""
    def job():
        from slimtune.cli import app

        os.environ["SLIMTUNE_CACHE"] = str(cache)
        app([str(a) for a in args], standalone_mode=False)

    killed_in(kill, job)


def killed_in(kill: str, job) -> None:
    """Run ``job()`` in a forked child that SIGKILLs itself at ``kill``; check that it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ["FAULT_KILL"] = kill
            fault_worker.install_hooks()
            job()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"the run was to be killed at {kill} but ended with status {status} (output above)"


def run(cache: Path, *args) -> None:
    """Run ``slimtune args`` in this process, as a new process would: nothing it verified is remembered."""
    from slimtune import utils
    from slimtune.cli import app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMTUNE_CACHE", str(cache))
        patch.setattr(utils, "_verified", {})
        app([str(a) for a in args], standalone_mode=False)


def leftovers(*folders: Path) -> list[Path]:
    """Claim files, temporary files and half-built directories: what a killed process may leave behind."""
    return sorted(p for folder in folders for p in folder.rglob("*")
                  if p.suffix == ".claim" or ".tmp" in p.name or (p.is_dir() and p.name.startswith(".")))


def unexpected_leftovers(*folders: Path) -> list[Path]:
    """:func:`leftovers` but the claims of shards that were finished before the kill, which stay (see
    test_a_kill_between_a_shards_last_write_and_its_claims_removal_leaves_no_claim_after_the_rerun)."""
    return [p for p in leftovers(*folders) if not (p.suffix == ".claim" and p.with_suffix(".json").exists())]


def shard_manifests(cache: Path) -> list[Path]:
    return list((cache / "features").rglob("*-*.json"))


def flip_byte(path: Path, position: int, mask: int = 0x5A) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))


def float_in_the_middle(path: Path) -> int:
    """The sign-and-exponent byte of a float32 in the middle of the largest tensor of a torch zip file or of a
    safetensors file: flipping it changes the value by orders of magnitude, and nothing else."""
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        start = 8 + int.from_bytes(raw[:8], "little")
        size = len(raw) - start
    else:
        with zipfile.ZipFile(path) as archive:
            member = max((info for info in archive.infolist() if "/data/" in info.filename),
                         key=lambda info: info.file_size)
        header = member.header_offset
        start = header + 30 + int.from_bytes(raw[header + 26:header + 28], "little") + \
            int.from_bytes(raw[header + 28:header + 30], "little")
        size = member.file_size
    return start + size // 8 * 4 + 3


def selected(out: Path) -> list[dict]:
    """Every pool row's id, score, kept flag and rank, from a selection's manifest."""
    return json.loads((out / "manifest.json").read_text())["examples"]


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def without_seconds(rows: list[dict]) -> list[dict]:
    """Rows without what measures time (and a checksum, which covers the times)."""
    timed = ("scoring_share", "checksum")
    return [{k: v for k, v in row.items() if not k.endswith("seconds") and k not in timed} for row in rows]


def online_result(run: Path) -> tuple[dict, list, list]:
    from slimtune.online.trainer import read_selection_log

    summary = json.loads((run / "selection_summary.json").read_text())
    return adapter_weights(run), read_selection_log(run), without_seconds([summary])


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def cell_rows(out: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    return without_seconds(rows)


# -- the uninterrupted runs, once per module -------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"pool": write_jsonl(root / "pool.jsonl", arithmetic(0, ROWS)),
            "target": write_jsonl(root / "target.jsonl", arithmetic(ROWS, TARGETS))}


def less_args(data, out) -> list:
    return ["select", "--method", "less", "--model", "tiny", "--budget", "6", "--data", data["pool"],
            "--target", data["target"], "--out", out, *params(LESS_PARAMS)]


def delift_args(data, out) -> list:
    return ["select", "--method", "delift", "--model", "tiny", "--budget", "6", "--objective", "flmi",
            "--data", data["pool"], "--target", data["target"], "--out", out,
            *params({"sparse_k": None, "max_text_tokens": 16})]


def online_args(data, out) -> list:
    return ["train", "--data", data["pool"], "--model", "tiny", "--out", out, *ONLINE_ARGS]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """Run a job once, uninterrupted: ``uninterrupted(name, make_args)`` -> (cache, out), memoised."""
    done = {}

    def once(name, make_args):
        if name not in done:
            root = tmp_path_factory.mktemp(f"whole-{name}")
            cache, out = new_cache(root / "cache"), root / "out"
            run(cache, *make_args(data, out))
            done[name] = cache, out
        return done[name]

    return once


# -- kill -9, then rerun ---------------------------------------------------------------------------------------
def test_less_killed_in_warmup_then_in_extraction_reruns_to_the_uninterrupted_selection(
        tmp_path, data, uninterrupted):
    whole_cache, whole_out = uninterrupted("less", less_args)
    writes = len(shard_manifests(whole_cache))  # one per array per shard: features, then norms
    rng = draw("less")
    in_warmup = rng.choice(["step:3", "checkpoint:1", "checkpoint-partial:1", "checkpoint-partial:2"])
    in_extraction = f"{rng.choice(['shard', 'shard-data'])}:{rng.randint(1, writes - 1)}"
    cache, out = new_cache(tmp_path / "cache"), tmp_path / "out"

    killed(in_warmup, cache, *less_args(data, out))
    [warmup] = (cache / "less-warmup").iterdir()
    assert not (warmup / "slimtune_train.json").exists(), in_warmup
    killed(in_extraction, cache, *less_args(data, out))
    assert (warmup / "slimtune_train.json").exists()
    assert len(shard_manifests(cache)) < len(shard_manifests(whole_cache)), in_extraction
    run(cache, *less_args(data, out))

    assert selected(out) == selected(whole_out), (in_warmup, in_extraction)
    assert unexpected_leftovers(cache, out) == []


@pytest.fixture(scope="module")
def delift_torn(tmp_path_factory, data, uninterrupted):
    """DELIFT killed between writing a kernel block's temporary file and renaming it, then rerun."""
    whole_cache, whole_out = uninterrupted("delift", delift_args)
    blocks = len(shard_manifests(whole_cache))
    kill = f"torn-write:{draw('delift').randint(1, blocks)}"
    root = tmp_path_factory.mktemp("delift-torn")
    cache, out = new_cache(root / "cache"), root / "out"
    killed(kill, cache, *delift_args(data, out))
    assert len(shard_manifests(cache)) < blocks
    run(cache, *delift_args(data, out))
    return kill, cache, out, whole_out


def test_delift_killed_in_the_middle_of_writing_a_kernel_block_reruns_to_the_uninterrupted_selection(
        delift_torn):
    kill, cache, out, whole_out = delift_torn
    assert selected(out) == selected(whole_out), kill
    assert [p for p in unexpected_leftovers(cache, out) if ".tmp" not in p.name] == []


def test_a_torn_kernel_block_write_leaves_no_temporary_file_after_the_rerun(delift_torn):
    kill, cache, out, _ = delift_torn
    assert leftovers(cache, out) == [], kill


def test_a_kill_between_a_shards_last_write_and_its_claims_removal_leaves_no_claim_after_the_rerun(tmp_path):
    import numpy as np

    from slimtune.features.store import FeatureStore

    def rows(lo, hi):
        return {"x": np.arange(lo, hi, dtype=np.float32)[:, None]}

    killed_in("shard:1", lambda: FeatureStore(tmp_path).fill(("x",), 8, 4, rows))
    assert FeatureStore(tmp_path).fill(("x",), 8, 4, rows) == {"computed": 1, "reused": 1}
    assert leftovers(tmp_path) == []


def test_online_training_killed_mid_run_reruns_to_the_uninterrupted_adapter_and_selection_log(
        tmp_path, data, uninterrupted):
    _, whole_out = uninterrupted("online", online_args)
    rng = draw("online")
    kill = f"{rng.choice(['selection', 'step'])}:{rng.randint(1, 7)}"  # 8 candidate batches of 4
    cache, out = new_cache(tmp_path / "cache"), tmp_path / "run"
    killed(kill, cache, *online_args(data, out))
    assert not (out / "adapter").exists()
    run(cache, *online_args(data, out))

    weights, log, summary = online_result(out)
    whole_weights, whole_log, whole_summary = online_result(whole_out)
    assert_same_weights(weights, whole_weights)
    assert log == whole_log and summary == whole_summary, kill
    assert unexpected_leftovers(cache, out) == []


def test_online_training_killed_after_a_checkpoint_resumes_from_it(tmp_path, data, uninterrupted):
    _, whole_out = uninterrupted("online", online_args)
    cache, out = new_cache(tmp_path / "cache"), tmp_path / "run"
    killed("checkpoint:1", cache, *online_args(data, out))
    [checkpoint] = out.glob("checkpoint-*")
    saved = (checkpoint / "trainer_state.json").stat().st_mtime_ns
    run(cache, *online_args(data, out))
    assert (checkpoint / "trainer_state.json").stat().st_mtime_ns == saved  # resumed, not redone
    assert_same_weights(adapter_weights(out), adapter_weights(whole_out))


def bench_args(data, out) -> list:
    grid = out.parent / "grid.yaml"
    grid.write_text(GRID)
    return ["bench", grid, "--out", out]


@pytest.mark.usefixtures("shared_data")
def test_a_bench_grid_killed_mid_cell_or_between_cells_reruns_to_the_uninterrupted_cells(
        tmp_path, data, uninterrupted):
    _, whole_out = uninterrupted("bench", bench_args)
    rng = draw("bench")
    kill = rng.choice([f"cell:{rng.randint(1, 3)}", f"step:{rng.randint(1, 3)}"])  # 4 cells, 4 training steps
    cache, out = new_cache(tmp_path / "cache"), tmp_path / "out"
    killed(kill, cache, *bench_args(data, out))
    assert len(list((out / "cells").glob("*.json"))) < 4
    run(cache, *bench_args(data, out))
    assert cell_rows(out) == cell_rows(whole_out), kill
    assert unexpected_leftovers(cache, out) == []


# -- a damaged byte in each kind of cache file -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_damaged_file_of_a_cached_model_is_named_discarded_and_rebuilt(tmp_path, monkeypatch, caplog, name):
    from slimtune import utils
    from slimtune.models import load_model

    cache = tmp_path / "cache"
    tokenizer = cache / "smollm2-135m-instruct"  # what building the tiny model reads, without the 135M weights
    tokenizer.mkdir(parents=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        source = utils.cache_dir() / "smollm2-135m-instruct" / file
        if source.exists():
            shutil.copy(source, tokenizer / file)
    monkeypatch.setenv("SLIMTUNE_CACHE", str(cache))
    model, _ = load_model("tiny", device="cpu")
    built = {k: v.clone() for k, v in model.state_dict().items()}

    damaged = cache / "tiny-llama" / name
    flip_byte(damaged, damaged.stat().st_size // 2)
    monkeypatch.setattr(utils, "_verified", {})  # the rerun is a new process
    with caplog.at_level("WARNING", logger="slimtune.models"):
        model, _ = load_model("tiny", device="cpu")
    assert f"{damaged}: checksum mismatch" in caplog.text
    assert_same_weights(model.state_dict(), built)
    assert leftovers(cache) == []


@pytest.mark.parametrize("name", ["optimizer.pt", "adapter_model.safetensors"])
def test_a_damaged_less_warmup_checkpoint_is_retrained_or_named(tmp_path, data, uninterrupted, name):
    whole_cache, whole_out = uninterrupted("less", less_args)
    cache, out = tmp_path / "cache", tmp_path / "out"
    shutil.copytree(whole_cache, cache)
    damaged = sorted(cache.glob(f"less-warmup/*/checkpoint-*/{name}"))[-1]
    flip_byte(damaged, float_in_the_middle(damaged))
    try:
        run(cache, *less_args(data, out))
    except Exception as err:  # a named error is the acceptable second best
        assert str(damaged) in str(err) and "slimtune cache clear" in str(err)
    else:
        assert selected(out) == selected(whole_out)


@pytest.mark.usefixtures("shared_data")
@pytest.mark.parametrize("damage", ["cell-number", "cell-syntax", "selection-manifest"])
def test_a_damaged_cached_bench_result_is_named_and_recomputed(tmp_path, data, uninterrupted, capsys, damage):
    whole_cache, whole_out = uninterrupted("bench", bench_args)
    out = tmp_path / "out"
    shutil.copytree(whole_out, out)
    if damage == "selection-manifest":
        damaged = out / "selections" / "length-b0.5" / "manifest.json"
        text = damaged.read_text()
        # a kept row's rank 1 -> 0: still JSON, the subset's order (so the seeded training) changes
        position, mask = text.index('"rank": 1') + len('"rank": '), 0x01
        (out / "cells" / "length-b0.5-s0.json").unlink()  # the cell that reads the selection runs again
    else:
        damaged = out / "cells" / "length-b0.5-s0.json"
        text = damaged.read_text()
        # a digit of the loss changed (still JSON, silently another number), or the opening brace
        position, mask = (text.index("/loss") + len('/loss": 10.'), 0x01) if damage == "cell-number" else (0, 0x5A)
    flip_byte(damaged, position, mask)
    capsys.readouterr()
    from slimtune.bench.runner import run_grid

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLIMTUNE_CACHE", str(whole_cache))
        run_grid(whole_out.parent / "grid.yaml", out_dir=out)
    assert f"{damaged}: damaged" in capsys.readouterr().out.replace("\n", "")
    assert cell_rows(out) == cell_rows(whole_out)


def test_a_damaged_online_selection_state_is_named_on_resume(tmp_path, data, uninterrupted, monkeypatch):
    from slimtune.data import load_examples
    from slimtune.online import get_policy
    from slimtune.online.trainer import SelectionMixin, train_online
    from slimtune.train import TrainSettings

    cache, _ = uninterrupted("online", online_args)
    monkeypatch.setenv("SLIMTUNE_CACHE", str(cache))
    examples = load_examples(data["pool"]).examples[:8]
    settings = TrainSettings(output_dir=str(tmp_path / "run"), epochs=1, batch_size=4, max_length=64,
                             save_checkpoints=True, progress=False)
    train_online(examples, "uds", keep=0.5, model="tiny", settings=settings)
    [checkpoint] = (tmp_path / "run").glob("checkpoint-*")
    damaged = checkpoint / "selection_state.pt"
    flip_byte(damaged, float_in_the_middle(damaged))

    class Resuming:  # what _load_selection_state reads of a trainer
        policy = get_policy("uds")
        global_selection = False

        @staticmethod
        def _state_name():
            return "selection_state.pt"

    with pytest.raises(Exception, match=str(damaged)):
        SelectionMixin._load_selection_state(Resuming(), str(checkpoint))
