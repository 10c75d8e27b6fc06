import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import gsm8k_examples

from slimtune.data.example import make_example
from slimtune.data.tokenize import IGNORE_INDEX, Collator, TokenizedDataset
from slimtune.features.losses import score_losses
from slimtune.models import LoraSettings
from slimtune.online import get_policy
from slimtune.online.base import CandidateBatch
from slimtune.online.policies.uds import UDSPolicy, nuclear_norm, srft_matrix
from slimtune.online.trainer import SelectiveTrainer, keep_count, read_selection_log, train_online
from slimtune.train import TrainSettings, prepare_model, train, training_arguments


def settings(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), epochs=1, batch_size=4, learning_rate=3e-2, max_length=160,
                lora=LoraSettings(r=4, alpha=8), progress=False, logging_steps=1)
    return TrainSettings(**{**base, **kw})


def candidates(loss=None, logits=None, labels=None, ref_loss=None, attention_mask=None, progress=0.0):
    """A CandidateBatch built by hand: only the fields a policy reads need to be meaningful."""
    size = len(loss) if loss is not None else len(logits)
    width = labels.shape[1] if labels is not None else (logits.shape[1] if logits is not None else 4)
    blank = torch.zeros(size, width, dtype=torch.long)
    return CandidateBatch(
        index=torch.arange(size), ids=[f"e{i}" for i in range(size)], tasks=["t"] * size, input_ids=blank,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(blank),
        labels=labels if labels is not None else blank, token_count=torch.full((size,), width),
        loss=torch.zeros(size) if loss is None else torch.tensor(loss, dtype=torch.float),
        ref_loss=None if ref_loss is None else torch.tensor(ref_loss, dtype=torch.float),
        logits=logits, progress=progress)


# ---- the mechanism ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("batch_size", "grad_accum"), [(4, 1), (2, 2)])
def test_keeping_every_candidate_trains_exactly_like_the_plain_trainer(tmp_path, shared_data, batch_size,
                                                                       grad_accum):
    from safetensors.torch import load_file

    examples = gsm8k_examples(shared_data, 8)
    kw = dict(batch_size=batch_size, grad_accum=grad_accum)
    plain = train(examples, model="tiny", settings=settings(tmp_path, "plain", **kw))
    online = train_online(examples, "big-loss", keep=batch_size, model="tiny",
                          settings=settings(tmp_path, "online", **kw))
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (plain, online))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [row["loss"] for row in plain.log_history if "loss" in row] == \
        [row["loss"] for row in online.log_history if "loss" in row]
    assert online.examples_seen == plain.examples_seen == 8
    assert online.tokens_seen == plain.tokens_seen


