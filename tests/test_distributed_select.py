"""Every offline method selects the same rows on 2 processes (torchrun, gloo, CPU) as on one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import private_cache

WORKER = Path(__file__).with_name("distributed_select_worker.py")


def launch(tmp_path: Path, shared_data: Path, processes: int) -> list[dict]:
    run = tmp_path / f"{processes}-processes"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [*(torchrun if processes > 1 else [sys.executable]), str(WORKER), str(run / "report"),
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
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"What is {i} plus {i * 3}?", "output": str(4 * i)}) + "\n"
                            for i in range(24)))
    manifests = []
    for processes in (1, 2):
        out = tmp_path / f"sel-{processes}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command = [*(launcher if processes > 1 else [sys.executable]), "-m", "slimtune", "select", "--method",
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
