import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.data.example import make_example
from slimtune.data.tokenize import Collator, TokenizedDataset
from slimtune.features.gradients import (
    FEATURES,
    NORMS,
    extract_gradient_features,
    gradient_features,
    load_adam_moments,
    per_example_gradients,
    trainable_parameters,
)
from slimtune.features.losses import example_losses
from slimtune.features.projection import SparseJLProjector
from slimtune.features.store import FeatureStore
from slimtune.models import load_model


def mixed_examples(shared_data, n_math=4, n_translation=3):
    """Real rows of very different lengths, so batches carry padding."""
    math_rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "train.jsonl")][:n_math]
    french = open(shared_data / "tatoeba" / "tatoeba.fra-eng.fra").read().splitlines()[:n_translation]
    english = open(shared_data / "tatoeba" / "tatoeba.fra-eng.eng").read().splitlines()[:n_translation]
    return ([make_example([{"role": "user", "content": r["question"]},
                           {"role": "assistant", "content": r["answer"]}], task="gsm8k") for r in math_rows]
            + [make_example([{"role": "user", "content": f"Translate from French to English: {f}"},
                             {"role": "assistant", "content": e}], task="tatoeba")
               for f, e in zip(french, english)])


def lora_tiny(lora_bias=True, seed=0):
    """The tiny Llama with LoRA on q/k/v/o (and a bias on each B factor); B is randomised, as after some
    training, so that the A factors get gradients too."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model("tiny", device="cpu")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, lora_bias=lora_bias, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, config)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.eval(), tokenizer


def one_at_a_time(model, dataset, collate):
    """Reference: a plain backward per example, gradients read from .grad."""
    grads = []
    for i in range(len(dataset)):
        model.zero_grad()
        batch = collate([dataset[i]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = example_losses(logits, batch["labels"])
        loss.sum().backward()
        grads.append({name: p.grad.reshape(-1).clone() for name, p in trainable_parameters(model)})
    model.zero_grad()
    return grads


def test_batched_per_example_gradients_equal_one_at_a_time_ones(shared_data):
    model, tokenizer = lora_tiny()
    data = TokenizedDataset(mixed_examples(shared_data), tokenizer, 96)
    collate = Collator(tokenizer.pad_token_id)
    batch = collate([data[i] for i in range(len(data))])
    assert (batch["attention_mask"] == 0).any()  # padding is present and must contribute nothing
    batched = per_example_gradients(model, batch)
    reference = one_at_a_time(model, data, collate)
    grads = dict(batched.grads())
    assert list(grads) == [name for name, _ in trainable_parameters(model)]
    assert any(name.endswith("bias") for name in grads)
    for name, grad in grads.items():
        expected = torch.stack([row[name] for row in reference])
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7 + 1e-4 * expected.abs().max().item()), name
    assert torch.equal(batched.tokens, (batch["labels"][:, 1:] != -100).sum(1))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory, shared_data):
    """A real Trainer run with both of its parameter groups in use (LoRA weights decay, LoRA biases do not),
    a checkpoint per epoch with optimizer.pt, and the live optimizer to check the saved state against."""
    from transformers import Trainer

    from slimtune.train import TrainSettings, training_arguments

    model, tokenizer = lora_tiny()
    model.train()
    examples = mixed_examples(shared_data)
    settings = TrainSettings(output_dir=str(tmp_path_factory.mktemp("run")), epochs=2, batch_size=4,
                             learning_rate=5e-3, weight_decay=0.1, save_checkpoints=True, progress=False,
                             lora=None, logging_steps=1)
    trainer = Trainer(model=model, args=training_arguments(settings),
                      train_dataset=TokenizedDataset(examples, tokenizer, 96),
                      data_collator=Collator(tokenizer.pad_token_id))
    trainer.train()
    checkpoint = max(Path(settings.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    live = {name: optimizer.state[p] for name, p in trainer.model.named_parameters() if p.requires_grad}
    return checkpoint, live, optimizer.param_groups[0], examples


def reloaded(checkpoint):
    from peft import PeftModel

    base, tokenizer = load_model("tiny", device="cpu")
    return PeftModel.from_pretrained(base, checkpoint, is_trainable=True).eval(), tokenizer


def test_adam_moments_saved_by_integer_position_are_mapped_to_the_right_parameter_names(trainer_run):
    checkpoint, live, _, _ = trainer_run
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert [len(g["params"]) > 0 for g in saved["param_groups"]] == [True, True]  # decay and no-decay groups
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.1, 0.0]
    model, _ = reloaded(checkpoint)
    moments = load_adam_moments(checkpoint, model)
    assert set(moments.exp_avg) == set(live)
    for name, state in live.items():
        assert torch.equal(moments.exp_avg[name], state["exp_avg"]), name
        assert torch.equal(moments.exp_avg_sq[name], state["exp_avg_sq"]), name
    # a name-keyed state, as FSDP saves it, reads the same
    named = {"state": {f"_fsdp_wrapped_module.{n}": {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
                       for n, s in live.items()}, "param_groups": saved["param_groups"][:1]}
    by_name = load_adam_moments(named, model)
    assert all(torch.equal(by_name.exp_avg[n], moments.exp_avg[n]) for n in live)


def test_the_adam_feature_is_a_hand_computed_one_step_adam_update(trainer_run):
    checkpoint, live, group, examples = trainer_run
    model, tokenizer = reloaded(checkpoint)
    data = TokenizedDataset(examples, tokenizer, 96)
    collate = Collator(tokenizer.pad_token_id)
    moments = load_adam_moments(checkpoint, model)
    (b1, b2), eps = group["betas"], group["eps"]
    assert (moments.beta1, moments.beta2, moments.eps) == (b1, b2, eps)
    grads = dict(per_example_gradients(model, collate([data[i] for i in range(len(data))])).grads())
    reference = one_at_a_time(model, data, collate)
    row = 5  # a translation row, shorter than the padded batch
    for name, state in live.items():
        g = reference[row][name]
        m, v = state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1)
        by_hand = (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + eps)
        ours = moments.direction(name, grads[name][row:row + 1])[0]
        assert torch.allclose(ours, by_hand, rtol=1e-3, atol=1e-5), name

    # ... and, eps aside, the direction of the step torch's Adam takes from that state on that gradient
    params = dict(trainable_parameters(model))
    before = {name: p.detach().clone() for name, p in params.items()}
    adam = torch.optim.Adam(list(params.values()), lr=1.0, betas=(b1, b2), eps=1e-30)
    for name, p in params.items():
        adam.state[p] = {k: v.clone() for k, v in live[name].items()}
        p.grad = reference[row][name].reshape(p.shape).clone()
    adam.step()
    step = torch.cat([(before[n] - params[n].detach()).reshape(-1) for n in params])
    no_eps = dataclasses.replace(moments, eps=1e-30)
    feature = torch.cat([no_eps.direction(n, grads[n][row:row + 1])[0] for n in params])
    assert torch.nn.functional.cosine_similarity(step, feature, dim=0) > 0.9999


def test_gradient_features_are_the_projection_of_the_concatenated_update_vector(trainer_run):
    """Preconditioned and projected layer by layer inside the backward pass, the features equal the whole
    vector's projection, built from plain one-at-a-time gradients."""
    checkpoint, _, _, examples = trainer_run
    model, tokenizer = reloaded(checkpoint)
    data = TokenizedDataset(examples, tokenizer, 96)
    collate = Collator(tokenizer.pad_token_id)
    batch = collate([data[i] for i in range(4)])
    moments = load_adam_moments(checkpoint, model)
    projector = SparseJLProjector(256, seed=1, nnz=2, block_size=1000)
    reference = one_at_a_time(model, TokenizedDataset(examples[:4], tokenizer, 96), collate)
    names = [name for name, _ in trainable_parameters(model)]
    plain = torch.stack([torch.cat([row[name] for name in names]) for row in reference])
    update = torch.stack([torch.cat([moments.direction(name, row[name].unsqueeze(0))[0] for name in names])
                          for row in reference])
    features = gradient_features(model, batch, projector, moments)
    assert torch.allclose(features, projector.project(update), rtol=1e-4, atol=1e-4)
    sgd = gradient_features(model, batch, projector)
    assert torch.allclose(sgd, projector.project(plain), rtol=1e-3, atol=1e-5 * plain.abs().max().item())


