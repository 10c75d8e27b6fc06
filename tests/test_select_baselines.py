"""The baselines users compare against: random, length, loss, IFD, k-center, and the embeddings under them."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import private_cache

from slimtune.data.example import make_example
from slimtune.features.embeddings import cosine_kernel, knn, load_minilm, minilm_embeddings, model_embeddings
from slimtune.select import Budget, get_selector
from slimtune.select.heuristics import IFDSelector, LossSelector, _ResponseLossSelector
from slimtune.select.kcenter import KCenterSelector, farthest_point_order


def qa(question: str, answer: str, id: str | None = None, **metadata):
    return make_example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                        id=id, **metadata)


@pytest.fixture(autouse=True)
def fresh_feature_store(tmp_path, monkeypatch):
    """Losses and embeddings are stored under the slimtune cache: each test starts from none."""
    monkeypatch.setenv("SLIMTUNE_CACHE", str(private_cache(tmp_path / "cache")))


@pytest.fixture(scope="session")
def minilm():
    return load_minilm("cpu")


@pytest.fixture
def pool():
    return [qa(f"Question {i}: what is {i} plus {i}?", f"{i} plus {i} is {2 * i}." + " Indeed." * (i % 4),
               id=f"row{i}") for i in range(12)]


def patch_losses(monkeypatch, tokenizer, *vectors):
    """Make the shared loss pass return ``vectors`` in turn (conditioned first for IFD), without a model."""
    calls = iter(vectors)
    monkeypatch.setattr(_ResponseLossSelector, "_load", lambda self: (torch.nn.Linear(1, 1), tokenizer))
    monkeypatch.setattr(_ResponseLossSelector, "_score_rows",
                        lambda self, model, tok, rows, cost: np.array(next(calls), dtype=float))


def render_ids(tokenizer, messages, **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hand_loss(model, tokenizer, messages, n_tokens: int | None = None) -> float:
    """Mean cross-entropy of the last assistant turn (its first ``n_tokens`` tokens) from a plain forward."""
    ids = render_ids(tokenizer, messages)
    start = len(render_ids(tokenizer, messages[:-1], add_generation_prompt=True))
    end = len(ids) if n_tokens is None else start + n_tokens
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:end]])).logits[0]
    return F.cross_entropy(logits[start - 1:end - 1], torch.tensor(ids[start:end])).item()


# ---- random ------------------------------------------------------------------------------------------------

def test_random_is_seeded_and_respects_fraction_and_count_budgets(pool):
    a = get_selector("random", seed=3).select(pool, 0.25)
    assert a.kept == get_selector("random", seed=3).select(pool, 0.25).kept
    assert len(a.kept) == math.ceil(0.25 * len(pool)) == 3
    assert len(set(a.kept)) == 3
    five = get_selector("random", seed=3).select(pool, 5)
    assert len(five.kept) == 5
    assert five.kept[:3] == a.kept, "a smaller budget keeps a prefix of a larger one under the same seed"
    others = {tuple(get_selector("random", seed=s).select(pool, 5).kept) for s in range(4, 9)}
    assert len(others | {tuple(five.kept)}) > 1, "different seeds must give different subsets"
    assert len(get_selector("random").select(pool, Budget(count=100)).kept) == len(pool)


# ---- length ------------------------------------------------------------------------------------------------

def test_length_keeps_longest_or_shortest_in_characters():
    rows = [qa("q", "medium answer", id="m"), qa("q", "a much much longer answer", id="l"),
            qa("q", "ok", id="s")]
    assert get_selector("length", unit="chars").select(rows, 1).kept_ids == ["l"]
    assert get_selector("length", unit="chars", keep="shortest").select(rows, 2).kept_ids == ["s", "m"]


def test_length_in_tokens_counts_the_models_tokens_not_characters():
    # 15 characters but 15 tokens (one per digit and space) versus 20 characters in 2 tokens
    rows = [qa("q", "internationalization", id="few"), qa("q", "1 2 3 4 5 6 7 8", id="many")]
    by_tokens = get_selector("length", model="tiny").select(rows, 1)
    assert by_tokens.kept_ids == ["many"]
    assert by_tokens.scores.tolist() == [2.0, 15.0]
    assert get_selector("length", unit="chars").select(rows, 1).kept_ids == ["few"]


def test_unknown_choices_are_rejected():
    with pytest.raises(ValueError, match="keep"):
        get_selector("length", keep="tallest")
    with pytest.raises(ValueError, match="metric"):
        get_selector("loss", metric="accuracy")
    with pytest.raises(ValueError, match="embedding"):
        get_selector("kcenter", embedding="tfidf")


# ---- loss --------------------------------------------------------------------------------------------------

def test_loss_keeps_highest_or_lowest_and_puts_unscorable_rows_last(monkeypatch, tokenizer, pool):
    losses = [2.0, 5.0, np.nan, 1.0, 4.0] + [3.0] * (len(pool) - 5)
    patch_losses(monkeypatch, tokenizer, losses)
    high = LossSelector(model="tiny").select(pool, 2)
    assert high.kept == [1, 4]
    np.testing.assert_array_equal(high.scores, losses)  # the manifest shows the losses themselves
    patch_losses(monkeypatch, tokenizer, losses)
    low = LossSelector(model="tiny", keep="lowest").select(pool, len(pool), allow_unscored=True)
    assert low.kept[:2] == [3, 0]
    assert low.kept[-1] == 2
    patch_losses(monkeypatch, tokenizer, losses)
    ppl = LossSelector(model="tiny", metric="perplexity").select(pool, 2)
    assert ppl.kept == [1, 4]
    assert ppl.scores[1] == pytest.approx(math.exp(5.0))


def test_loss_scores_are_the_response_cross_entropy_whatever_the_batching(tiny, pool):
    model, tokenizer = tiny
    one = LossSelector(model="tiny", batch_size=1).select(pool, 3)
    many = LossSelector(model="tiny", batch_size=5).select(pool, 3)
    np.testing.assert_allclose(one.scores, many.scores, rtol=1e-5)
    for i in (0, 7):
        assert one.scores[i] == pytest.approx(hand_loss(model, tokenizer, list(pool[i].messages)), rel=1e-5)
    assert one.cost.forward_tokens == sum(len(render_ids(tokenizer, list(ex.messages))) for ex in pool)


def test_loss_of_a_dialogue_scores_only_its_last_response(tiny):
    model, tokenizer = tiny
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    selection = LossSelector(model="tiny").select([make_example(turns)], 1)
    assert selection.scores[0] == pytest.approx(hand_loss(model, tokenizer, turns), rel=1e-5)


def test_rows_longer_than_max_length_lose_the_prompt_start_and_are_still_scored(pool):
    long_prompt = qa("word " * 400, "the answer", id="long")
    # the final answer survives; the first one is cut away with the start of the prompt
    long_dialogue = make_example([{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello!"},
                                  {"role": "user", "content": "word " * 400},
                                  {"role": "assistant", "content": "the answer"}], id="dialogue")
    selection = LossSelector(model="tiny", max_length=64).select([*pool[:3], long_prompt, long_dialogue], 5)
    assert np.isfinite(selection.scores).all() and not selection.cost.unscored


# ---- IFD ---------------------------------------------------------------------------------------------------

def test_ifd_is_the_conditioned_over_the_unconditioned_response_loss(tiny, pool):
    model, tokenizer = tiny
    selection = IFDSelector(model="tiny", drop_above_one=False).select(pool, 3)
    for i in (2, 9):
        messages = list(pool[i].messages)
        alone = [{"role": "user", "content": ""}, messages[-1]]
        expected = hand_loss(model, tokenizer, messages) / hand_loss(model, tokenizer, alone)
        assert selection.scores[i] == pytest.approx(expected, rel=1e-5)
    assert selection.kept == np.argsort(-selection.scores, kind="stable")[:3].tolist()


def test_ifd_scores_the_whole_response_when_max_length_cuts_the_prompt(tiny):
    model, tokenizer = tiny
    row = qa("Describe the sea. " * 20, "The sea is wide, deep and blue.")
    messages = list(row.messages)
    ids = render_ids(tokenizer, messages)
    start = len(render_ids(tokenizer, messages[:-1], add_generation_prompt=True))
    max_length = len(ids) - start + 5  # the response and the last five prompt tokens
    selection = IFDSelector(model="tiny", max_length=max_length, drop_above_one=False).select([row], 1)
    window = ids[-max_length:]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window])).logits[0]
    with_x = F.cross_entropy(logits[4:-1], torch.tensor(window[5:])).item()
    alone = [{"role": "user", "content": ""}, messages[-1]]
    assert selection.scores[0] == pytest.approx(with_x / hand_loss(model, tokenizer, alone), rel=1e-5)


def test_ifd_ranks_rows_above_one_after_all_others_when_filtering(monkeypatch, tokenizer, pool):
    rows = pool[:5]
    with_x, without_x = [0.5, 1.5, 0.9, 1.2, np.nan], [1.0] * 5
    patch_losses(monkeypatch, tokenizer, with_x, without_x)
    filtered = IFDSelector(model="tiny").select(rows, 5, allow_unscored=True)
    assert filtered.kept == [2, 0, 3, 1, 4]  # misaligned pairs (IFD > 1) only fill a budget the rest cannot
    assert filtered.cost.details["ifd_above_one"] == 2
    patch_losses(monkeypatch, tokenizer, with_x, without_x)
    assert IFDSelector(model="tiny", drop_above_one=False).select(rows, 5, allow_unscored=True).kept == \
        [1, 3, 2, 0, 4]


# ---- k-center ----------------------------------------------------------------------------------------------

def clusters(n_clusters: int, per_cluster: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, 32, generator=g), dim=1)
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    points = centres[labels] + 0.05 * torch.randn(len(labels), 32, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return F.normalize(points[perm], dim=1), labels[perm.numpy()]


@pytest.mark.parametrize("start", [0, 5, 17])
def test_farthest_point_picks_one_per_cluster_before_any_second(start):
    points, labels = clusters(5, 4)
    order, _ = farthest_point_order(points, len(points), start=start)
    assert order[0] == start
    assert sorted(labels[order[:5]]) == [0, 1, 2, 3, 4]


def test_farthest_point_picks_every_row_once_even_among_exact_duplicates():
    points, _ = clusters(2, 3)
    points = torch.cat([points, points, points[:1]])
    order, _ = farthest_point_order(points, len(points))
    assert sorted(order) == list(range(len(points)))


def test_kcenter_fills_what_existing_examples_leave_uncovered(monkeypatch):
    points, labels = clusters(4, 3)
    pool = [qa(f"q{i}", f"a{i}", id=f"p{i}") for i in range(len(points))]
    covered = [int(np.flatnonzero(labels == c)[0]) for c in (0, 1)]
    existing = [qa(f"e{c}", "e", id=f"e{c}") for c in (0, 1)]
    vectors = {**{ex.id: points[i] for i, ex in enumerate(pool)},
               **{ex.id: points[i] for i, ex in zip(covered, existing)}}  # each existing row sits on a cluster
    monkeypatch.setattr(KCenterSelector, "_embed",
                        lambda self, examples, cost: torch.stack([vectors[ex.id] for ex in examples]))
    selection = KCenterSelector(seed=0).select(pool, 2, existing=existing)
    assert sorted(labels[selection.kept]) == [2, 3]


def test_kcenter_manifest_scores_follow_the_pick_order(monkeypatch):
    points, labels = clusters(3, 4)
    pool = [qa(f"q{i}", f"a{i}", id=f"p{i}") for i in range(len(points))]
    monkeypatch.setattr(KCenterSelector, "_embed", lambda self, examples, cost: points)
    selection = KCenterSelector(seed=1).select(pool, 3)
    assert sorted(labels[selection.kept]) == [0, 1, 2]
    ranked = np.argsort(-selection.scores, kind="stable").tolist()
    assert ranked[:3] == selection.kept
    assert sorted(selection.scores.tolist()) == list(range(1, len(pool) + 1))
    assert selection.kept == KCenterSelector(seed=1).select(pool, 3).kept


def test_kcenter_on_sentence_embeddings_takes_one_example_per_topic(minilm):
    topics = {
        "cooking": ["How long should I boil an egg?", "What temperature do I bake bread at?",
                    "How do I make a tomato sauce for pasta?"],
        "football": ["Who won the last World Cup final?", "How many players are on a soccer team?",
                     "What is the offside rule in football?"],
        "astronomy": ["How far away is the Moon?", "Why is Mars red?", "What is a black hole made of?"],
    }
    pool = [qa(q, "Let me explain.", id=f"{topic}{i}", task=topic)
            for topic, questions in topics.items() for i, q in enumerate(questions)]
    for seed in range(3):
        kept = KCenterSelector(seed=seed).select(pool, 3).subset(pool)
        assert sorted(ex.task for ex in kept) == ["astronomy", "cooking", "football"]


# ---- embeddings --------------------------------------------------------------------------------------------

def test_minilm_places_paraphrases_closer_than_unrelated_sentences(minilm):
    rows = [qa("How do I reset my password?", "Click 'Forgot password' on the sign-in page."),
            qa("I forgot my password, how can I change it?", "Use the 'Forgot password' link to sign in."),
            qa("What is the capital of Australia?", "Canberra is the capital of Australia.")]
    emb = minilm_embeddings(rows)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] + 0.3
    assert cos[0, 1] > cos[1, 2] + 0.3
    torch.testing.assert_close(minilm_embeddings(rows), emb, rtol=0, atol=0)


def test_prompt_only_embeddings_ignore_the_response(minilm, tiny):
    a = qa("Translate 'chat' to English.", "cat")
    b = qa("Translate 'chat' to English.", "It means cat, a pet.")
    assert not torch.equal(*minilm_embeddings([a, b]))
    torch.testing.assert_close(*minilm_embeddings([a, b], prompt_only=True))
    model, tokenizer = tiny
    together = model_embeddings(model, tokenizer, [a, b], prompt_only=True)[0]
    torch.testing.assert_close(together[0], together[1])


def test_model_embeddings_do_not_depend_on_batching_and_count_tokens(tiny, pool):
    model, tokenizer = tiny
    one, tokens = model_embeddings(model, tokenizer, pool, batch_size=1)
    many, tokens_many = model_embeddings(model, tokenizer, pool, batch_size=5)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)  # padding never leaks into a row's mean
    assert one.shape == (len(pool), model.config.hidden_size)
    torch.testing.assert_close(one.norm(dim=1), torch.ones(len(pool)))
    assert tokens == tokens_many == sum(len(tokenizer(f"{ex.prompt_text}\n{ex.response}")["input_ids"])
                                        for ex in pool)
    assert model_embeddings(model, tokenizer, [pool[0], pool[0]])[1] == len(
        tokenizer(f"{pool[0].prompt_text}\n{pool[0].response}")["input_ids"]), "duplicates are encoded once"


def test_cosine_kernel_and_knn_match_the_dense_computation_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 16, generator=g) * 3, torch.randn(11, 16, generator=g)
    cos = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    for chunk in (None, 2, 100):
        kernel = cosine_kernel(a, b, chunk_size=chunk)
        torch.testing.assert_close(kernel, (cos + 1) / 2)
        sims, idx = knn(a, b, 3, chunk_size=chunk)
        torch.testing.assert_close(sims, cos.topk(3, dim=1).values)
        torch.testing.assert_close(idx, cos.topk(3, dim=1).indices)
    assert kernel.min() >= 0 and kernel.max() <= 1
    assert knn(a, b, 50)[1].shape == (7, 11), "k is capped at the number of candidates"


# ---- the saved selection -----------------------------------------------------------------------------------

def test_saved_selection_writes_the_subset_and_a_manifest_of_every_pool_row(tmp_path, pool):
    if importlib.util.find_spec("slimtune.data.writers") is None:
        pytest.skip("slimtune.data.writers (the subset writer, another engineer's module) does not exist yet")
    selection = get_selector("random", seed=0).select(pool, 0.25)
    subset_path = selection.save(tmp_path, pool)
    assert subset_path.exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    rows = manifest["examples"]
    assert [r["id"] for r in rows] == [ex.id for ex in pool]
    assert [r["score"] for r in rows] == pytest.approx(selection.scores.tolist())
    assert {r["id"] for r in rows if r["kept"]} == set(selection.kept_ids)
    assert manifest["kept"] == len(selection.kept) == 3
    assert manifest["cost"]["forward_tokens"] == selection.cost.forward_tokens
    assert manifest["cost"]["seconds"] == pytest.approx(selection.cost.seconds)
    assert manifest["params"]["seed"] == 0


# ---- neighbours for sparse kernels -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 12])
def test_faiss_and_the_exact_torch_search_give_the_same_neighbours_with_ties_to_the_lower_index(k):
    from slimtune.features.neighbours import nearest_neighbours

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 16, generator=g)
    # groups of identical rows wider than k plus the margin: float32 rounding alone cannot order them
    rows = torch.cat([rows, *[rows[:30]] * 20])
    unit = F.normalize(rows, dim=1).double()
    cosines = (unit[:, None] * unit[None]).sum(-1)  # element-wise, so equal rows tie exactly (no BLAS tiling)
    columns = np.broadcast_to(np.arange(len(rows)), cosines.shape)
    expected = torch.from_numpy(np.lexsort((columns, -cosines.numpy()), axis=1)[:, :k])
    found = {engine: nearest_neighbours(rows, rows, k, cache=False, engine=engine, shard_rows=97)
             for engine in ("faiss", "torch")}
    for sims, indices in found.values():
        assert torch.equal(indices, expected)
        torch.testing.assert_close(sims, cosines.gather(1, expected).float())
    assert torch.equal(found["faiss"][0], found["torch"][0])


def test_above_the_exact_limit_faiss_finds_nearly_every_neighbour_and_the_same_ones_each_time(monkeypatch):
    from slimtune.features import neighbours

    points, _ = clusters(20, 100)
    exact = neighbours.nearest_neighbours(points, points, 10, cache=False, engine="torch")[1]
    monkeypatch.setattr(neighbours, "EXACT_LIMIT", 500)
    first, again = (neighbours.nearest_neighbours(points, points, 10, cache=False, engine="faiss")[1]
                    for _ in range(2))
    assert torch.equal(first, again), "every process builds the same index"
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(first, exact)])
    assert recall > 0.95


def test_delift_se_goes_sparse_by_itself_above_its_stated_size():
    from slimtune.features.neighbours import AUTO_SPARSE_K, DENSE_LIMIT, sparse_width
    from slimtune.select.base import Cost
    from slimtune.select.delift import DeliftSESelector

    assert sparse_width(DENSE_LIMIT, None) is None and sparse_width(DENSE_LIMIT + 1, None) == AUTO_SPARSE_K
    assert sparse_width(DENSE_LIMIT + 1, 8) == 8 and sparse_width(5, 8) is None
    n = DENSE_LIMIT + 1
    embeddings = F.normalize(torch.randn(n, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    kernel = DeliftSESelector()._kernel([None] * n, [None] * n, embeddings, embeddings, Cost(), "pool")
    assert kernel.sparse and kernel.columns.shape == (n, AUTO_SPARSE_K)
    assert (kernel.columns[:, 0] == np.arange(n)).all(), "each row is its own nearest neighbour"


def test_a_dense_kernel_that_cannot_fit_is_refused_before_it_starts_with_the_size_it_needs():
    from slimtune.features.neighbours import require_dense_fits

    with pytest.raises(MemoryError, match=r"100,000 x 100,000 kernel needs about 111.8 GiB.*sparse_k"):
        require_dense_fits(100_000, 100_000, 12, available=8 << 30)
    require_dense_fits(1_000, 1_000, 12, available=8 << 30)


@pytest.mark.parametrize("make", [
    lambda **cache: LossSelector(model="tiny", **cache),
    lambda **cache: IFDSelector(model="tiny", drop_above_one=False, **cache),
    lambda **cache: KCenterSelector(embedding="model", model="tiny", **cache),
], ids=["loss", "ifd", "kcenter"])
def test_stored_features_go_where_the_cache_arguments_say_and_nowhere_else(make, pool, tmp_path):
    # A bench grid hands every selector its own cache_dir: scores an earlier run left in the user cache must
    # not make a grid's selection look cheaper, and the grid's must not fill the user's cache.
    user_features = tmp_path / "cache" / "features"
    mine = make(cache_dir=str(tmp_path / "mine")).select(pool, 3)
    assert [path.name.split("-")[0] for path in (tmp_path / "mine" / "features").iterdir()]
    assert not user_features.exists()
    again = make(cache=False).select(pool, 3)
    assert not user_features.exists() and again.kept == mine.kept
    make().select(pool, 3)
    assert list(user_features.iterdir())  # by default the slimtune cache, as before
