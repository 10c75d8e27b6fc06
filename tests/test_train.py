import json

import pytest
import torch
from helpers import gsm8k_examples
from transformers import TrainerCallback

from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.features.losses import score_losses
from slimtune.models import LoraSettings
from slimtune.train import TrainSettings, load_trained, train


def settings(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), epochs=3, batch_size=4, learning_rate=3e-2, max_length=160,
                lora=LoraSettings(r=4, alpha=8, dropout=0.0), progress=False, logging_steps=1)
    return TrainSettings(**{**base, **kw})


def mean_loss(model, tokenizer, examples):
    data = TokenizedDataset(examples, tokenizer, 160)
    collate = Collator(tokenizer.pad_token_id)
    losses, counts = score_losses(model, [collate([data[i] for i in range(len(data))])])
    return float((losses * counts).sum() / counts.sum())


def test_training_lowers_the_response_loss_and_the_saved_adapter_reloads(tmp_path, shared_data, tiny):
    examples = gsm8k_examples(shared_data, 8)
    before = mean_loss(tiny[0], tiny[1], examples)
    result = train(examples, model="tiny", settings=settings(tmp_path, "run"))
    model, tokenizer = load_trained(result.output_dir)
    after = mean_loss(model, tokenizer, examples)
    assert after < before - 0.15
    assert result.examples_seen == 24 and result.tokens_seen > 0
    saved = json.loads((result.output_dir / "slimtune_train.json").read_text())
    assert saved["model"] == "tiny" and saved["settings"]["lora"]["r"] == 4
    assert (result.output_dir / "train_log.jsonl").read_text().count("loss") >= 3


def test_same_seed_gives_the_same_adapter(tmp_path, shared_data):
    from safetensors.torch import load_file

    examples = gsm8k_examples(shared_data, 8)
    runs = [train(examples, model="tiny", settings=settings(tmp_path, name, epochs=1)) for name in ("a", "b")]
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_logits_of_prompt_positions_are_skipped_and_training_ends_where_whole_logits_end(tmp_path, shared_data,
                                                                                         monkeypatch, tiny):
    from safetensors.torch import load_file

    import slimtune.train as training

    examples = gsm8k_examples(shared_data, 8)
    model, tokenizer = tiny
    data = TokenizedDataset(examples, tokenizer, 160)
    batch = Collator(tokenizer.pad_token_id, trim_logits=True)([data[i] for i in range(4)])
    whole = Collator(tokenizer.pad_token_id)([data[i] for i in range(4)])
    first = int((whole["labels"] != -100).any(dim=0).nonzero()[0])
    assert batch["logits_to_keep"] == whole["input_ids"].shape[1] - first + 1 < whole["input_ids"].shape[1]
    assert torch.equal(batch["labels"], whole["labels"][:, first - 1:])
    assert model(**batch).logits.shape[1] == batch["logits_to_keep"]
    assert float(model(**batch).loss) == pytest.approx(float(model(**whole).loss), rel=1e-6)

    trimmed = train(examples, model="tiny", settings=settings(tmp_path, "trimmed", epochs=1))
    monkeypatch.setattr(training, "accepts_logits_to_keep", lambda model: False)
    plain = train(examples, model="tiny", settings=settings(tmp_path, "whole", epochs=1))
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (trimmed, plain))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert trimmed.final_loss == pytest.approx(plain.final_loss, rel=1e-6)


def test_group_by_length_batches_rows_of_similar_length_and_still_trains_on_every_row(tmp_path, shared_data):
    from transformers import Trainer

    from slimtune.data.example import make_example

    long_rows = gsm8k_examples(shared_data, 16)
    short_rows = [make_example([{"role": "user", "content": f"Say {word} {n}."},
                                {"role": "assistant", "content": f"{word} {n}"}], task="echo")
                  for word in ("yes", "no", "maybe", "never") for n in range(4)]
    examples = [row for pair in zip(long_rows, short_rows) for row in pair]
    # the Trainer sorts random groups of 4 batches (more for a larger set, up to 50) by length

    def padded_positions(group_by_length):
        batches = []

        class Recording(Trainer):
            def training_step(self, model, inputs, *args, **kwargs):
                batches.append((inputs["input_ids"].numel(), int(inputs["attention_mask"].sum()),
                                sorted(inputs["example_index"].tolist())))
                return super().training_step(model, inputs, *args, **kwargs)

        result = train(examples, model="tiny", trainer_class=Recording,
                       settings=settings(tmp_path, f"grouped-{group_by_length}", epochs=1, batch_size=2,
                                         group_by_length=group_by_length))
        assert sorted(i for *_, rows in batches for i in rows) == list(range(32))
        assert result.examples_seen == 32
        return sum(padded for padded, *_ in batches), sum(real for _, real, _ in batches)

    grouped, grouped_real = padded_positions(True)
    mixed, mixed_real = padded_positions(False)
    assert grouped_real == mixed_real and grouped < 0.8 * mixed