def selective_trainer(tmp_path, examples, policy, keep, warmup_steps=0, **args):
    run = settings(tmp_path, "run", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model, tokenizer = prepare_model("tiny", run)
    dataset = TokenizedDataset(examples, tokenizer, run.max_length)
    trainer = SelectiveTrainer(model=model, args=training_arguments(run, **args), train_dataset=dataset,
                               data_collator=Collator(tokenizer.pad_token_id, keep_index=True),
                               policy=policy, keep=keep, warmup_steps=warmup_steps)
    return trainer, dataset


def record_backpropagated_rows(trainer, dataset) -> list[list[int]]:
    """A list the trainer's model fills, at each forward with grad, with the dataset rows of its batch."""
    row_of = {tuple(row["input_ids"]): i for i, row in enumerate(dataset.rows)}
    backpropagated = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            backpropagated.append([row_of[tuple(r[m.bool()].tolist())] for r, m in zip(ids, mask)])

    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    return backpropagated


def test_the_log_names_exactly_the_rows_that_were_backpropagated(tmp_path, shared_data):
    examples = gsm8k_examples(shared_data, 12)
    trainer, dataset = selective_trainer(tmp_path, examples, UDSPolicy(), 0.5, warmup_steps=1,
                                         include_num_input_tokens_seen="non_padding")
    backpropagated = record_backpropagated_rows(trainer, dataset)
    trainer.train()
    log = read_selection_log(tmp_path / "run")
    assert [step["chosen"] for step in log] == backpropagated
    assert [step["phase"] for step in log] == ["warmup", "select", "select"]
    assert [len(step["chosen"]) for step in log] == [4, 2, 2]
    assert all(step["chosen_ids"] == [examples[i].id for i in step["chosen"]] for step in log)
    assert all(len(step["scores"]) == 4 for step in log[1:])
    summary = json.loads((tmp_path / "run" / "selection_summary.json").read_text())
    assert summary["examples_trained"] == trainer.examples_trained == 8
    assert summary["candidates_scored"] == 8
    assert trainer.tokens_trained == sum(len(dataset.rows[i]["input_ids"]) for s in log for i in s["chosen"])
    assert trainer.state.num_input_tokens_seen == trainer.tokens_trained  # the Trainer counts the same rows


def test_global_selection_keeps_the_k_best_of_every_micro_batch_of_a_step_in_full_batches(tmp_path, shared_data):
    examples = gsm8k_examples(shared_data, 16)
    run = settings(tmp_path, "run", lora=LoraSettings(r=4, alpha=8, dropout=0.0), grad_accum=2)
    model, tokenizer = prepare_model("tiny", run)
    dataset = TokenizedDataset(examples, tokenizer, run.max_length)
    trainer = SelectiveTrainer(model=model, args=training_arguments(run), train_dataset=dataset,
                               data_collator=Collator(tokenizer.pad_token_id, keep_index=True),
                               policy=get_policy("big-loss"), keep=0.5, global_selection=True)
    backpropagated = record_backpropagated_rows(trainer, dataset)
    trainer.train()
    log = read_selection_log(tmp_path / "run")
    assert [len(step["index"]) for step in log] == [8, 8]  # 2 micro-batches of 4 candidates a step
    for step in log:
        best = sorted(range(8), key=lambda i: -step["loss"][i])[:4]
        assert sorted(step["chosen"]) == sorted(step["index"][i] for i in best)
    assert backpropagated == [step["chosen"][half:half + 2] for step in log for half in (0, 2)]
    assert trainer.examples_trained == 8


def test_a_resumed_run_selects_as_the_uninterrupted_one_did(tmp_path, shared_data):
    examples = gsm8k_examples(shared_data, 8)
    first, _ = selective_trainer(tmp_path, examples, UDSPolicy(), 0.5, num_train_epochs=2,
                                 save_strategy="epoch")
    first.train()
    whole = read_selection_log(tmp_path / "run")
    memory = first.policy.state_dict()["memory"]
    second, _ = selective_trainer(tmp_path, examples, UDSPolicy(), 0.5, num_train_epochs=2,
                                  save_strategy="epoch")
    second.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert read_selection_log(tmp_path / "run") == whole
    assert torch.equal(second.policy.state_dict()["memory"], memory)
    assert second.examples_trained == first.examples_trained == 8


def test_uniform_runs_no_scoring_forward_and_loss_minus_init_caches_the_reference(tmp_path, shared_data):
    examples = gsm8k_examples(shared_data, 8)
    uniform, _ = selective_trainer(tmp_path / "u", examples, get_policy("uniform", seed=3), 0.25)
    uniform.train()
    assert uniform.candidates_scored == 0 and uniform.examples_trained == 2
    assert all(step["loss"] == [None] * 4 for step in read_selection_log(tmp_path / "u" / "run"))

    drop, dataset = selective_trainer(tmp_path / "r", examples, get_policy("loss-minus-init"), 0.25)
    before = score_losses(drop.model, [drop.data_collator([dataset[i] for i in range(len(dataset))])])[0]
    drop.train()
    cached = torch.load(tmp_path / "r" / "run" / "ref_losses.pt", weights_only=True)
    assert torch.allclose(cached["loss"], before, atol=1e-5)
    first = read_selection_log(tmp_path / "r" / "run")[0]
    assert first["scores"] == pytest.approx([0.0] * 4, abs=1e-4)  # the model has not moved yet


def test_rho_loss_without_an_irreducible_loss_model_is_refused(tmp_path, shared_data):
    with pytest.raises(ValueError, match=r"held-out rows the run never trains on.*'loss-minus-init'"):
        selective_trainer(tmp_path, gsm8k_examples(shared_data, 4), get_policy("rho-loss"), 0.5)


def test_rho_loss_trains_its_reference_on_held_out_rows_it_never_trains_on(tmp_path, shared_data):
    from slimtune.online.trainer import load_reference

    examples = gsm8k_examples(shared_data, 10)
    run = settings(tmp_path, "rho", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    train_online(examples, get_policy("rho-loss", holdout=0.2), keep=0.5, model="tiny", settings=run)
    held_out = json.loads((tmp_path / "rho" / "holdout_ids.json").read_text())
    log = read_selection_log(tmp_path / "rho")
    candidates_seen = {i for step in log for i in step["ids"]}
    assert len(held_out) == 2 and not candidates_seen & set(held_out)
    assert candidates_seen == {ex.id for ex in examples} - set(held_out)
    reference = load_reference(str(tmp_path / "rho" / "irreducible"), torch.device("cpu"))
    trained_on = [ex for ex in examples if ex.id not in held_out]
    _, tokenizer = prepare_model("tiny", run)
    rows = TokenizedDataset(trained_on, tokenizer, run.max_length)
    expected = score_losses(reference, [Collator(tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])])[0]
    cached = torch.load(tmp_path / "rho" / "ref_losses.pt", weights_only=True)["loss"]
    assert torch.allclose(cached, expected, atol=1e-4)

    adapter = tmp_path / "rho" / "irreducible" / "adapter" / "adapter_model.safetensors"
    trained_at = adapter.stat().st_mtime_ns
    train_online(examples, get_policy("rho-loss", holdout=0.2), keep=0.5, model="tiny", settings=run)
    assert adapter.stat().st_mtime_ns == trained_at  # the irreducible-loss model is reused, not retrained
    with pytest.raises(ValueError, match="also in the training pool"):
        train_online(examples, "rho-loss", model="tiny", settings=run, holdout=examples[:2])


def without_mask(rows):
    batch = Collator(0, keep_index=True)(rows)
    del batch["attention_mask"]
    return batch


def packed(rows):
    """Every row of the batch in one row, as TRL's padding-free collator builds it: no mask, restarting ids."""
    ids = [torch.tensor(r["input_ids"]) for r in rows]
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat([torch.tensor(r["labels"]) for r in rows])[None],
            "position_ids": torch.cat([torch.arange(len(i)) for i in ids])[None]}


