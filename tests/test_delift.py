"""DELIFT: the utility kernel against a hand computation, its batching, sparsity, resumption and token counts;
the selectors' behaviour on constructed pools (duplicates, a target task, a gap in an existing set)."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from slimtune.data.example import make_example
from slimtune.data.tokenize import IGNORE_INDEX, encode_example
from slimtune.features.utility import TEMPLATE_NO_EXAMPLE, TEMPLATE_WITH_EXAMPLE, InContextUtility
from slimtune.select import get_selector


def qa(question: str, answer: str, task: str, id: str | None = None):
    return make_example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                        id=id, task=task)


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "train.jsonl")][:8]
    return [qa(r["question"], r["answer"], "gsm8k") for r in rows]


@pytest.fixture(scope="module")
def translations(shared_data):
    src = (shared_data / "tatoeba" / "tatoeba.fra-eng.fra").read_text().splitlines()[:8]
    eng = (shared_data / "tatoeba" / "tatoeba.fra-eng.eng").read_text().splitlines()[:8]
    return [qa(f"Translate from French to English: {s}", e, "fra-eng") for s, e in zip(src, eng)]


@pytest.fixture(scope="module")
def peaky(tiny, gsm8k):
    """The tiny model with an untied LM head biased toward the tokens of the GSM8K answers, so the answers'
    probabilities are ~1e-2 rather than the ~1/49152 of a random model and utilities are far from zero."""
    model, tokenizer = copy.deepcopy(tiny[0]), tiny[1]
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    answer_tokens = sorted({t for ex in gsm8k[:2] for t in tokenizer(ex.response)["input_ids"]})
    with torch.no_grad():
        head.weight.copy_(model.get_output_embeddings().weight)
        head.bias.zero_()
        head.bias[answer_tokens] = 10.0
    model.lm_head = head
    return model, tokenizer


def hand_distance(model, tokenizer, user: str, answer: str, distance: str) -> float:
    """d(i | prompt) the slow way: the whole chat rendered and tokenised at once, the full logits, and the
    training labels (encode_example) to find the response tokens."""
    row = encode_example(qa(user, answer, "t"), tokenizer)
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    scored = labels[1:] != IGNORE_INDEX
    logp = torch.log_softmax(logits[scored], -1).gather(1, labels[1:][scored][:, None])[:, 0]
    if distance == "euclidean":
        return float(torch.linalg.norm(1 - logp.exp()) / np.sqrt(len(logp)))
    return float(-logp.mean())


@pytest.mark.parametrize("distance", ["euclidean", "kl"])
def test_a_pair_utility_is_the_distance_drop_computed_by_hand(peaky, gsm8k, distance):
    model, tokenizer = peaky
    target, context = gsm8k[0], gsm8k[1]
    alone = hand_distance(model, tokenizer, TEMPLATE_NO_EXAMPLE.format(query=target.prompt_text),
                          target.response, distance)
    shown = hand_distance(model, tokenizer, TEMPLATE_WITH_EXAMPLE.format(
        example_prompt=context.prompt_text, example_response=context.response, query=target.prompt_text),
        target.response, distance)
    utility = InContextUtility(model, tokenizer, distance=distance, max_text_tokens=None, cache=False)
    kernel = utility.kernel([target], [context])
    assert abs(alone - shown) > 1e-5  # far above float error: the check below is not comparing two zeros
    assert kernel.values[0, 0] == pytest.approx(alone - shown, rel=1e-4, abs=1e-7)


def test_batched_pairs_equal_pairs_one_at_a_time_whole_sequences_and_the_full_logits_path(peaky, gsm8k):
    model, tokenizer = peaky
    pool = gsm8k[:4]
    common = dict(max_text_tokens=32, cache=False)
    batched = InContextUtility(model, tokenizer, batch_tokens=4096, **common)
    alone = InContextUtility(model, tokenizer, batch_tokens=1, **common)
    whole = InContextUtility(model, tokenizer, prefix_reuse=False, **common)
    full_logits = InContextUtility(model, tokenizer, **common)
    full_logits._head_only = False  # the fallback for models whose logits are not just head(hidden)
    a, b, c, d = (u.kernel(pool) for u in (batched, alone, whole, full_logits))
    assert batched._head_only and batched._reuse and not whole._reuse
    assert a.stats["prefixes"] == 1 + 4  # the no-example template once, each context once
    assert b.stats["padded_tokens"] == b.stats["model_tokens"]
    # sharing each context's prefix cuts the tokens run by roughly the prefix's share
    assert c.stats["model_tokens"] > 1.5 * a.stats["model_tokens"]
    for other in (b, c, d):
        np.testing.assert_allclose(a.values, other.values, rtol=1e-4, atol=1e-7)


def test_sparse_with_every_column_equals_dense_and_missing_pairs_scale_as_no_effect(peaky, gsm8k):
    model, tokenizer = peaky
    pool = gsm8k[:5]
    utility = InContextUtility(model, tokenizer, max_text_tokens=32, cache=False)
    dense = utility.kernel(pool)
    shuffled = np.stack([np.random.default_rng(i).permutation(5) for i in range(5)])
    sparse = utility.kernel(pool, neighbours=shuffled)
    np.testing.assert_allclose(sparse.to_dense(), dense.values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sparse.scaled().to_dense(), dense.scaled().values, rtol=1e-5, atol=1e-6)
    assert np.array_equal(dense.self_pairs, np.eye(5, dtype=bool))
    scaled, off = dense.scaled().values, ~np.eye(5, dtype=bool)
    assert scaled[off].min() == 0 and scaled[off].max() == 1  # the range leaves the self-pairs out
    lo, hi = dense.values[off].min(), dense.values[off].max()
    np.testing.assert_allclose(scaled.diagonal(), np.clip((dense.values.diagonal() - lo) / (hi - lo), 0, 1),
                               rtol=1e-5)
    # two neighbours each: the range spans the computed pairs other than self-pairs, and utility 0, which
    # every pair never computed stands for
    raw = utility.kernel(pool, neighbours=shuffled[:, :2])
    partial = raw.scaled()
    ranged = np.append(raw.values[~raw.self_pairs], 0.0)
    lo, hi = ranged.min(), ranged.max()
    np.testing.assert_allclose(partial.to_dense(), np.clip((raw.to_dense() - lo) / (hi - lo), 0, 1), rtol=1e-5)
    assert partial.background == pytest.approx(-lo / (hi - lo))
    assert torch.equal(partial.to_torch().to_dense() + torch.from_numpy(partial.to_dense() == partial.background
                                                                        ) * partial.background,
                       torch.from_numpy(partial.to_dense()))


def test_a_killed_run_resumes_from_its_blocks_and_gives_the_uninterrupted_result(peaky, gsm8k, tmp_path):
    model, tokenizer = peaky
    pool = gsm8k[:6]
    settings = dict(max_text_tokens=24, block_pairs=12)  # 36 pairs in 3 blocks, 6 no-example rows in 1
    uninterrupted = InContextUtility(model, tokenizer, cache=False, **settings).kernel(pool)

    def kill_in_the_last_block(name, lo, hi):
        if name == "with" and lo == 24:
            raise KeyboardInterrupt

    utility = InContextUtility(model, tokenizer, cache=tmp_path, **settings)
    with pytest.raises(KeyboardInterrupt):
        utility.kernel(pool, on_block=kill_in_the_last_block)
    resumed = InContextUtility(model, tokenizer, cache=tmp_path, **settings).kernel(pool)
    assert resumed.stats["blocks"] == 4 and resumed.stats["blocks_from_cache"] == 3
    assert resumed.stats["pairs_scored"] == 12
    np.testing.assert_allclose(resumed.values, uninterrupted.values, rtol=1e-6, atol=1e-9)
    # another model (or the same one changed) never reads these blocks
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.bias.mul_(0.5)
    fresh = InContextUtility(other, tokenizer, cache=tmp_path, **settings).kernel(pool)
    assert fresh.stats["blocks_from_cache"] == 0


def test_kernels_over_the_same_targets_share_their_no_example_pass(peaky, gsm8k, translations, tmp_path):
    """FLMI's pool kernel and pool-vs-task kernel score the same pool rows alone: the second reads them."""
    model, tokenizer = peaky
    pool, task = gsm8k[:6], translations[:2]
    utility = InContextUtility(model, tokenizer, max_text_tokens=24, cache=tmp_path)
    utility.kernel(pool)
    against_task = utility.kernel(pool, task)
    assert against_task.stats["blocks_from_cache"] == 1  # the no-example block; the pairs are new
    assert against_task.stats["forward_sequences"] == 12
    alone = InContextUtility(model, tokenizer, max_text_tokens=24, cache=False).kernel(pool, task)
    np.testing.assert_allclose(against_task.values, alone.values, rtol=1e-6, atol=1e-9)