def test_a_one_step_run_updates_the_model(tmp_path, shared_data):
    from safetensors.torch import load_file

    # 4 rows at batch 4 is one optimizer step; the Trainer's rounded-up warm-up would give it learning rate 0
    result = train(gsm8k_examples(shared_data, 4), model="tiny", settings=settings(tmp_path, "one", epochs=1))
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_warmup_is_the_ratio_of_the_run_rounded_down():
    from slimtune.train import warmup_steps

    assert warmup_steps(TrainSettings(batch_size=8, warmup_ratio=0.03), rows=8) == 0
    assert warmup_steps(TrainSettings(batch_size=8, warmup_ratio=0.03), rows=800) == 3
    assert warmup_steps(TrainSettings(batch_size=8, warmup_ratio=0.03), rows=800, world_size=2) == 1
    assert warmup_steps(TrainSettings(batch_size=8, grad_accum=2, epochs=2, warmup_ratio=0.1), rows=80) == 1
    assert warmup_steps(TrainSettings(max_steps=200, warmup_ratio=0.03), rows=8) == 6
    assert warmup_steps(TrainSettings(warmup_ratio=5), rows=8) == 5


def test_the_users_training_arguments_win_and_slimtune_fills_the_rest(tmp_path):
    from transformers import TrainingArguments

    from slimtune.train import training_arguments

    ours = settings(tmp_path, "ours", learning_rate=3e-2, batch_size=4)
    from_dict = training_arguments(ours, user={"learning_rate": 1e-3, "report_to": ["tensorboard"]})
    assert from_dict.learning_rate == 1e-3 and from_dict.report_to == ["tensorboard"]
    assert from_dict.per_device_train_batch_size == 4 and from_dict.output_dir == ours.output_dir
    theirs = TrainingArguments(output_dir=str(tmp_path / "theirs"), max_grad_norm=0.5, logging_steps=7)
    from_object = training_arguments(ours, user=theirs)
    assert from_object.output_dir == str(tmp_path / "theirs") and from_object.max_grad_norm == 0.5
    assert from_object.logging_steps == 7 and from_object.learning_rate == 3e-2  # left at default: ours
    assert training_arguments(ours).report_to == []  # quiet and offline unless the user asks for a logger


def test_an_unknown_training_argument_is_named():
    from slimtune.train import parse_training_args, training_arguments

    with pytest.raises(ValueError, match="'warmup_ratios'"):
        training_arguments(TrainSettings(), user={"warmup_ratios": 0.1})
    with pytest.raises(ValueError, match="'not_a_field' is not a TrainingArguments field"):
        parse_training_args(["not_a_field=1"])
    with pytest.raises(ValueError, match=r"max_grad_norm.*invalid float value: 'abc'"):
        parse_training_args(["max_grad_norm=abc"])
    assert parse_training_args(["logging-steps=3", "bf16=false", "lr_scheduler_type=cosine"]) == \
        {"logging_steps": 3.0, "bf16": False, "lr_scheduler_type": "cosine"}


def test_tensorboard_gets_the_runs_metrics_under_the_run_folder(tmp_path, shared_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    result = train(gsm8k_examples(shared_data, 8), model="tiny", settings=settings(tmp_path, "tb", epochs=1),
                   training_args={"report_to": ["tensorboard"]}, callbacks=[Recorder()])
    events = list(result.output_dir.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under the run folder"
    scalars = set()
    for event in events:
        accumulator = EventAccumulator(str(event))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert "train/loss" in scalars
    assert any("loss" in logs for logs in seen)  # the user's callback saw the Trainer's logs
    saved = json.loads((result.output_dir / "slimtune_train.json").read_text())
    assert saved["training_args"] == {"report_to": ["tensorboard"]}


def test_wandb_offline_writes_its_run_files_and_the_selection_stats(tmp_path, shared_data, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from slimtune.online.trainer import train_online

    run = settings(tmp_path, "run", epochs=1, batch_size=4)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written to disk for `wandb sync`
    monkeypatch.setenv("WANDB_DIR", run.output_dir)
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = train_online(gsm8k_examples(shared_data, 8), "big-loss", keep=0.5, model="tiny", settings=run,
                          training_args={"report_to": ["wandb"], "run_name": "slimtune-test"})
    wandb.finish()  # the Trainer leaves the user's run open
    wandb.teardown()  # the run file is written by wandb's service process: wait for it to exit
    [run_file] = (result.output_dir / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = run_file.read_bytes()  # protobuf records: the logged keys appear verbatim
    assert all(f"train/selection/{key}".encode() in recorded for key in ("kept_share", "scoring_seconds", "chosen"))
    logged = [row for row in result.log_history if "loss" in row]
    # 8 rows in candidate batches of 4, keeping 2 of each: half of what streamed was trained
    assert logged[-1]["selection/chosen"] == 4 and logged[-1]["selection/kept_share"] == 0.5
    assert logged[-1]["selection/scoring_seconds"] > 0


def test_train_takes_a_datasets_dataset(tmp_path, shared_data):
    from datasets import Dataset

    rows = [{"messages": [dict(m) for m in ex.messages]} for ex in gsm8k_examples(shared_data, 4)]
    result = train(Dataset.from_list(rows), model="tiny", settings=settings(tmp_path, "ds", epochs=1))
    saved = json.loads((result.output_dir / "slimtune_train.json").read_text())
    assert saved["examples"] == 4 and saved["trained_rows"] == 4