def test_a_batch_without_an_attention_mask_trains_without_one(tmp_path, shared_data):
    trainer, _ = selective_trainer(tmp_path, gsm8k_examples(shared_data, 8), get_policy("big-loss"), 0.5)
    trainer.data_collator = without_mask
    masks = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    trainer.train()
    assert len(masks) == 2 and all(mask is None for mask in masks)
    assert [len(step["chosen"]) for step in read_selection_log(tmp_path / "run")] == [2, 2]


@pytest.mark.parametrize("collate", [packed, lambda rows: {**packed(rows), "cu_seq_lens_q": torch.tensor([0, 5])}])
def test_a_packed_batch_is_refused_before_the_first_step(tmp_path, shared_data, collate):
    trainer, _ = selective_trainer(tmp_path, gsm8k_examples(shared_data, 8), get_policy("big-loss"), 0.5)
    trainer.data_collator = collate
    with pytest.raises(ValueError, match=r"packed .*cannot be scored or chosen alone.*padding_free=False"):
        trainer.train()
    assert trainer.state.global_step == 0 and trainer.examples_trained == 0


def test_keep_is_a_share_below_one_and_a_count_from_one():
    assert keep_count(0.25, 8) == 2 and keep_count(0.01, 8) == 1 and keep_count(3, 8) == 3
    assert keep_count(0.25, 10) == 3 and keep_count(0.25, 6) == 2  # halves round up, not to even
    assert keep_count(1, 8) == 1 and keep_count(20, 8) == 8
    with pytest.raises(ValueError):
        keep_count(0, 8)


# ---- the policies -----------------------------------------------------------------------------------------

def test_big_loss_keeps_the_highest_losses():
    chosen = get_policy("big-loss").choose(candidates(loss=[0.5, 3.0, 1.0, 2.0]), 2)
    assert sorted(chosen.tolist()) == [1, 3]