def test_token_counts_match_the_tokens_actually_run(peaky, gsm8k, translations):
    model, tokenizer = peaky
    targets, contexts = gsm8k[:4], translations[:5]
    utility = InContextUtility(model, tokenizer, max_text_tokens=48, cache=False)
    neighbours = np.array([[0, 2], [1, 3], [4, 0], [2, 2 + 1]])
    small_blocks = InContextUtility(model, tokenizer, max_text_tokens=48, cache=False, block_pairs=3)
    whole = InContextUtility(model, tokenizer, max_text_tokens=48, cache=False, prefix_reuse=False)
    for u, kwargs in itertools.product((utility, small_blocks, whole), ({}, {"neighbours": neighbours})):
        predicted = u.count_tokens(targets, contexts, **kwargs)
        run = u.kernel(targets, contexts, **kwargs).stats
        assert predicted.exact and predicted.tokens == run["model_tokens"]
        assert predicted.sequences == run["forward_sequences"] and predicted.pairs == run["pairs_scored"]
        assert predicted.prefixes == run["prefixes"]
    # from the tokenizer alone, k neighbours of unknown identity: the estimate uses the mean context length
    estimate = InContextUtility(None, tokenizer, max_text_tokens=48, cache=False).count_tokens(
        targets, contexts, k=2)
    exact = utility.count_tokens(targets, contexts, neighbours=neighbours)
    assert not estimate.exact and estimate.pairs == exact.pairs
    assert abs(estimate.tokens - exact.tokens) < 0.1 * exact.tokens


