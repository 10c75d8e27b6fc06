import json

import torch
from helpers import gsm8k_examples

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