def test_top_layers_take_those_layers_gradients_unchanged_and_never_differentiate_below(shared_data):
    model, tokenizer = lora_tiny()
    data = TokenizedDataset(mixed_examples(shared_data), tokenizer, 96)
    batch = Collator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])
    every = dict(per_example_gradients(model, batch).grads())
    lowest = model.base_model.model.model.layers[0]
    reached = []
    handle = lowest.register_full_backward_hook(lambda *_: reached.append(True))
    try:
        top = per_example_gradients(model, batch, layers=1)
    finally:
        handle.remove()
    assert not reached  # the backward pass stopped above the lowest layer
    assert list(dict(top.grads())) == [name for name in every if ".layers.1." in name]
    for name, grad in top.grads():
        assert torch.allclose(grad, every[name], rtol=1e-5, atol=1e-7), name
    assert torch.allclose(top.losses, per_example_gradients(model, batch).losses)
    # the feature of the top layer is the projection of the whole vector with the lower slices zeroed
    projector = SparseJLProjector(128, seed=2, block_size=500)
    vector = torch.cat([grad if ".layers.1." in name else torch.zeros_like(grad) for name, grad in every.items()],
                       dim=1)
    assert torch.allclose(gradient_features(model, batch, projector, layers=1), projector.project(vector),
                          rtol=1e-4, atol=1e-6)


