"""Online selection on TRL's SFTTrainer: the mixin composes with TRL's own loss, collator and data preparation."""

import math

import datasets
import pytest
import torch

from slimtune.models import LoraSettings
from slimtune.online.base import Policy
from slimtune.online.trainer import SelectionMixin, read_selection_log
from slimtune.train import TrainSettings, prepare_model

trl = pytest.importorskip("trl")


class SelectiveSFTTrainer(SelectionMixin, trl.SFTTrainer):
    pass


def conversations(n):
    return datasets.Dataset.from_list([
        {"id": f"sum-{i}", "prompt": [{"role": "user", "content": f"What is {i} plus {i + 3}?"}],
         "completion": [{"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}."}]}
        for i in range(n)])


def sft_trainer(tmp_path, policy, keep, **config):
    model, tokenizer = prepare_model("tiny", TrainSettings(output_dir=str(tmp_path),
                                                           lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=3e-2,
                         max_length=96, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         **config)
    return SelectiveSFTTrainer(model=model, args=args, train_dataset=conversations(12),
                               processing_class=tokenizer, policy=policy, keep=keep)


def test_sft_trainer_trains_uds_on_k_rows_a_step_and_logs_the_datasets_ids(tmp_path):
    trainer = sft_trainer(tmp_path, "uds", 0.5, max_steps=3)
    trainer.train()
    log = read_selection_log(tmp_path)
    ids = list(trainer.train_dataset["id"])
    assert [len(step["chosen"]) for step in log] == [2, 2, 2]
    assert all(step["ids"] == [ids[i] for i in step["index"]] for step in log)
    assert all(step["chosen_ids"] == [ids[i] for i in step["chosen"]] for step in log)
    assert sorted(i for step in log for i in step["ids"]) == sorted(ids)  # one epoch: every row a candidate once
    assert trainer.policy.max_length == 96  # training's limit, from SFTConfig
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 3 and all(math.isfinite(row["loss"]) for row in logged)
    assert all("mean_token_accuracy" in row for row in logged)  # TRL's own compute_loss ran


class EveryRowTwiceTheLast(Policy):
    """Keeps every candidate and weighs the last one double: row weights through TRL's loss."""

    name = "every-row"

    def needs(self):
        return set()

    def choose(self, batch, k):
        self._last_weights = torch.ones(len(batch))
        self._last_weights[-1] = 2.0
        return torch.arange(len(batch))


def test_row_weights_train_through_trls_loss(tmp_path):
    trainer = sft_trainer(tmp_path, EveryRowTwiceTheLast(), 4, max_steps=2)
    trainer.train()
    assert [step["weights"] for step in read_selection_log(tmp_path)] == [[1.0, 1.0, 1.0, 2.0]] * 2
    assert all(math.isfinite(row["loss"]) for row in trainer.state.log_history if "loss" in row)


def test_packing_is_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ValueError, match=r"packed \(the arguments set \['packing'\]\)"):
        sft_trainer(tmp_path, "uds", 0.5, max_steps=1, packing=True)
