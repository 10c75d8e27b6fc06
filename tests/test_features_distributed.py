import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from slimtune.features.gradients import FEATURES, NORMS
from slimtune.features.store import FeatureStore

WORKER = Path(__file__).with_name("less_extract_worker.py")


def run(tmp_path, name, shared_data, processes):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(processes)]
    launcher = torchrun if processes > 1 else [sys.executable]
    command = [*launcher, str(WORKER), str(tmp_path / name / "store"), str(tmp_path / name / "report"),
               str(shared_data)]
    # one thread per process on both sides, so floating-point reductions run in the same order
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / name / "report").glob("rank-*.json"))]
    return FeatureStore(tmp_path / name / "store"), reports


def test_a_two_process_torchrun_extraction_writes_the_store_of_a_one_process_run(tmp_path, shared_data):
    merged, reports = run(tmp_path, "two", shared_data, 2)
    single, [alone] = run(tmp_path, "one", shared_data, 1)
    # 7 rows in shards of 2, claimed one at a time: together the ranks computed each shard exactly once
    assert sum(r["computed"] for r in reports) == 4 and sum(r["rows"] for r in reports) == 7
    assert alone["computed"] == 4
    assert [(s.lo, s.hi) for s in merged.shards(FEATURES)] == [(s.lo, s.hi) for s in single.shards(FEATURES)]
    for name in (FEATURES, NORMS):
        assert np.array_equal(np.asarray(merged.open(name, 7)), np.asarray(single.open(name, 7)))


FILL_WORKER = """
import json, sys, time
from pathlib import Path
import numpy as np
from slimtune.features.store import FeatureStore
store, go, delay, report = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])

def compute(lo, hi):
    time.sleep(delay)
    x = np.sin(np.arange(lo * 5, hi * 5, dtype=np.float32)).reshape(hi - lo, 5)
    return {"x": x, "n": np.arange(lo, hi)}

report.with_suffix(".ready").touch()
while not go.exists():
    time.sleep(0.02)
report.write_text(json.dumps(FeatureStore(store).fill(("x", "n"), 61, 4, compute, timeout=120)))
"""
SHARDS = 16  # 61 rows in shards of 4


def start_ranks(tmp_path, store, world, delay):
    """``world`` plain processes with RANK / WORLD_SIZE set, released together once all have started."""
    go = tmp_path / f"go-{store.name}-{world}"
    reports = [tmp_path / f"{store.name}-{world}-rank{rank}.json" for rank in range(world)]
    procs = [subprocess.Popen([sys.executable, "-c", FILL_WORKER, str(store), str(go), str(delay), str(report)],
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world)},
                              stderr=subprocess.PIPE, text=True)
             for rank, report in enumerate(reports)]
    deadline = time.monotonic() + 300
    while not all(r.with_suffix(".ready").exists() for r in reports) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    return procs, reports


def finish(procs, reports):
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(r.read_text()) for r in reports]


def arrays(store):
    return [np.asarray(FeatureStore(store).open(name, 61)) for name in ("x", "n")]


def test_two_ranks_claiming_shards_write_the_store_of_one_process(tmp_path):
    single = finish(*start_ranks(tmp_path, tmp_path / "one", 1, 0.0))
    both = finish(*start_ranks(tmp_path, tmp_path / "two", 2, 0.05))
    assert single == [{"computed": SHARDS, "reused": 0}]
    assert sum(r["computed"] for r in both) == SHARDS and all(r["computed"] > 0 for r in both)
    for merged, alone in zip(arrays(tmp_path / "two"), arrays(tmp_path / "one")):
        assert np.array_equal(merged, alone)
    assert not list((tmp_path / "two").rglob("*.claim"))


def test_a_fill_killed_mid_way_resumes_on_three_ranks_with_only_the_missing_shards_spread_over_them(tmp_path):
    store = tmp_path / "killed"
    [writer], _ = start_ranks(tmp_path, store, 1, 0.3)
    deadline = time.monotonic() + 300
    while len(list((store / "n").glob("*.json"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    writer.send_signal(signal.SIGKILL)
    writer.wait()  # reaped: its pid is gone, so its claim is stale
    done_before = sum(FeatureStore(store).verify("n", lo, min(61, lo + 4)) is None
                      and FeatureStore(store).verify("x", lo, min(61, lo + 4)) is None for lo in range(0, 61, 4))
    assert 4 <= done_before < SHARDS

    resumed = finish(*start_ranks(tmp_path, store, 3, 0.1))
    assert sum(r["computed"] for r in resumed) == SHARDS - done_before
    assert sum(r["computed"] > 0 for r in resumed) >= 2  # the work left was shared, not all done by one rank
    finish(*start_ranks(tmp_path, tmp_path / "whole", 1, 0.0))
    for after_kill, whole in zip(arrays(store), arrays(tmp_path / "whole")):
        assert np.array_equal(after_kill, whole)
    assert not list(store.rglob("*.claim"))
