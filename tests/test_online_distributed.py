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

import pytest
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


def launch(tmp_path, shared_data, processes=2, timeout=300, mode="fail"):
    """Run this file as ``processes`` ranks; returns each rank's (exit code, stderr), None for a rank that
    was still running at ``timeout`` (a hang)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(tmp_path), str(shared_data), mode],
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


@pytest.mark.parametrize("policy", ["uds", "slap"])
def test_global_selection_on_two_ranks_chooses_what_one_process_chooses(tmp_path, shared_data, policy):
    from slimtune.online.trainer import read_selection_log

    for processes in (1, 2):
        results = launch(tmp_path / f"p{processes}", shared_data, processes, mode=f"global-{policy}")
        assert all(result is not None and result[0] == 0 for result in results), results
    one, two = (read_selection_log(tmp_path / f"p{n}") for n in (1, 2))
    assert len(one) == len(two) == 2  # 32 rows, 16 candidates a step (1 x 16 or 2 x 8)
    assert [step["index"] for step in one] == [step["index"] for step in two]
    assert [step["chosen"] for step in one] == [step["chosen"] for step in two]
    assert all(len(step["chosen"]) == 4 for step in one)
    if policy == "slap":  # the strata and their slots are the pool's, not a rank's
        assert [step["policy"]["allocation"] for step in one] == [step["policy"]["allocation"] for step in two]
    states = [torch.load(tmp_path / "p1" / "state.rank0.pt")] + \
        [torch.load(tmp_path / "p2" / f"state.rank{r}.pt") for r in (0, 1)]
    assert states[1] == states[2] if policy == "slap" else torch.equal(states[1], states[2])  # same everywhere
    if policy == "slap":  # the window: every candidate's loss in pooled order, whatever ranks scored them
        assert states[0]["window_tasks"] == states[1]["window_tasks"]
        assert torch.allclose(torch.tensor(states[0]["window_loss"]), torch.tensor(states[1]["window_loss"]),
                              rtol=1e-3, atol=1e-3)
    else:
        assert torch.allclose(states[0], states[1], rtol=1e-3, atol=1e-3)


def main(out_dir: str, data_dir: str, mode: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import gsm8k_examples

    from slimtune.models import LoraSettings
    from slimtune.online.policies.slap import SLAPPolicy
    from slimtune.online.policies.uds import UDSPolicy
    from slimtune.online.trainer import SelectiveTrainer, train_online
    from slimtune.train import TrainSettings

    world = int(os.environ["WORLD_SIZE"])
    if mode == "fail":
        settings = TrainSettings(output_dir=out_dir, epochs=1, batch_size=2, max_length=160, progress=False,
                                 lora=LoraSettings(r=4, alpha=8, dropout=0.0), logging_steps=1)
        train_online(gsm8k_examples(Path(data_dir), 8), FailsOnRankOne(), keep=0.5, model="tiny",
                     settings=settings)
        return
    policy = UDSPolicy() if mode == "global-uds" else SLAPPolicy(strata=2)

    class Recording(SelectiveTrainer):  # keeps its rank's policy state for the test to compare
        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            state = self.policy.state_dict()
            torch.save(state["memory"] if mode == "global-uds" else state,
                       Path(out_dir) / f"state.rank{self.args.process_index}.pt")
            return result

    settings = TrainSettings(output_dir=out_dir, epochs=1, batch_size=16 // world, max_length=160, progress=False,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0), logging_steps=1)
    train_online(gsm8k_examples(Path(data_dir), 32), policy, keep=0.25, model="tiny", settings=settings,
                 trainer_class=Recording, global_selection=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
