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


@pytest.mark.parametrize("policy", ["uds", "slap", "stale"])
def test_global_selection_on_two_ranks_chooses_what_one_process_chooses(tmp_path, shared_data, policy):
    from slimtune.online.trainer import read_selection_log

    for processes in (1, 2):
        results = launch(tmp_path / f"p{processes}", shared_data, processes, mode=f"global-{policy}")
        assert all(result is not None and result[0] == 0 for result in results), results
    one, two = (read_selection_log(tmp_path / f"p{n}") for n in (1, 2))
    if policy == "stale":  # big-loss on stale losses, 2 epochs: ranks exchange what their training forwards saw
        assert len(one) == len(two) == 4
        assert [step["chosen"] for step in one] == [step["chosen"] for step in two]
        caches = [torch.load(tmp_path / "p1" / "state.rank0.pt")] + \
            [torch.load(tmp_path / "p2" / f"state.rank{r}.pt") for r in (0, 1)]
        assert torch.equal(caches[1].nan_to_num(-1), caches[2].nan_to_num(-1))  # one cache on every rank
        assert (~caches[1].isnan()).sum() == 16  # 4 steps of 4 trained rows, each row at most once
        assert torch.allclose(caches[0], caches[1], rtol=1e-3, atol=1e-3, equal_nan=True)
        return
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
    else:  # UDS's memory sums logits products of magnitude ~1e4: rounding differs with the batch shape (1 x 16
        # or 2 x 8) by ~1e-7 of that scale, more than 1e-3 absolute on an entry near 0
        assert torch.allclose(states[0], states[1], rtol=1e-3, atol=1e-5 * float(states[1].abs().max()))


def test_global_selection_resumed_at_another_world_size_goes_on_as_the_uninterrupted_run(tmp_path, shared_data):
    """Two processes of 8 candidates with a checkpoint after each of 2 steps; the same run killed after step 1
    is resumed by one process of 2 micro-batches of 8: its policy memory, log and counts are the whole run's."""
    import json
    import shutil

    from slimtune.online.trainer import read_selection_log

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    results = launch(whole, shared_data, 2, mode="resume-first")
    assert all(result is not None and result[0] == 0 for result in results), results
    shutil.copytree(whole, resumed)  # as the kill after step 1 leaves the folder
    for later in ("checkpoint-2", "state.rank0.pt", "state.rank1.pt", "selection_summary.json"):
        shutil.rmtree(resumed / later) if (resumed / later).is_dir() else (resumed / later).unlink()
    assert {p.name for p in (resumed / "checkpoint-1").glob("selection_state*.pt")} == {"selection_state.pt"}
    results = launch(resumed, shared_data, 1, mode="resume-then")
    assert all(result is not None and result[0] == 0 for result in results), results
    logs = [read_selection_log(run) for run in (whole, resumed)]
    assert [[step["step"] for step in log] for log in logs] == [[0, 1], [0, 1]]
    assert [step["chosen"] for step in logs[0]] == [step["chosen"] for step in logs[1]]
    memories = [torch.load(run / "state.rank0.pt") for run in (whole, resumed)]
    assert torch.allclose(memories[0], memories[1], rtol=1e-3, atol=1e-5 * float(memories[0].abs().max()))
    summaries = [json.loads((run / "selection_summary.json").read_text()) for run in (whole, resumed)]
    assert summaries[0]["examples_trained"] == summaries[1]["examples_trained"] == 8  # 2 steps of K = 4


@pytest.mark.parametrize("fsdp", ["fsdp2", "fsdp1"])
def test_uds_and_slap_score_an_fsdp_sharded_model_as_the_whole_one(tmp_path, shared_data, fsdp):
    """FSDP on 2 CPU processes, both versions: under FSDP2 (fully_shard) the LM head is a DTensor of half the
    vocabulary each, under FSDP1 a view into the root unit's flat shard; the online trainer's scoring step and
    per-epoch pruning gather it and score exactly as on the unsharded model."""
    results = launch(tmp_path, shared_data, mode=fsdp)
    assert all(result is not None and result[0] == 0 for result in results), \
        [None if result is None else result[1][-3000:] for result in results]


