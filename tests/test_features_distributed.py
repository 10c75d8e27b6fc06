import json
import os
import subprocess
import sys
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
    # 7 rows in shards of 2: rank 0 owns shards 0 and 2, rank 1 shards 1 and 3; each computed only its own
    assert [r["computed"] for r in reports] == [2, 2] and [r["rows"] for r in reports] == [4, 3]
    assert alone["computed"] == 4
    assert [(s.lo, s.hi) for s in merged.shards(FEATURES)] == [(s.lo, s.hi) for s in single.shards(FEATURES)]
    for name in (FEATURES, NORMS):
        assert np.array_equal(np.asarray(merged.open(name, 7)), np.asarray(single.open(name, 7)))