class KilledStore(FeatureStore):
    """Dies after writing ``shards`` complete shards, like a job killed mid-extraction."""

    def __init__(self, path, shards):
        super().__init__(path)
        self.left = shards

    def write(self, name, lo, hi, array, **meta):
        if name == FEATURES and self.left == 0:
            raise KeyboardInterrupt
        super().write(name, lo, hi, array, **meta)
        self.left -= name == NORMS


def test_a_killed_and_resumed_extraction_equals_an_uninterrupted_one(tmp_path, shared_data):
    model, tokenizer = lora_tiny(lora_bias=False)
    data = TokenizedDataset(mixed_examples(shared_data), tokenizer, 96)
    settings = dict(projector=SparseJLProjector(128, seed=0), batch_size=2, shard_rows=2,
                    pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(KeyboardInterrupt):
        extract_gradient_features(model, data, KilledStore(tmp_path / "a", shards=2), **settings)
    resumed = extract_gradient_features(model, data, FeatureStore(tmp_path / "a"), **settings)
    assert resumed.shards == {"computed": 2, "reused": 2} and resumed.rows == len(data) - 4
    whole = extract_gradient_features(model, data, FeatureStore(tmp_path / "b"), **settings)
    assert whole.shards == {"computed": 4, "reused": 0} and whole.tokens > 0
    a, b = FeatureStore(tmp_path / "a"), FeatureStore(tmp_path / "b")
    for name in (FEATURES, NORMS):
        assert np.array_equal(np.asarray(a.open(name, len(data))), np.asarray(b.open(name, len(data))))
    features = np.asarray(b.open(FEATURES), dtype=np.float32)
    assert features.dtype == np.float32 and b.open(FEATURES).dtype == np.float16
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-3)
    assert (np.asarray(b.open(NORMS)) > 0).all()
    again = extract_gradient_features(model, data, FeatureStore(tmp_path / "b"), **settings)
    assert again.shards == {"computed": 0, "reused": 4} and again.rows == 0
