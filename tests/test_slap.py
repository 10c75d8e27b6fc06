"""SLAP: strata coverage, the curvature term, relative distances, the logged allocation, state and pruning."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from slimtune.features.projection import RademacherProjector
from slimtune.online import get_policy
from slimtune.online.base import CandidateBatch
from slimtune.online.policies.slap import (
    BatchGain,
    Reference,
    RowFeatures,
    SLAPPolicy,
    allocate,
    head_signals,
    sketch_maps,
)

V, H, T = 40, 8, 10


def make_batch(loss, *, reps=None, tasks=None, seed=0) -> CandidateBatch:
    """Candidates with the given losses; random logits and hidden states, or hidden states whose mean over the
    real tokens is ``reps`` row by row."""
    gen = torch.Generator().manual_seed(seed)
    loss = torch.as_tensor(loss, dtype=torch.float32)
    b = len(loss)
    labels = torch.randint(0, V, (b, T), generator=gen)
    labels[:, :4] = -100
    hidden = (torch.randn(b, T, H, generator=gen) if reps is None
              else torch.as_tensor(reps, dtype=torch.float32)[:, None, :].expand(b, T, -1).clone())
    return CandidateBatch(
        index=torch.arange(b), ids=[f"r{i}" for i in range(b)], tasks=tasks or ["t"] * b,
        input_ids=labels.clamp_min(0), attention_mask=torch.ones(b, T, dtype=torch.long), labels=labels,
        loss=loss, token_count=torch.full((b,), T - 4), logits=torch.randn(b, T, V, generator=gen),
        hidden=hidden)


def strata_of(policy: SLAPPolicy, rows) -> list[str]:
    return [policy.last.strata[i] for i in rows]


def test_registry_builds_slap_and_needs_follow_the_switches():
    assert isinstance(get_policy("slap"), SLAPPolicy)
    assert SLAPPolicy().needs() == {"loss", "logit_factors", "hidden"}
    assert SLAPPolicy(representation="sketch").needs() == {"loss", "logit_factors"}
    assert SLAPPolicy(learnability=False).needs() == {"loss", "hidden"}
    assert SLAPPolicy(learnability=False, diversity=False).needs() == {"loss"}


def test_stratification_keeps_every_loss_stratum_where_big_loss_takes_the_top():
    loss = torch.linspace(0.1, 4.0, 16)
    batch = make_batch(loss)
    big_loss = set(loss.topk(4).indices.tolist())
    for policy in (SLAPPolicy(strata=4), SLAPPolicy(strata=4, learnability=False, diversity=False)):
        chosen = policy.choose(batch, 4).tolist()
        assert sorted(Counter(strata_of(policy, chosen)).values()) == [1, 1, 1, 1]
        assert len(set(strata_of(policy, big_loss))) == 1  # the top-4 rows all sit in the top stratum
    unstratified = SLAPPolicy(stratify=False, learnability=False, diversity=False)
    assert set(unstratified.choose(batch, 4).tolist()) == big_loss


def test_allocation_floor_proportional_and_neyman():
    counts = {"a": 10, "b": 1, "c": 5}
    assert allocate(counts, {h: float(n) for h, n in counts.items()}, 4) == {"a": 2, "b": 1, "c": 1}
    assert allocate(counts, {h: float(n) for h, n in counts.items()}, 2) == {"a": 1, "b": 0, "c": 1}
    neyman = allocate(counts, {"a": 10 * 0.1, "b": 1 * 1.0, "c": 5 * 2.0}, 7)  # N_h S_h
    assert neyman == {"a": 1, "b": 1, "c": 5}  # c: N_h S_h = 10 of 12, though a holds twice the rows
    assert allocate({"a": 2, "b": 0}, {"a": 2.0, "b": 0.0}, 5) == {"a": 2, "b": 0}


def test_curvature_makes_aligned_gradients_worth_less_than_orthogonal_ones_of_the_same_norm():
    a, b, c = torch.eye(4)[:3]
    near_a = (a + 1e-3 * c) / (a + 1e-3 * c).norm()
    g = torch.stack([a, near_a, b])
    g_ref = (a + b) / 2  # equally aligned with both directions, so the linear terms tie
    curved = Reference(g_ref, g.T @ g / 3 + 0.1 * torch.eye(4), 1.0, 1.0)
    flat = Reference(g_ref, None, 1.0, 1.0)

    def gain(ref: Reference, rows: list[int]) -> float:
        batch = BatchGain(g, ref)
        for i in rows:
            batch.add(i)
        return batch.value

    assert gain(curved, [0, 1]) < gain(curved, [0, 2])
    assert gain(flat, [0, 1]) == pytest.approx(gain(flat, [0, 2]))
    grown = BatchGain(g, curved)
    grown.add(0)
    assert grown.marginal()[2] > grown.marginal()[1]
    assert float(grown.marginal()[2]) == pytest.approx(gain(curved, [0, 2]) - gain(curved, [0]), rel=1e-5)


def test_slap_pairs_orthogonal_rows_instead_of_near_duplicates():
    a, b = torch.eye(6)[0], torch.eye(6)[1]
    jitter = 1e-3 * torch.eye(6)[5]
    sketch = torch.stack([a, a + jitter, b, b - jitter])
    feats = RowFeatures(torch.ones(4), ["t"] * 4, sketch, None, curvature=torch.eye(6))
    kept = SLAPPolicy(stratify=False, diversity=False).prune(feats, 2).tolist()
    assert sorted(i // 2 for i in kept) == [0, 1]  # one row of each pair
    flat = SLAPPolicy(stratify=False, diversity=False, curvature=False).prune(feats, 2).tolist()
    assert sorted(i // 2 for i in flat) != [0, 1]  # without curvature nothing tells the pairs apart


def test_relative_distance_picks_the_spread_out_rows_of_a_tight_stratum():
    # tight stratum (losses ~1): a near-duplicate cluster with the highest losses, and two rows that are
    # 0.01 apart, far for this stratum; loose stratum (losses ~3-4): rows metres apart.
    gen = torch.Generator().manual_seed(1)
    cluster = [[1e-5 * i, 0, 0, 0, 0, 0, 0, 0] for i in range(3)]
    spread = [[0, 0.01, 0, 0, 0, 0, 0, 0], [0, 0, 0.01, 0, 0, 0, 0, 0]]
    loose = (10 * torch.randn(5, H, generator=gen)).tolist()
    loss = [1.05, 1.04, 1.03, 1.0, 1.01, 3.0, 3.2, 3.5, 3.8, 4.0]
    batch = make_batch(loss, reps=cluster + spread + loose)
    relative = SLAPPolicy(strata=2, learnability=False, diversity_weight=2.0)
    picked = relative.choose(batch, 6).tolist()
    tight = [i for i in picked if i < 5]
    assert len(tight) == 3 and sum(i < 3 for i in tight) == 1 and {3, 4} <= set(tight)
    by_loss = SLAPPolicy(strata=2, learnability=False, diversity=False).choose(batch, 6).tolist()
    assert {0, 1, 2} <= set(by_loss)  # loss alone takes the redundant cluster


def test_logged_allocation_matches_the_chosen_rows_strata():
    loss = torch.rand(24, generator=torch.Generator().manual_seed(3)) * 5
    policy = SLAPPolicy(strata=3)
    chosen = policy.choose(make_batch(loss, seed=3), 7)
    record = policy.log_record()
    edges = torch.tensor(record["edges"]["all"])
    observed = Counter(f"q{b}" for b in torch.bucketize(loss[chosen], edges).tolist())
    assert {h: r["chosen"] for h, r in record["allocation"].items() if r["chosen"]} == dict(observed)
    assert all(r["slots"] == r["chosen"] for r in record["allocation"].values())
    assert sum(r["candidates"] for r in record["allocation"].values()) == 24
    assert record["gain_share"] is not None
    assert policy.scores(None).shape == (24,)


def test_strata_crossed_with_task_cover_each_task():
    loss = torch.cat([torch.linspace(0.1, 0.5, 8), torch.linspace(3.0, 6.0, 8)])
    policy = SLAPPolicy(strata=2, by_task=True, learnability=False, diversity=False)
    chosen = policy.choose(make_batch(loss, tasks=["qa"] * 8 + ["mt"] * 8), 4).tolist()
    assert sorted(strata_of(policy, chosen)) == ["mt/q0", "mt/q1", "qa/q0", "qa/q1"]


def test_state_dict_round_trip_continues_identically():
    batches = [make_batch(torch.rand(12, generator=torch.Generator().manual_seed(s)) * (s + 1), seed=s)
               for s in range(4)]
    policy = SLAPPolicy(window=20, allocation="neyman")
    for batch in batches[:3]:
        policy.choose(batch, 4)
    resumed = SLAPPolicy(window=20, allocation="neyman")
    resumed.load_state_dict(policy.state_dict())
    assert resumed.state_dict() == policy.state_dict()
    assert resumed.choose(batches[3], 4).tolist() == policy.choose(batches[3], 4).tolist()
    assert resumed.log_record() == policy.log_record()


def test_gradient_sketch_is_the_projected_lm_head_gradient():
    gen = torch.Generator().manual_seed(0)
    b = 3
    weight = torch.randn(V, H, generator=gen, requires_grad=True)
    hidden = torch.randn(b, T, H, generator=gen)
    labels = torch.randint(0, V, (b, T), generator=gen)
    labels[:, :5] = -100
    labels[1, 5:8] = -100
    p_out, p_in = RademacherProjector(5, seed=0), RademacherProjector(3, seed=1)
    maps = sketch_maps(p_out, p_in, V, H, "cpu", curvature=False, chunk=7)  # chunks across the matrices
    sketch = head_signals(hidden, labels, maps, head=weight.detach()).sketch
    full = head_signals(hidden, labels, maps, logits=hidden @ weight.detach().T).sketch
    torch.testing.assert_close(sketch, full)
    out_matrix, in_matrix = p_out.project(torch.eye(V)).T, p_in.project(torch.eye(H)).T
    for i in range(b):
        logits = hidden[i, :-1] @ weight.T
        mask = labels[i, 1:] != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[i, 1:][mask])
        (grad,) = torch.autograd.grad(loss, weight)
        expected = (out_matrix @ grad @ in_matrix.T).flatten()
        torch.testing.assert_close(sketch[i], expected, atol=1e-5, rtol=1e-4)


def test_curvature_is_the_lm_heads_exact_gauss_newton_block_in_the_sketch_space():
    """For a linear softmax head the Gauss-Newton matrix is the Hessian of the loss in the head's weights:
    autograd's Hessian of the candidates' mean loss (V x H = 320 weights), pushed through the sketch
    S = P_out kron P_in, is what SLAP's features carry, from the logits or from the head alike."""
    gen = torch.Generator().manual_seed(0)
    b = 3
    weight = torch.randn(V, H, generator=gen) / 2
    batch = make_batch(torch.ones(b), seed=4)
    batch.labels[1, 4:7] = -100  # rows of different lengths: each row's mean, then the mean over rows
    hidden, labels = batch.hidden, batch.labels

    def loss(w: torch.Tensor) -> torch.Tensor:
        per_row = []
        for i in range(b):
            mask = labels[i, 1:] != -100
            per_row.append(torch.nn.functional.cross_entropy((hidden[i, :-1] @ w.T)[mask], labels[i, 1:][mask]))
        return torch.stack(per_row).mean()

    hessian = torch.autograd.functional.hessian(loss, weight).reshape(V * H, V * H)
    policy = SLAPPolicy(sketch_out=5, sketch_in=3, diversity=False)
    p_out, p_in = policy._projectors
    sketch_matrix = torch.kron(p_out.project(torch.eye(V)).T, p_in.project(torch.eye(H)).T)
    expected = sketch_matrix @ hessian @ sketch_matrix.T
    batch.logits = hidden @ weight.T
    from_logits = policy.features(batch).curvature
    batch.logits, batch.extras = None, {"head": weight}
    from_head = policy.features(batch).curvature
    assert from_logits.shape == (15, 15)
    torch.testing.assert_close(from_logits, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(from_head, expected, atol=1e-5, rtol=1e-4)
    # a pool scored in parts carries the mean over all its rows
    halves = [policy.features(make_batch(torch.ones(n), seed=s)) for n, s in ((2, 5), (4, 6))]
    joined = RowFeatures.cat(halves).curvature
    torch.testing.assert_close(joined, (2 * halves[0].curvature + 4 * halves[1].curvature) / 6)


def test_pruning_keeps_the_requested_share_and_every_stratum():
    gen = torch.Generator().manual_seed(0)
    n = 203
    feats = RowFeatures(torch.rand(n, generator=gen) ** 3 * 4, [("qa", "mt")[i % 2] for i in range(n)],
                        torch.randn(n, 32, generator=gen), torch.randn(n, 16, generator=gen), torch.eye(32))
    for policy in (SLAPPolicy(strata=5), SLAPPolicy(strata=3, by_task=True, block=50)):
        kept = policy.prune(feats, 0.7)
        assert len(kept) == round(0.7 * n) == len(set(kept.tolist()))
        kept_strata = set(strata_of(policy, kept.tolist()))
        assert kept_strata == set(policy.last.strata)
        alloc = policy.log_record()["allocation"]
        assert sum(r["chosen"] for r in alloc.values()) == len(kept)
    assert len(SLAPPolicy().prune(feats, 50)) == 50


def mixed_examples(shared_data, n):
    """Half short GSM8K problems, half Tatoeba French-to-English pairs, tasks set accordingly."""
    from slimtune.data.example import make_example

    rows = (json.loads(line) for line in open(shared_data / "gsm8k" / "train.jsonl"))
    gsm = [r for r, _ in zip((r for r in rows if len(r["question"] + r["answer"]) < 300), range(n // 2))]
    folder = shared_data / "tatoeba"
    fra = (folder / "tatoeba.fra-eng.fra").read_text().splitlines()
    eng = (folder / "tatoeba.fra-eng.eng").read_text().splitlines()
    return ([make_example([{"role": "user", "content": r["question"]},
                           {"role": "assistant", "content": r["answer"]}], task="gsm8k") for r in gsm]
            + [make_example([{"role": "user", "content": f"Translate from French to English: {f}"},
                             {"role": "assistant", "content": e}], task="tatoeba")
               for f, e in zip(fra[: n - n // 2], eng)])


def tiny_settings(tmp_path, name, **kw):
    from slimtune.models import LoraSettings
    from slimtune.train import TrainSettings

    base = dict(output_dir=str(tmp_path / name), epochs=1, batch_size=8, learning_rate=1e-2, max_length=128,
                lora=LoraSettings(r=4, alpha=8, dropout=0.0), progress=False, logging_steps=1)
    return TrainSettings(**{**base, **kw})


def test_per_step_selection_through_the_trainer_logs_the_allocation(tmp_path, shared_data):
    from slimtune.online.trainer import read_selection_log, train_online

    examples = mixed_examples(shared_data, 24)
    result = train_online(examples, SLAPPolicy(strata=2, by_task=True), keep=0.5, model="tiny",
                          settings=tiny_settings(tmp_path, "step"))
    assert result.examples_seen == 12
    records = read_selection_log(result.output_dir)
    assert len(records) == 3
    for record in records:
        alloc = record["policy"]["allocation"]
        assert sum(r["chosen"] for r in alloc.values()) == len(record["chosen"]) == 4
        assert {h.split("/")[0] for h, r in alloc.items() if r["chosen"]} == {
            h.split("/")[0] for h, r in alloc.items() if r["candidates"]}  # every task present is trained


def test_per_epoch_pruning_trains_each_epoch_on_the_kept_share(tmp_path, shared_data):
    from slimtune.online.pruning import LOG_NAME, train_pruned

    examples = mixed_examples(shared_data, 20)
    result = train_pruned(examples, SLAPPolicy(strata=3), keep=0.7, model="tiny",
                          settings=tiny_settings(tmp_path, "epoch", epochs=2, batch_size=7))
    assert result.examples_seen == 2 * 14
    log = [json.loads(line) for line in (result.output_dir / LOG_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["kept"] == 14 and r["pool"] == 20 for r in log)
    pool_ids = {ex.id for ex in examples}
    assert all(len(set(r["kept_ids"])) == 14 and set(r["kept_ids"]) <= pool_ids for r in log)
    for record in log:
        alloc = record["allocation"]
        assert all(r["chosen"] >= 1 for r in alloc.values() if r["candidates"])
    assert log[1]["step"] == 2  # the second epoch was scored with the model after the first one's steps


def test_pooled_choice_over_split_batches_is_the_choice_over_one_batch_of_them_all():
    """Global selection: SLAP choosing among two batches' gathered row features chooses, and remembers, what
    it chooses from one batch holding both (same strata window, g_ref and Gauss-Newton block)."""
    from slimtune.online.trainer import _join

    whole = make_batch(torch.linspace(0.2, 3.0, 16), seed=3)
    one, pooled = SLAPPolicy(strata=2, window=64), SLAPPolicy(strata=2, window=64)
    for _ in range(2):  # the second step sees a window filled by the first
        expected = one.choose(whole, 5)
        parts = [pooled.row_features(whole.subset(rows)) for rows in (range(8), range(8, 16))]
        assert parts[0]["curvature_total"].shape == (1, 512, 512)
        chosen = pooled.choose_pooled(_join(parts), 5)
        assert chosen.tolist() == expected.tolist()
        got, want = pooled.last.record(), one.last.record()
        assert got["allocation"] == want["allocation"]
        assert got["gain_share"] == pytest.approx(want["gain_share"], rel=1e-5)  # a sum in another order
    assert pooled.state_dict() == one.state_dict()


def test_pool_scoring_holds_a_bounded_number_of_curvature_blocks_and_scores_the_same(tiny, shared_data,
                                                                                     monkeypatch):
    """score_pool folds its parts as it goes (each holds a D x D block), and the folded pool is the same."""
    import weakref

    from slimtune.data.tokenize import Collator, TokenizedDataset
    from slimtune.online import pruning

    model, tokenizer = tiny
    dataset = TokenizedDataset(mixed_examples(shared_data, 12), tokenizer, 128)
    collator = Collator(tokenizer.pad_token_id)

    class Watched(SLAPPolicy):
        def features(self, batch):
            feats = super().features(batch)
            self.blocks.append(weakref.ref(feats.curvature))
            self.most_alive = max(self.most_alive, sum(ref() is not None for ref in self.blocks))
            return feats

    results = []
    for fold in (pruning.FOLD_BATCHES, 2):
        monkeypatch.setattr(pruning, "FOLD_BATCHES", fold)
        policy = Watched(strata=2)
        policy.blocks, policy.most_alive = [], 0
        results.append(pruning.score_pool(model, dataset, collator, policy, batch_size=2))
        assert policy.most_alive == (6 if fold > 6 else 2)  # 6 batches' blocks, or 2 before they fold
    (whole, tokens), (folded, folded_tokens) = results
    assert tokens == folded_tokens and whole.tasks == folded.tasks
    for name in ("loss", "sketch", "rep"):
        assert torch.equal(getattr(whole, name), getattr(folded, name))
    assert torch.allclose(whole.curvature, folded.curvature, rtol=1e-5, atol=1e-7)
    assert SLAPPolicy(strata=2).prune(whole, 0.5).tolist() == SLAPPolicy(strata=2).prune(folded, 0.5).tolist()


def test_features_from_the_scoring_losss_log_probs_are_those_from_the_head(tiny, shared_data):
    """The trainer hands SLAP the log-softmax its scoring loss took at the response positions, and SLAP reads
    p_t from it instead of multiplying the hidden states by the head and taking the softmax again: the
    same sketch, Gauss-Newton block and choice as from the head; a subset carries its own rows' tokens. Given
    the head, the forward takes those log-probabilities from the head's product at the response positions
    alone, and they are the ones the model's own logits give."""
    from slimtune.data.tokenize import Collator, TokenizedDataset
    from slimtune.online.trainer import forward_signals

    model, tokenizer = tiny
    dataset = TokenizedDataset(mixed_examples(shared_data, 6), tokenizer, 128)
    batch = Collator(tokenizer.pad_token_id)([dataset[i] for i in range(6)])
    signals = forward_signals(model, batch, logits=False, hidden=True, trim_logits=True, log_probs=True)
    head = model.get_output_embeddings().weight.detach()
    factored = forward_signals(model, batch, logits=False, hidden=True, trim_logits=True, log_probs=True, head=head)
    for name in ("loss", "response_log_probs", "hidden"):
        torch.testing.assert_close(factored[name], signals[name], rtol=1e-5, atol=1e-5)
    common = dict(index=torch.arange(6), ids=list("abcdef"), tasks=["t"] * 6, input_ids=batch["input_ids"],
                  attention_mask=batch["attention_mask"], labels=batch["labels"], loss=signals["loss"],
                  token_count=(batch["labels"][:, 1:] != -100).sum(1), hidden=signals["hidden"])
    from_log_probs = CandidateBatch(**common, response_log_probs=signals["response_log_probs"])
    from_head = CandidateBatch(**common, extras={"head": head})
    fast, reference = SLAPPolicy(strata=2), SLAPPolicy(strata=2)
    got, want = fast.features(from_log_probs), reference.features(from_head)
    torch.testing.assert_close(got.sketch, want.sketch, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.curvature, want.curvature, rtol=1e-4, atol=1e-7)
    for _ in range(2):  # the second time with a window
        assert fast.choose(from_log_probs, 3).tolist() == reference.choose(from_head, 3).tolist()
    rows = [4, 1]
    alone = forward_signals(model, {name: value[rows] for name, value in batch.items()}, logits=False,
                            hidden=False, trim_logits=True, log_probs=True)
    torch.testing.assert_close(from_log_probs.subset(rows).response_log_probs, alone["response_log_probs"],
                               rtol=1e-4, atol=1e-5)