def test_delift_selection_costs_exactly_its_predicted_tokens(gsm8k, translations):
    pool = gsm8k[:3] + translations[:3]
    selector = get_selector("delift", model="tiny", sparse_k=None, max_text_tokens=24, cache=False)
    selection = selector.select(pool, 0.5)
    assert len(selection.kept) == 3 and len(set(selection.kept)) == 3
    assert selection.cost.forward_tokens == selector.count_tokens(pool).tokens
    assert selection.cost.details["pool_kernel_pairs_scored"] == 36
    assert selection.params["objective"] == "fl" and selection.params["budget"] == "0.5"
    # greedy gains fall as the set grows; every unpicked row is scored by what it would still add
    gains = selection.scores[selection.kept]
    assert np.all(np.diff(gains) <= 1e-9) and np.isfinite(selection.scores).all()


def test_sparse_delift_scores_k_neighbours_per_row(gsm8k, translations):
    pool = gsm8k[:4] + translations[:4]
    selector = get_selector("delift", model="tiny", sparse_k=3, max_text_tokens=24, cache=False)
    selection = selector.select(pool, 2)
    assert selection.cost.details["pool_kernel_pairs_scored"] == 8 * 3
    assert selection.cost.details["pool_kernel_mode"] == "sparse-3"


def test_sparse_delift_can_find_neighbours_with_the_model_itself_instead_of_minilm(gsm8k, translations,
                                                                                    monkeypatch):
    """``neighbour_embedding="model"``: the k nearest columns come from the selection model's own mean-pooled
    states (what k-center's "model" embedding uses), and the sentence encoder is never loaded."""
    import slimtune.features.embeddings as embeddings
    import slimtune.features.neighbours as neighbours
    from slimtune.models import load_model

    def no_minilm(*args, **kwargs):
        raise AssertionError("MiniLM was loaded")

    searched = []

    def recording(queries, candidates, k, **kwargs):
        searched.append(queries.clone())
        return search(queries, candidates, k, **kwargs)

    search = neighbours.nearest_neighbours
    monkeypatch.setattr(embeddings, "load_minilm", no_minilm)
    monkeypatch.setattr(neighbours, "nearest_neighbours", recording)
    pool = gsm8k[:4] + translations[:4]
    selection = get_selector("delift", model="tiny", sparse_k=3, neighbour_embedding="model", max_text_tokens=24,
                             cache=False).select(pool, 2)
    model, tokenizer = load_model("tiny")
    own, _ = embeddings.model_embeddings(model, tokenizer, pool)
    torch.testing.assert_close(searched[0], own)
    assert selection.cost.details["pool_kernel_pairs_scored"] == 8 * 3
    with pytest.raises(ValueError, match="neighbour_embedding"):
        get_selector("delift", neighbour_embedding="bge")


def duplicated(groups, copies):
    return [qa(ex.prompt_text, ex.response, ex.task, id=f"{g}-{c}") for c in range(copies)
            for g, ex in enumerate(groups)]