def test_grad_norm_scores_the_logit_gradient_and_keeps_the_largest():
    torch.manual_seed(0)
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[:, 3:] = torch.randint(0, 10, (3, 3))
    logits = torch.randn(3, 6, 10)
    logits[1, 2:5].scatter_(1, labels[1, 3:].unsqueeze(1), 12.0)  # row 1 predicts its answer: small gradient
    logits[2, 2:5] *= 6  # row 2 is confidently random: large gradient
    policy = get_policy("grad-norm")
    chosen = policy.choose(candidates(logits=logits, labels=labels), 1)

    z = logits[:, :-1].clone().requires_grad_()
    F.cross_entropy(z.reshape(-1, 10), labels[:, 1:].reshape(-1), reduction="sum").backward()
    expected = z.grad.norm(dim=-1).sum(1)
    assert torch.allclose(policy.scores(None), expected, atol=1e-5)
    assert chosen.tolist() == [int(expected.argmax())] == [2]


def test_rho_loss_keeps_the_largest_gap_to_the_reference_not_the_largest_loss():
    batch = candidates(loss=[3.0, 2.0, 5.0], ref_loss=[2.9, 0.5, 4.9])
    assert get_policy("rho-loss").choose(batch, 1).tolist() == [1]


def test_infobatch_prunes_below_mean_rows_at_random_upweights_the_kept_ones_and_anneals():
    rows = 40
    policy = get_policy("infobatch", prune_ratio=0.5, seed=0)
    assert sorted(policy.plan_epoch(0, 8, rows)) == list(range(rows))  # nothing scored yet: a whole epoch
    policy.record_training_losses(torch.arange(rows), torch.arange(rows, dtype=torch.float))  # mean 19.5
    kept = policy.plan_epoch(1, 8, rows, multiple=4)
    assert policy.plan_epoch(1, 8, rows, multiple=4) == kept  # a resumed epoch replays its plan
    below_kept = set(kept) - set(range(20, 40))
    assert set(range(20, 40)) <= set(kept) and len(kept) == len(set(kept)) and len(kept) % 4 == 0
    assert 4 <= len(below_kept) <= 16  # about half of the 20 below-mean rows survive
    policy.choose(candidates(loss=[0.0] * rows), rows)
    weights = policy.weights(None)
    assert all(weights[i] == (2.0 if i in below_kept else 1.0) for i in kept)
    policy.record_training_losses(torch.tensor(kept), torch.zeros(len(kept)))
    assert sorted(policy.plan_epoch(7, 8, rows, multiple=4)) == list(range(rows))  # annealing: all, weight 1
    policy.choose(candidates(loss=[0.0] * rows), rows)
    assert policy.weights(None).tolist() == [1.0] * rows


def test_infobatch_scores_rows_with_their_training_forwards_loss_and_runs_no_other(tmp_path, shared_data):
    examples = gsm8k_examples(shared_data, 8)
    trainer, dataset = selective_trainer(tmp_path, examples, get_policy("infobatch"), 0.5, learning_rate=0.0)
    trainer.train()  # the model does not move: each row's training loss is its loss under the initial model
    expected = score_losses(trainer.model, [Collator(0)([dataset[i] for i in range(len(dataset))])])[0]
    assert torch.allclose(trainer.policy.state_dict()["fresh"].float(), expected, atol=1e-5)
    assert trainer.candidates_scored == 0


