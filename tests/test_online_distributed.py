"""Online selection under DDP: two gloo processes on the CPU, each launched by hand so that neither is killed
by a launcher when the other fails (torchrun would hide a hang by terminating the survivor).

Run as a script, this file is one rank: ``RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python
tests/test_online_distributed.py OUT_DIR DATA_DIR``.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from slimtune.online.base import Policy

MESSAGE = "policy broke on rank 1"


class FailsOnRankOne(Policy):
    """Scores like any policy, then raises on rank 1 only, as a policy meeting one rank's bad row would."""

    name = "fails-on-rank-one"

    def choose(self, batch, k):
        if torch.distributed.get_rank() == 1:
            raise RuntimeError(MESSAGE)
        return torch.topk(batch.loss, k).indices


def launch(tmp_path, shared_data, processes=2, timeout=300):
    """Run this file as ``processes`` ranks; returns each rank's (exit code, stderr), None for a rank that
    was still running at ``timeout`` (a hang)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(tmp_path), str(shared_data)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(processes)]
    results = []
    for process in ranks:
        try:
            _, err = process.communicate(timeout=timeout)
            results.append((process.returncode, err))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            results.append(None)
    return results


def test_a_policy_failing_on_one_rank_stops_every_rank_with_its_message(tmp_path, shared_data):
    results = launch(tmp_path, shared_data)
    assert None not in results, "a rank hung after the other failed"
    for code, err in results:
        assert code != 0 and MESSAGE in err, err[-3000:]


def main(out_dir: str, data_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import gsm8k_examples

    from slimtune.models import LoraSettings
    from slimtune.online.trainer import train_online
    from slimtune.train import TrainSettings

    settings = TrainSettings(output_dir=out_dir, epochs=1, batch_size=2, max_length=160, progress=False,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0), logging_steps=1)
    train_online(gsm8k_examples(Path(data_dir), 8), FailsOnRankOne(), keep=0.5, model="tiny", settings=settings)


if __name__ == "__main__":
    main(*sys.argv[1:3])