@pytest.mark.parametrize("sparse_k", [None, 4])
def test_fl_picks_one_of_each_duplicate_group_before_any_second_copy(gsm8k, translations, sparse_k):
    groups = [gsm8k[0], gsm8k[1], translations[0], translations[1]]
    pool = duplicated(groups, 3)
    selection = get_selector("delift-se", sparse_k=sparse_k).select(pool, 4)
    assert sorted(i.split("-")[0] for i in selection.kept_ids) == ["0", "1", "2", "3"]


def test_delift_se_keeps_its_embeddings_in_the_cache_dir_it_is_given(gsm8k, translations, tmp_path):
    # A bench grid gives every selector its own cache_dir, so embeddings an earlier run left in the user
    # cache cannot make this grid's selection look free.
    pool = [ex for pair in zip(gsm8k[:3], translations[:3]) for ex in pair]
    plain = get_selector("delift-se").select(pool, 2)
    cached = get_selector("delift-se", cache_dir=str(tmp_path)).select(pool, 2)
    assert cached.kept_ids == plain.kept_ids
    assert [p.name.split("-")[0] for p in (tmp_path / "features").iterdir()] == ["embeddings"]
    assert get_selector("delift-se", cache=False).select(pool, 2).kept_ids == plain.kept_ids


def test_flmi_with_a_target_task_picks_that_task_first(gsm8k, translations, full_shared_data):
    # On the bundled sample's rows the gsm8k target's second pick is a translation: a fact about the full data.
    pool = [ex for pair in zip(gsm8k[:6], translations[:6]) for ex in pair]
    for target, task in ((gsm8k[6:], "gsm8k"), (translations[6:], "fra-eng")):
        selection = get_selector("delift-se", objective="flmi").select(pool, 6, target=target)
        picked = [pool[i].task for i in selection.kept]
        assert picked[:3] == [task] * 3


def test_flcg_prefers_what_the_existing_set_lacks(gsm8k, translations):
    pool = [ex for pair in zip(gsm8k[:6], translations[:6]) for ex in pair]
    selection = get_selector("delift-se", objective="flcg").select(pool, 4, existing=gsm8k[6:])
    assert [pool[i].task for i in selection.kept[:3]] == ["fra-eng"] * 3
    with pytest.raises(ValueError, match="existing"):
        get_selector("delift-se", objective="flcg").select(pool, 4)


def test_flmi_on_a_hand_made_kernel_follows_the_query_set(monkeypatch, gsm8k):
    """The objective wiring without any encoder: two clusters, the query set sits in the second."""
    from slimtune.features.utility import UtilityMatrix
    from slimtune.select.delift import DeliftSESelector

    cluster = np.array([0, 0, 0, 1, 1, 1])
    same = (cluster[:, None] == cluster[None, :]).astype(np.float64)

    def kernel(self, rows, cols, row_emb, col_emb, cost, name):
        if name == "pool":
            return UtilityMatrix(0.2 + 0.7 * same, None, len(cols))
        to_query = np.where(cluster[:, None] == 1, 0.9, 0.1) * np.ones((6, len(cols)))
        return UtilityMatrix(to_query, None, len(cols))

    monkeypatch.setattr(DeliftSESelector, "_embed", lambda self, examples, cost: None)
    monkeypatch.setattr(DeliftSESelector, "_kernel", kernel)
    pool = [qa(f"q{i}", f"a{i}", "t") for i in range(6)]
    selection = DeliftSESelector(objective="flmi").select(pool, 2, target=gsm8k[:2])
    assert cluster[selection.kept[0]] == 1


@pytest.mark.slow
def test_with_the_embedded_model_an_example_helps_itself_most(gsm8k):
    """Sanity of the sign: with its own answer in context, SmolLM2 should find its answer easiest."""
    from slimtune.models import load_model

    model, tokenizer = load_model("smollm2", device="cpu")
    pool = gsm8k[:3]
    kernel = InContextUtility(model, tokenizer, max_text_tokens=64, cache=False).kernel(pool).values
    assert all(kernel[i, i] == kernel[i].max() and kernel[i, i] > 0 for i in range(3))


def constructed_selector(monkeypatch, kernel):
    """A DELIFT selector whose pool kernel is ``kernel`` (a UtilityMatrix): no model, no encoder."""
    from slimtune.select.delift import DeliftSelector

    monkeypatch.setattr(DeliftSelector, "_embed", lambda self, examples, cost: None)
    monkeypatch.setattr(DeliftSelector, "_kernel", lambda self, rows, cols, re, ce, cost, name: kernel)
    return DeliftSelector(objective="fl", sparse_k=3)