def test_row_weights_give_the_gradient_of_the_weighted_loss_through_the_parents_own_loss(tmp_path,
                                                                                          shared_data):
    examples = gsm8k_examples(shared_data, 2)
    trainer, dataset = selective_trainer(tmp_path, examples, get_policy("infobatch"), 0.5)
    batch = Collator(0)([dataset[0], dataset[1]])
    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test skips

    def gradient(step):
        model.zero_grad()
        step()
        return torch.cat([p.grad.flatten() for p in trainable])

    def weighted_by_hand():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        ((token.sum(1) * torch.tensor([1.0, 2.0])).sum() / tokens).backward()

    weighted = gradient(lambda: trainer.training_step(model, {**batch, "loss_weight": torch.tensor([1.0, 2.0])}))
    unweighted = gradient(lambda: trainer.training_step(model, dict(batch)))
    assert torch.allclose(weighted, gradient(weighted_by_hand), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(weighted, unweighted, rtol=1e-2)


def test_row_losses_come_with_the_training_loss_leaving_its_value_and_gradient_as_they_were(tmp_path):
    """Each row's loss, read off the model's own token-wise cross-entropy, equals the logits' reading; the loss
    and the gradient are transformers' own, whether or not the Trainer passes the batch's token count. A model
    whose loss is its own gets the rows' losses read off its logits."""
    import functools

    from transformers.loss.loss_utils import ForCausalLMLoss

    from slimtune.online.trainer import response_losses, training_row_losses

    model, _ = prepare_model("tiny", settings(tmp_path, "run", lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    base = model.get_base_model()
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 5:] = 0  # right padding
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    labels[0, :4] = labels[1, :7] = labels[2, :2] = IGNORE_INDEX  # prompts of different lengths
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(**kw):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
        out.loss.backward()
        return out.loss.detach(), out.logits.detach(), torch.cat([p.grad.flatten() for p in trainable])

    for kw in ({}, {"num_items_in_batch": torch.tensor(13)}):
        loss, logits, gradient = step(**kw)
        expected = response_losses(logits, labels)
        received = []
        with training_row_losses(model, received.append):
            row_loss, _, row_gradient = step(**kw)
        assert base.loss_function is ForCausalLMLoss  # put back
        assert torch.equal(row_gradient, gradient) and torch.allclose(row_loss, loss, rtol=1e-6, atol=0)
        assert len(received) == 1 and torch.allclose(received[0], expected, rtol=1e-6, atol=0)
        with torch.no_grad(), training_row_losses(model, received.append):  # a scoring forward: not recorded
            model(input_ids=ids, attention_mask=mask, labels=labels)
        assert len(received) == 1

    own = functools.partial(ForCausalLMLoss)
    base.loss_function = own
    received = []
    with training_row_losses(model, received.append):
        step()
    assert base.loss_function is own and torch.allclose(received[0], expected, rtol=1e-6, atol=0)


def test_infobatch_trains_pruned_epochs_in_full_batches_and_the_last_epoch_whole(tmp_path, shared_data):
    examples = gsm8k_examples(shared_data, 16)
    trainer, _ = selective_trainer(tmp_path, examples, get_policy("infobatch", seed=1), 0.25, num_train_epochs=8)
    trainer.train()
    epochs: dict[int, list] = {}
    for step in read_selection_log(tmp_path / "run"):
        assert len(step["chosen"]) == 4  # full batches: pruning removes steps, not rows of a batch
        epochs.setdefault(step["policy"]["epoch"], []).append(step)
    rows = {epoch: [i for step in steps for i in step["chosen"]] for epoch, steps in epochs.items()}
    weights = {epoch: {w for step in steps for w in step["weights"]} for epoch, steps in epochs.items()}
    assert sorted(epochs) == list(range(8))
    assert sorted(rows[0]) == sorted(rows[7]) == list(range(16)) and weights[0] == weights[7] == {1.0}
    pruning = range(1, 7)
    assert all(len(rows[e]) == len(set(rows[e])) and weights[e] <= {1.0, 2.0} for e in pruning)
    assert sum(len(rows[e]) for e in pruning) < 6 * 16 and all(2.0 in weights[e] for e in pruning)
    assert trainer.examples_trained == sum(map(len, rows.values())) and trainer.candidates_scored == 0


def test_nuclear_norm_from_the_gram_matrix_equals_the_svd():
    torch.manual_seed(0)
    for shape in [(37, 500), (500, 37), (64, 49152)]:
        matrix = torch.randn(shape) * 3 + torch.randn(shape[1])  # a shared offset, as logits have
        assert torch.allclose(nuclear_norm(matrix), torch.linalg.svdvals(matrix.double()).sum().float(),
                              rtol=1e-5)


def test_the_sketch_is_the_subsampled_randomised_fourier_transform():
    n, d = 50, 7
    matrix = srft_matrix(n, d, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    signs = torch.randint(0, 2, (n,), generator=replay) * 2 - 1
    rows = torch.randperm(n, generator=replay)[:d]
    x = torch.randn(n, 3, dtype=torch.double)
    fourier = torch.fft.fft(x * signs.unsqueeze(1), dim=0).real[rows] * (n / d) ** 0.5
    assert torch.allclose(matrix.double() @ x, fourier, atol=1e-4)


def test_uds_prefers_a_new_example_to_a_duplicate_of_a_remembered_one():
    torch.manual_seed(0)
    remembered = torch.randn(6, 40)
    twin = remembered[:, torch.randperm(40)]  # same singular values, other direction
    policy = UDSPolicy(max_length=8, vocab_dim=16)
    first = candidates(logits=remembered.unsqueeze(0))
    policy.choose(first, 1)
    policy.observe(first)
    batch = candidates(logits=torch.stack([remembered, twin]))
    assert policy.choose(batch, 1).tolist() == [1]
    assert policy.scores(batch)[1] > policy.scores(batch)[0]


def test_uds_scores_response_logits_unless_asked_for_the_authors_whole_row_variant():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 30)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[0, 3:5] = 1  # row 0: prompt 0-2, response 3-4, padding 5-6
    labels[1, 5:] = 1  # row 1: prompt 0-4, response 5-6
    logits[0, 5:] = 100.0  # huge logits on padding and on the prompt: neither gets a gradient, neither counts
    logits[1, :3] = 100.0
    batch = candidates(logits=logits, attention_mask=mask, labels=labels)
    masked = UDSPolicy(max_length=8, vocab_dim=16, alpha=0.0)
    raw = UDSPolicy(max_length=8, vocab_dim=16, unmasked_raw=True, alpha=0.0)
    masked.choose(batch, 1)
    raw.choose(batch, 1)
    response = [logits[0, 2:4], logits[1, 4:6]]  # logits at t predict the token at t + 1
    expected = torch.stack([torch.linalg.svdvals(part).sum() for part in response])
    assert torch.allclose(masked.scores(batch), (expected - expected.mean()) / expected.std(unbiased=False),
                          atol=1e-4)
    assert raw.scores(batch)[0] == pytest.approx(float(torch.linalg.svdvals(logits[0]).sum()), rel=1e-4)


def test_uds_takes_trainings_max_length_so_rows_past_512_tokens_train(tmp_path, shared_data):
    long = [make_example([{"role": "user", "content": " ".join(["word"] * 600) + f" {i}"},
                          {"role": "assistant", "content": "answer " * 5}], task="t") for i in range(4)]
    result = train_online(long, "uds", keep=0.5, model="tiny",
                          settings=settings(tmp_path, "long", max_length=700, batch_size=2))
    assert result.examples_seen == 2
    assert json.loads((tmp_path / "long" / "selection_summary.json").read_text())["params"]["max_length"] == 700


def test_uds_from_logit_factors_scores_as_uds_from_the_logits(tiny, shared_data):
    from slimtune.online.trainer import forward_signals, logits_are_linear

    model, tokenizer = tiny
    dataset = TokenizedDataset(gsm8k_examples(shared_data, 4), tokenizer, 160)
    batch = Collator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    assert logits_are_linear(model, batch)
    signals = forward_signals(model, batch, logits=True, hidden=True, trim_logits=True)
    common = dict(index=torch.arange(4), ids=list("abcd"), tasks=["t"] * 4, input_ids=batch["input_ids"],
                  attention_mask=batch["attention_mask"], labels=batch["labels"], loss=signals["loss"],
                  token_count=torch.ones(4))
    full = CandidateBatch(**common, logits=signals["logits"])
    factored = CandidateBatch(**common, hidden=signals["hidden"],
                              extras={"head": model.get_output_embeddings().weight})
    a, b = UDSPolicy(seed=1, max_length=160), UDSPolicy(seed=1, max_length=160)
    for batch_a, batch_b in ((full, factored), (full, factored)):  # the second time with a memory
        assert a.choose(batch_a, 2).tolist() == b.choose(batch_b, 2).tolist()
        assert torch.allclose(a.scores(None), b.scores(None), atol=1e-3)
        a.observe(batch_a.subset([0]))
        b.observe(batch_b.subset([0]))
    assert torch.allclose(a.state_dict()["memory"], b.state_dict()["memory"], rtol=1e-3, atol=1e-2)


def test_a_head_with_a_bias_is_not_taken_for_logit_factors(shared_data):
    from slimtune.models import load_model
    from slimtune.online.trainer import logits_are_linear

    model, tokenizer = load_model("tiny", device="cpu")
    weight = model.get_output_embeddings().weight
    biased = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    biased.weight = weight
    model.set_output_embeddings(biased)
    batch = Collator(tokenizer.pad_token_id)([TokenizedDataset(gsm8k_examples(shared_data, 1), tokenizer)[0]])
    assert not logits_are_linear(model, batch)


def test_stale_scores_run_no_forward_but_trainings_and_score_rows_by_their_last_training_loss(tmp_path,
                                                                                              shared_data):
    from slimtune.online.trainer import response_losses

    examples = gsm8k_examples(shared_data, 8)
    run = settings(tmp_path, "run", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    model, tokenizer = prepare_model("tiny", run)
    dataset = TokenizedDataset(examples, tokenizer, run.max_length)
    trainer = SelectiveTrainer(model=model, args=training_arguments(run, num_train_epochs=3), train_dataset=dataset,
                               data_collator=Collator(tokenizer.pad_token_id, keep_index=True),
                               policy=get_policy("big-loss"), keep=0.5, stale_scores=True)
    row_of = {tuple(row["input_ids"]): i for i, row in enumerate(dataset.rows)}
    forwards, trained = [], []  # every forward; (step, row, loss) of every row a training forward saw

    def count(module, args, kwargs):
        forwards.append(torch.is_grad_enabled())

    def read(module, args, kwargs, output):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        losses = response_losses(output.logits.detach(), kwargs["labels"])
        for r, m, loss in zip(ids, mask, losses.tolist()):
            trained.append((trainer.state.global_step, row_of[tuple(r[m.bool()].tolist())], loss))

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.model.register_forward_hook(read, with_kwargs=True)
    trainer.train()
    assert trainer.state.global_step == 6  # 3 epochs of 2 steps of 4 candidates
    assert forwards == [True] * 6  # one training forward per step, as plain training: no scoring forward
    for step in read_selection_log(tmp_path / "run"):
        last = {row: loss for at, row, loss in trained if at < step["step"]}  # the latest before this step
        for row, loss in zip(step["index"], step["loss"]):
            assert loss is None if row not in last else loss == pytest.approx(last[row], abs=1e-5)
        wanted = sorted(range(4), key=lambda i: -(math.inf if step["loss"][i] is None else step["loss"][i]))
        assert sorted(step["chosen"]) == sorted(step["index"][i] for i in wanted[:2])
    assert trainer.candidates_scored == 24 and trainer.scoring_tokens == 0


def test_stale_scores_refuse_a_policy_that_needs_more_than_the_training_loss(tmp_path, shared_data):
    with pytest.raises(ValueError, match="stale_scores=True serves only"):
        train_online(gsm8k_examples(shared_data, 4), UDSPolicy(), keep=0.5, model="tiny",
                     settings=settings(tmp_path, "run"), stale_scores=True)


def test_the_head_is_gathered_from_zero3_though_deepspeed_is_not_installed_here(tiny, monkeypatch):
    """ZeRO-3 is stood in for by what it leaves outside the forward (an empty placeholder with ``ds_id``) and by
    its gathering context, which full_head_weight must enter (FSDP1 and FSDP2 run for real in
    test_online_distributed)."""
    import importlib.machinery
    import sys
    import types
    from contextlib import contextmanager

    from slimtune.online.trainer import full_head_weight

    model, _ = tiny
    head = model.get_output_embeddings()
    whole = head.weight.detach().clone()
    entered = []

    @contextmanager
    def gathered(params, modifier_rank=None):
        entered.append(modifier_rank)
        params[0].data = whole.clone()
        try:
            yield
        finally:
            params[0].data = torch.empty(0)

    original = head.weight
    try:
        deepspeed = types.ModuleType("deepspeed")
        deepspeed.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
        deepspeed.zero = types.SimpleNamespace(GatheredParameters=gathered)
        deepspeed.DeepSpeedEngine = type("DeepSpeedEngine", (torch.nn.Module,), {})  # what accelerate unwraps
        monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
        head.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        head.weight.ds_id = 7
        assert torch.equal(full_head_weight(model), whole)
        assert entered == [None]  # gathered on every rank, written back by none
    finally:
        head.weight = original