def score_sharded(out_dir: str, data_dir: str, version: int) -> None:
    """One rank of the FSDP test: UDS and SLAP features of a batch, and SLAP's pool scores, before and after
    sharding the model with FSDP ``version``."""
    import copy
    from functools import partial

    from helpers import gsm8k_examples
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers import TrainingArguments
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from slimtune.data.tokenize import Collator, TokenizedDataset
    from slimtune.models import load_model
    from slimtune.online.policies.slap import SLAPPolicy
    from slimtune.online.policies.uds import UDSPolicy
    from slimtune.online.pruning import score_pool
    from slimtune.online.trainer import SelectiveTrainer

    torch.distributed.init_process_group("gloo")
    whole, tokenizer = load_model("tiny", device="cpu")
    dataset = TokenizedDataset(gsm8k_examples(Path(data_dir), 8), tokenizer, 160)
    collator = Collator(tokenizer.pad_token_id, keep_index=True)
    sharded = copy.deepcopy(whole)
    if version == 2:
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        head = sharded.get_output_embeddings().weight
        assert head.to_local().shape[0] == head.shape[0] // 2  # really sharded
    else:  # as accelerate wraps it: decoder layers in units of their own, the original parameters kept
        sharded = FullyShardedDataParallel(
            sharded, use_orig_params=True, device_id=torch.device("cpu"),
            auto_wrap_policy=partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}))
        head = sharded.get_output_embeddings().weight
        assert head.numel() < whole.get_output_embeddings().weight.numel()  # really sharded

    def scored(model):
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=4, report_to=[], use_cpu=True)
        features = []
        for policy in (UDSPolicy(max_length=160), SLAPPolicy(strata=2)):
            trainer = SelectiveTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                       policy=policy, keep=0.5)
            batch = collator([dataset[i] for i in range(4)])
            index = batch.pop("example_index")
            trainer._candidates(batch, index, *trainer._describe(index, True), True)  # checks the head
            if hasattr(model, "reshard"):  # as after a training step's backward: the root is sharded again
                model.reshard()
            candidates = trainer._candidates(batch, index, *trainer._describe(index, True), True)
            assert "head" in candidates.extras  # logit factors, not the full logits
            features.append(policy.row_features(candidates))
        if hasattr(model, "reshard"):
            model.reshard()
        pool = score_pool(model, dataset, collator, SLAPPolicy(strata=2), batch_size=4)[0]
        features.append({name: getattr(pool, name) for name in ("loss", "sketch", "rep", "curvature")})
        return features

    for expected, got in zip(scored(whole), scored(sharded), strict=True):
        for name, value in expected.items():
            if torch.is_tensor(value):
                assert torch.allclose(value, got[name], rtol=1e-4, atol=1e-5), name
    torch.distributed.destroy_process_group()


def run_to_resume(out_dir: str, data_dir: str, resume: bool) -> None:
    """One rank of the resume test: UDS under global selection, 16 candidates a step as 2 ranks x 8 or 1 rank x
    2 micro-batches of 8, a checkpoint every step; ``resume`` goes on from checkpoint-1."""
    from helpers import gsm8k_examples

    from slimtune.data.tokenize import Collator, TokenizedDataset
    from slimtune.models import LoraSettings
    from slimtune.online.policies.uds import UDSPolicy
    from slimtune.online.trainer import SelectiveTrainer
    from slimtune.train import TrainSettings, prepare_model, training_arguments

    world = int(os.environ["WORLD_SIZE"])
    settings = TrainSettings(output_dir=out_dir, epochs=1, batch_size=8, grad_accum=2 // world, max_length=160,
                             progress=False, lora=LoraSettings(r=4, alpha=8, dropout=0.0), logging_steps=1)
    model, tokenizer = prepare_model("tiny", settings)
    dataset = TokenizedDataset(gsm8k_examples(Path(data_dir), 32), tokenizer, 160)
    trainer = SelectiveTrainer(model=model, args=training_arguments(settings, save_strategy="steps", save_steps=1),
                               train_dataset=dataset, data_collator=Collator(tokenizer.pad_token_id, keep_index=True),
                               policy=UDSPolicy(), keep=0.25, global_selection=True)
    trainer.train(resume_from_checkpoint=str(Path(out_dir) / "checkpoint-1") if resume else None)
    torch.save(trainer.policy.state_dict()["memory"], Path(out_dir) / f"state.rank{trainer.args.process_index}.pt")


def main(out_dir: str, data_dir: str, mode: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import gsm8k_examples

    from slimtune.models import LoraSettings
    from slimtune.online import get_policy
    from slimtune.online.policies.slap import SLAPPolicy
    from slimtune.online.policies.uds import UDSPolicy
    from slimtune.online.trainer import SelectiveTrainer, train_online
    from slimtune.train import TrainSettings

    world = int(os.environ["WORLD_SIZE"])
    if mode in ("fsdp1", "fsdp2"):
        score_sharded(out_dir, data_dir, int(mode[-1]))
        return
    if mode.startswith("resume-"):
        run_to_resume(out_dir, data_dir, resume=mode == "resume-then")
        return
    if mode == "fail":
        settings = TrainSettings(output_dir=out_dir, epochs=1, batch_size=2, max_length=160, progress=False,
                                 lora=LoraSettings(r=4, alpha=8, dropout=0.0), logging_steps=1)
        train_online(gsm8k_examples(Path(data_dir), 8), FailsOnRankOne(), keep=0.5, model="tiny",
                     settings=settings)
        return
    policy = {"global-uds": UDSPolicy(), "global-slap": SLAPPolicy(strata=2)}.get(mode, get_policy("big-loss"))

    class Recording(SelectiveTrainer):  # keeps its rank's policy state for the test to compare
        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            state = {"global-uds": lambda: self.policy.state_dict()["memory"],
                     "global-slap": self.policy.state_dict}.get(mode, lambda: self._stale_loss)()
            torch.save(state, Path(out_dir) / f"state.rank{self.args.process_index}.pt")
            return result

    settings = TrainSettings(output_dir=out_dir, epochs=2 if mode == "global-stale" else 1,
                             batch_size=16 // world, max_length=160, progress=False,
                             lora=LoraSettings(r=4, alpha=8, dropout=0.0), logging_steps=1)
    train_online(gsm8k_examples(Path(data_dir), 32), policy, keep=0.25, model="tiny", settings=settings,
                 trainer_class=Recording, global_selection=True, stale_scores=mode == "global-stale")


if __name__ == "__main__":
    main(*sys.argv[1:4])