def harmful_neighbour_kernel():
    """Seven rows, three stored pairs each (the self-pair first, utility 3: the answer copied). Items 0 and 1
    help rows 2 and 3 equally; item 0 also hurts row 4 a little (utility -0.2), where item 1 was never
    computed; item 6 hurts row 4 a lot (-1). Under "missing = no effect", item 1 is the better first pick."""
    from slimtune.features.utility import UtilityMatrix

    neighbours = np.array([[0, 2, 3], [1, 2, 3], [2, 0, 1], [3, 0, 1], [4, 0, 6], [5, 2, 3], [6, 5, 4]])
    utility = np.array([[3, .1, .1], [3, .1, .1], [3, .8, .8], [3, .8, .8], [3, -.2, -1], [3, 1, .1],
                        [3, .1, .1]])
    self_pairs = neighbours == np.arange(7)[:, None]
    return UtilityMatrix(utility, neighbours, 7, {}, self_pairs)


def test_sparse_delift_counts_an_uncomputed_pair_as_no_effect_not_as_the_least_useful_pair(monkeypatch):
    from slimtune.features.utility import UtilityMatrix

    pool = [qa(f"q{i}", f"a{i}", "t") for i in range(7)]
    sparse = harmful_neighbour_kernel()
    first = constructed_selector(monkeypatch, sparse).select(pool, 1)
    assert first.kept == [1]  # not item 0, which covers row 4 only through a harmful pair
    # the sparse kernel selects exactly as its dense form with utility 0 ("no effect") in the gaps
    dense = UtilityMatrix(sparse.to_dense(), None, 7, {}, np.eye(7, dtype=bool))
    order = constructed_selector(monkeypatch, sparse).select(pool, 5)
    assert constructed_selector(monkeypatch, dense).select(pool, 5).kept == order.kept
    scaled = sparse.scaled()
    assert scaled.background == pytest.approx(0.5)  # utilities span [-1, 1] once the self-pairs are out
    assert scaled.values[4, 1] < scaled.background < scaled.values[2, 1]
    assert np.all(scaled.values[sparse.self_pairs] == 1)


def test_a_sparse_kernel_holding_every_pair_selects_as_the_dense_one(monkeypatch):
    from slimtune.features.utility import UtilityMatrix

    rng = np.random.default_rng(0)
    utility = rng.normal(size=(8, 8))
    np.fill_diagonal(utility, 4.0)
    dense = UtilityMatrix(utility, None, 8, {}, np.eye(8, dtype=bool))
    columns = np.stack([rng.permutation(8) for _ in range(8)])
    sparse = UtilityMatrix(np.take_along_axis(utility, columns, 1), columns, 8, {},
                           columns == np.arange(8)[:, None])
    pool = [qa(f"q{i}", f"a{i}", "t") for i in range(8)]
    picks = [constructed_selector(monkeypatch, kernel).select(pool, 5) for kernel in (dense, sparse)]
    assert picks[0].kept == picks[1].kept
    np.testing.assert_allclose(picks[0].scores, picks[1].scores, rtol=1e-6)


def test_a_selection_leaves_no_budget_behind_for_the_next_call(monkeypatch):
    """select() on pool A with budget 3, then score() on pool B: the same as a fresh selector's."""
    from slimtune.select.base import Cost

    pool_a = [qa(f"q{i}", f"a{i}", "t") for i in range(7)]
    pool_b = [qa(f"r{i}", f"b{i}", "t") for i in range(7)]
    used = constructed_selector(monkeypatch, harmful_neighbour_kernel())
    used.select(pool_a, 3)
    fresh = constructed_selector(monkeypatch, harmful_neighbour_kernel())
    (scores, order), (fresh_scores, fresh_order) = (s.score(pool_b, cost=Cost()) for s in (used, fresh))
    assert order == fresh_order and len(order) == len(pool_b)
    np.testing.assert_array_equal(scores, fresh_scores)


def test_delift_keeps_its_embeddings_and_neighbours_where_its_cache_arguments_say(gsm8k, translations, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "global"))
    pool = gsm8k[:4] + translations[:4]
    get_selector("delift", model="tiny", sparse_k=3, max_text_tokens=24, cache_dir=str(tmp_path / "mine")).select(
        pool, 2)
    kinds = {path.name.split("-")[0] for path in (tmp_path / "mine" / "features").iterdir()}
    assert {"embeddings", "neighbours"} <= kinds
    get_selector("delift", model="tiny", sparse_k=3, max_text_tokens=24, cache=False).select(pool, 2)
    assert not (tmp_path / "global" / "features").exists()  # neither selection wrote to the global cache
