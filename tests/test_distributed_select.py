"""Every offline method selects the same rows on 2 processes (torchrun, gloo, CPU) as on one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import private_cache

WORKER = Path(__file__).with_name("distributed_select_worker.py")


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]


def write_sums(path: Path, numbers: range) -> Path:
    """Rows "What is i plus 3i?" -> "4i" in the instruction/output shape, one per number."""
    path.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i * 3}?", "output": str(4 * i)}) + "\n"
                            for i in numbers))
    return path


def launch(tmp_path: Path, shared_data: Path, processes: int) -> list[dict]:
    run = tmp_path / f"{processes}-processes"
    command = [*(torchrun(processes) if processes > 1 else [sys.executable]), str(WORKER), str(run / "report"),
               str(shared_data)]
    # one thread per process on both sides, so floating-point reductions run in the same order; a cache of
    # its own per run, so the 2-process run computes everything rather than reading the 1-process stores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "SLIMTUNE_CACHE": str(private_cache(run / "cache")),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted((run / "report").glob("rank-*.json"))]


@pytest.fixture(scope="module")
def reports(tmp_path_factory, shared_data):
    tmp_path = tmp_path_factory.mktemp("distributed-select")
    return launch(tmp_path, shared_data, 1), launch(tmp_path, shared_data, 2)


def test_each_process_is_placed_on_its_own_device(reports):
    _, ranks = reports
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert [r["device_with_two_gpus"] for r in ranks] == ["cuda:0", "cuda:1"]
    assert [r["device"] for r in ranks] == ["cpu", "cpu"], "no GPU here: every process on the CPU"


@pytest.mark.parametrize("name", ["random", "length", "loss", "ifd", "kcenter-model", "kcenter-minilm", "less",
                                  "delift-sparse", "delift-se", "delift-se-sparse"])
def test_two_processes_select_exactly_what_one_process_selects(reports, name):
    [alone], ranks = reports
    expected = alone["selections"][name]
    for rank in ranks:
        got = rank["selections"][name]
        assert got["kept"] == expected["kept"]
        # bit for bit: shard boundaries do not depend on the number of processes, and one thread each
        np.testing.assert_array_equal(np.array(got["scores"], dtype=float), np.array(expected["scores"], dtype=float))


@pytest.mark.parametrize("name", ["loss", "ifd", "kcenter-model", "less"])
def test_the_processes_share_the_model_work_instead_of_repeating_it(reports, name):
    [alone], ranks = reports
    tokens = [rank["selections"][name]["forward_tokens"] for rank in ranks]
    # Ranks claim shards as they go, so which rank runs which shard (even all of them) depends on timing; what
    # may not happen is a shard run twice: the ranks' tokens add up to one process's.
    assert sum(tokens) == alone["selections"][name]["forward_tokens"]


def test_slimtune_select_under_torchrun_writes_what_one_process_writes(tmp_path):
    """The launch story end to end: `torchrun -m slimtune select` on 2 processes, the CLI's own manifest."""
    pool = write_sums(tmp_path / "pool.jsonl", range(24))
    manifests = []
    for processes in (1, 2):
        out = tmp_path / f"sel-{processes}"
        command = [*(torchrun(2) if processes > 1 else [sys.executable]), "-m", "slimtune", "select", "--method",
                   "loss", "--model", "tiny", "--budget", "6", "--data", str(pool), "--out", str(out),
                   "-p", "max_length=48"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "SLIMTUNE_CACHE": str(private_cache(tmp_path / f"cache-{processes}"))}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        manifests.append(json.loads((out / "manifest.json").read_text()))
    one, two = manifests
    assert [r["id"] for r in one["examples"] if r["kept"]] == [r["id"] for r in two["examples"] if r["kept"]]
    assert [r["score"] for r in one["examples"]] == [r["score"] for r in two["examples"]]


#: The CLI's long offline jobs, small enough to kill mid-way: LESS (warm-up, then extraction shards of 4 rows)
#: and sparse DELIFT (embeddings, neighbour lists, then kernel blocks).
RESUMED_JOBS = {
    "less": ["--method", "less", "-p", "warmup_fraction=0.5", "-p", "training.epochs=1", "-p",
             "training.batch_size=4", "-p", "training.lora.r=4", "-p", "training.lora.alpha=8", "-p", "proj_dim=64",
             "-p", "max_length=48", "-p", "shard_rows=4", "-p", "grad_batch_size=4"],
    "delift": ["--method", "delift", "--objective", "flmi", "-p", "sparse_k=4", "-p", "max_text_tokens=16"],
}


@pytest.mark.parametrize("job", list(RESUMED_JOBS))
def test_a_selection_killed_on_one_process_and_resumed_on_two_selects_what_an_uninterrupted_run_does(tmp_path, job):
    """The kill lands half-way through the feature shards the uninterrupted run writes (tests/fault_worker.py);
    the 2-process rerun claims the shards still missing and must end with the same selection and scores."""
    pool, target = write_sums(tmp_path / "pool.jsonl", range(16)), write_sums(tmp_path / "target.jsonl", range(16, 18))
    fault_worker = Path(__file__).with_name("fault_worker.py")

    def select(name: str, launcher: list[str], **env) -> subprocess.CompletedProcess:
        command = [*launcher, str(fault_worker), "select", "--model", "tiny", "--budget", "6", "--data", str(pool),
                   "--target", str(target), "--out", str(tmp_path / f"sel-{name}"), *RESUMED_JOBS[job]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "SLIMTUNE_CACHE": str(private_cache(tmp_path / f"cache-{name}")), **env}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        done.stderr = done.stdout[-2000:] + done.stderr  # the CLI names bad arguments on stdout
        return done

    def shards(name: str) -> int:
        return len(list((tmp_path / f"cache-{name}" / "features").rglob("*-*.json")))

    whole = select("whole", [sys.executable])
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = select("resumed", [sys.executable], FAULT_KILL=f"shard:{shards('whole') // 2}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert 0 < shards("resumed") < shards("whole")
    resumed = select("resumed", torchrun(2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert shards("resumed") == shards("whole")

    def manifest(name: str) -> list[tuple]:
        rows = json.loads((tmp_path / f"sel-{name}" / "manifest.json").read_text())["examples"]
        return [(r["id"], r["score"], r["kept"], r["rank"]) for r in rows]

    assert manifest("resumed") == manifest("whole")
