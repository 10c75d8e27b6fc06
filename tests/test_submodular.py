"""Facility-location objectives and greedy optimisers: formulas, submodlib agreement, sparse == dense, and the
selections users rely on (one of each duplicate group, query-led FLMI, gap-filling FLCG)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from slimtune.select.submodular import (
    FacilityLocation,
    FLConditionalGain,
    FLMutualInformation,
    cosine_kernel,
    greedy_maximize,
    knn_sparsify,
)

SIZES = [(17, 0), (48, 1), (120, 2)]


def random_kernels(n: int, seed: int, n_query: int = 5, n_existing: int = 4):
    rng = np.random.default_rng(seed)
    return rng.random((n, n)), rng.random((n, n_query)), rng.random((n, n_existing))


def reference_value(name: str, S: np.ndarray, A: list[int], aux: np.ndarray | None, weight: float) -> float:
    """The module docstring's formulas, written out directly."""
    covered = S[:, A].max(1) if A else np.zeros(len(S))
    if name == "fl":
        return covered.sum() if A else 0.0
    if name == "flmi":
        return np.minimum(covered, weight * aux.max(1)).sum() if A else 0.0
    return np.maximum(covered - weight * aux.max(1), 0).sum() if A else 0.0


def build(name: str, S, aux=None, weight: float = 1.0):
    if name == "fl":
        return FacilityLocation(S)
    if name == "flmi":
        return FLMutualInformation(S, aux, eta=weight)
    return FLConditionalGain(S, aux, nu=weight)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def random_centres(n: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Unit vectors; in 64 dimensions any two are nearly orthogonal (kernel ~0.5 between them)."""
    return unit(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)))


def blobs(centres: torch.Tensor, sizes: list[int], spread: float, seed: int = 0):
    """``sizes[c]`` points around ``centres[c]`` with noise of norm ~``spread``; and each point's blob."""
    labels = torch.cat([torch.full((size,), c) for c, size in enumerate(sizes)])
    noise = torch.randn(len(labels), centres.shape[1], generator=torch.Generator().manual_seed(seed))
    return centres[labels] + spread * noise / centres.shape[1] ** 0.5, labels


OBJECTIVES = [("fl", 1.0), ("flmi", 1.0), ("flmi", 0.6), ("flcg", 1.0), ("flcg", 0.5)]


@pytest.mark.parametrize(("name", "weight"), OBJECTIVES)
@pytest.mark.parametrize(("n", "seed"), SIZES)
def test_values_follow_the_formulas(name, weight, n, seed):
    S, SQ, SP = random_kernels(n, seed)
    aux = SQ if name == "flmi" else SP
    objective = build(name, torch.tensor(S), torch.tensor(aux), weight)
    rng = np.random.default_rng(seed + 100)
    for size in [0, 1, 3, n // 2, n]:
        A = sorted(rng.choice(n, size, replace=False).tolist())
        assert objective.evaluate(A) == pytest.approx(reference_value(name, S, A, aux, weight), rel=1e-12)


@pytest.mark.filterwarnings("ignore:Please import `csr_matrix`:DeprecationWarning")
@pytest.mark.parametrize(("name", "weight"), OBJECTIVES)
@pytest.mark.parametrize(("n", "seed"), SIZES)
def test_values_and_greedy_picks_agree_with_submodlib(name, weight, n, seed):
    pytest.importorskip("submodlib")
    from submodlib.functions import facilityLocationConditionalGain as flcg
    from submodlib.functions import facilityLocationMutualInformation as flmi
    from submodlib.functions.facilityLocation import FacilityLocationFunction

    S, SQ, SP = random_kernels(n, seed)
    if name == "fl":
        theirs, aux = FacilityLocationFunction(n, mode="dense", sijs=S, separate_rep=False), None
    elif name == "flmi":
        theirs, aux = flmi.FacilityLocationMutualInformationFunction(
            n, SQ.shape[1], data_sijs=S, query_sijs=SQ, magnificationEta=weight), SQ
    else:
        theirs, aux = flcg.FacilityLocationConditionalGainFunction(
            n, SP.shape[1], data_sijs=S, private_sijs=SP, privacyHardness=weight), SP
    ours = build(name, torch.tensor(S), None if aux is None else torch.tensor(aux), weight)

    rng = np.random.default_rng(seed + 7)
    for size in [1, 2, n // 3, n - 1]:
        A = set(rng.choice(n, size, replace=False).tolist())
        # submodlib keeps kernels in float32
        assert ours.evaluate(A) == pytest.approx(theirs.evaluate(A), rel=1e-5)

    k = max(2, n // 3)
    for optimizer in ["NaiveGreedy", "LazyGreedy"]:
        their_picks = theirs.maximize(k, optimizer=optimizer, show_progress=False)
        unique_path = follows_a_greedy_path(ours, their_picks)
        if unique_path:
            order, gains = greedy_maximize(ours, k)
            assert order == [j for j, _ in their_picks]
            assert gains == pytest.approx([g for _, g in their_picks], rel=1e-4, abs=1e-5)
        else:  # FLMI saturates at the caps, where exactly tied gains are common and submodlib breaks ties
            assert name == "flmi"  # towards high indices; ours go to the lowest


def follows_a_greedy_path(ours, their_picks) -> bool:
    """Replays submodlib's picks on our objective: each must have the best gain there, equal to the gain
    submodlib reports. Returns whether every step's best was unique (so greedy had only one choice)."""
    ours.reset()
    unique = True
    taken = torch.zeros(ours.n_candidates, dtype=torch.bool)
    for j, their_gain in their_picks:
        gains = ours.marginal_gains(torch.arange(ours.n_candidates)).masked_fill(taken, -torch.inf)
        best = float(gains.max())
        assert float(gains[j]) == pytest.approx(best, rel=1e-5, abs=1e-6)
        assert their_gain == pytest.approx(best, rel=1e-4, abs=1e-5)
        unique &= int((gains >= best - 1e-6 * (1 + abs(best))).sum()) == 1
        ours.add(j)
        taken[j] = True
    return unique


def quantised_kernel(n: int, seed: int) -> torch.Tensor:
    """Entries in {0, 0.25, ..., 1}: many exactly tied gains, where tie-breaking must still match."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (n, n), generator=g).double() / 4


@pytest.mark.parametrize(("name", "weight"), OBJECTIVES)
@pytest.mark.parametrize("kernel", ["random", "quantised"])
@pytest.mark.parametrize(("n", "seed"), SIZES)
def test_lazy_greedy_picks_exactly_what_naive_greedy_picks(name, weight, kernel, n, seed):
    S, SQ, SP = (torch.tensor(a) for a in random_kernels(n, seed))
    if kernel == "quantised":
        S, SQ, SP = (quantised_kernel(n, seed + i)[:, :columns] for i, columns in enumerate([n, 5, 4]))
    objective = build(name, S, SQ if name == "flmi" else SP, weight)
    naive = greedy_maximize(objective, n, method="naive")
    lazy = greedy_maximize(objective, n, method="lazy")
    assert lazy == naive
    order, gains = lazy
    assert sorted(order) == list(range(n))
    assert all(a >= b for a, b in itertools.pairwise(gains))
    assert objective.value == pytest.approx(sum(gains))
    assert objective.evaluate(order[: n // 2]) == pytest.approx(sum(gains[: n // 2]))


def test_ties_go_to_the_lowest_index_and_zero_gains_do_not_stop_greedy():
    objective = FacilityLocation(torch.full((6, 6), 0.5))
    for method in ["naive", "lazy"]:
        order, gains = greedy_maximize(objective, 4, method=method)
        assert order == [0, 1, 2, 3]
        assert gains == [3.0, 0.0, 0.0, 0.0]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(("name", "weight"), OBJECTIVES)
@pytest.mark.parametrize(("n", "seed"), [(60, 0), (150, 3)])
def test_sparse_kernels_select_like_their_dense_equivalent(name, weight, n, seed):
    centres = random_centres(4, seed=seed)
    emb, _ = blobs(centres[:3], [n // 3, n // 3, n - 2 * (n // 3)], spread=0.5, seed=seed)
    query, _ = blobs(centres[1:], [3, 2, 2], spread=0.5, seed=seed + 1)
    sparse = cosine_kernel(emb, k=8)
    values, indices = cosine_kernel(emb).topk(8, dim=1)
    aux_dense = cosine_kernel(emb, query) if name == "flmi" else cosine_kernel(emb, emb[:: n // 10])
    aux_sparse = knn_sparsify(aux_dense, 3)

    dense_obj = build(name, sparse.to_dense(), aux_sparse.to_dense(), weight)
    forms = [build(name, sparse, aux_sparse, weight),
             build(name, sparse.to_sparse_csr(), aux_sparse.to_sparse_csr(), weight),
             build(name, (indices, values), aux_sparse, weight)]
    k = n // 4
    expected = greedy_maximize(dense_obj, k)
    subset = expected[0][: k // 2]
    for objective in forms:
        order, gains = greedy_maximize(objective, k)
        assert order == expected[0]
        assert gains == pytest.approx(expected[1], rel=1e-5)
        assert objective.evaluate(subset) == pytest.approx(dense_obj.evaluate(subset), rel=1e-6)
        assert greedy_maximize(objective, k, method="naive") == (order, gains)


@pytest.mark.parametrize(("name", "weight"), OBJECTIVES)
@pytest.mark.parametrize("seed", [0, 1])
def test_a_sparse_kernel_with_a_background_selects_like_the_dense_kernel_filled_with_it(name, weight, seed):
    """Missing entries standing for b (DELIFT's "no effect"), stored entries on both sides of b (helpful and
    harmful pairs), some rows storing nothing, sparse aux kernels with their own background: every greedy
    method and every subset's value are those of the dense kernels with b written into the gaps."""
    n, k, b, aux_b = 40, 4, 0.45, 0.3
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(n)])
    values = torch.rand(n, k, generator=gen)
    values[:5] = 0.0  # rows 0-4 store only zeros: far below the background
    rows = torch.arange(n).repeat_interleave(k)
    sparse = torch.sparse_coo_tensor(torch.stack([rows, indices.reshape(-1)]), values.reshape(-1), (n, n),
                                     check_invariants=True)
    sparse = sparse.coalesce()
    dense = torch.full((n, n), b).index_put_((rows, indices.reshape(-1)), values.reshape(-1))
    aux_dense = torch.rand(n, 3, generator=gen)
    aux_sparse = knn_sparsify(aux_dense, 2)
    aux_filled = torch.where(aux_sparse.to_dense() > 0, aux_sparse.to_dense(), torch.tensor(aux_b))

    def objective(S, aux, background, aux_background):
        if name == "fl":
            return FacilityLocation(S, background=background)
        if name == "flmi":
            return FLMutualInformation(S, aux, eta=weight, background=background, query_background=aux_background)
        return FLConditionalGain(S, aux, nu=weight, background=background, existing_background=aux_background)

    expected = objective(dense, aux_filled, 0.0, 0.0)
    for S in (sparse, (indices, values)):
        got = objective(S, aux_sparse, b, aux_b)
        for method in ("naive", "lazy"):
            order, gains = greedy_maximize(got, 12, method=method)
            reference = greedy_maximize(expected, 12, method=method)
            assert order == reference[0]
            assert gains == pytest.approx(reference[1], rel=1e-5, abs=1e-6)
            assert got.value == pytest.approx(expected.value, rel=1e-5)
        for subset in ([3], [0, 1, 2, 3, 4], order[:5], list(range(0, n, 3))):
            assert got.evaluate(subset) == pytest.approx(expected.evaluate(subset), rel=1e-6)


def test_a_knn_kernel_keeps_a_repeated_neighbour_once_at_its_largest_similarity():
    indices = torch.tensor([[0, 1, 1], [1, 2, 2], [2, 0, 0]])
    values = torch.tensor([[1.0, 0.3, 0.6], [1.0, 0.2, 0.4], [1.0, 0.1, 0.5]])
    dense = torch.tensor([[1.0, 0.6, 0.0], [0.0, 1.0, 0.4], [0.5, 0.0, 1.0]])
    knn = FacilityLocation((indices, values))
    for A in [[0], [1], [2], [0, 2]]:
        assert knn.evaluate(A) == pytest.approx(FacilityLocation(dense).evaluate(A))


def test_stochastic_greedy_is_seeded_distinct_and_close_to_lazy():
    emb, _ = blobs(random_centres(10, seed=4), [80] * 10, spread=0.5, seed=4)
    objective = FacilityLocation(cosine_kernel(emb, k=16))
    k = 240
    lazy_value = sum(greedy_maximize(objective, k)[1])
    order, gains = greedy_maximize(objective, k, method="stochastic", seed=1)
    assert len(set(order)) == k
    assert objective.evaluate(order) == pytest.approx(sum(gains))
    assert lazy_value >= sum(gains) >= 0.95 * lazy_value
    assert greedy_maximize(objective, k, method="stochastic", seed=1)[0] == order
    assert greedy_maximize(objective, k, method="stochastic", seed=2)[0] != order


def test_facility_location_takes_one_of_each_duplicate_group_before_any_second_copy():
    groups, copies, singletons = 6, 4, 6
    emb, labels = blobs(random_centres(groups + singletons, seed=5), [copies] * groups + [1] * singletons,
                        spread=0.05, seed=5)
    for kernel in [cosine_kernel(emb), cosine_kernel(emb, k=copies + 2)]:
        order, _ = greedy_maximize(FacilityLocation(kernel), groups + singletons)
        assert sorted(labels[order].tolist()) == list(range(groups + singletons))


def test_flmi_with_a_query_from_one_cluster_picks_that_cluster_first():
    # Blobs 0-2 are big unrelated clusters; blobs 3-6 are the four parts of one cluster, which the query
    # samples once each.
    others = random_centres(3, seed=6)
    centre = random_centres(1, seed=7)
    parts = unit(centre + 0.7 * random_centres(4, seed=8))
    emb, labels = blobs(torch.cat([others, parts]), [12, 12, 12, 4, 4, 4, 4], spread=0.3, seed=1)
    query, _ = blobs(parts, [1, 1, 1, 1], spread=0.3, seed=2)
    kernel = cosine_kernel(emb)
    order, gains = greedy_maximize(FLMutualInformation(kernel, cosine_kernel(emb, query)), 8)
    assert sorted(labels[order[:4]].tolist()) == [3, 4, 5, 6]
    assert max(gains[4:]) < 0.25 * gains[3]  # the query is covered: little left to gain anywhere
    # plain facility location, for contrast, goes first for the big clusters
    fl_order, _ = greedy_maximize(FacilityLocation(kernel), 3)
    assert sorted(labels[fl_order].tolist())[:2] == [0, 1]


def test_flcg_prefers_the_clusters_the_existing_set_lacks():
    centres = random_centres(3, seed=9)
    emb, labels = blobs(centres, [30, 10, 10], spread=0.4, seed=3)
    existing, _ = blobs(centres[:1], [5], spread=0.4, seed=4)
    kernel = cosine_kernel(emb)
    fl_order, _ = greedy_maximize(FacilityLocation(kernel), 1)
    assert labels[fl_order].tolist() == [0]  # without the existing set, the big cluster matters most
    order, _ = greedy_maximize(FLConditionalGain(kernel, cosine_kernel(emb, existing)), 2)
    assert sorted(labels[order].tolist()) == [1, 2]


def test_flcg_without_an_existing_set_is_facility_location():
    S, _, _ = random_kernels(30, 9)
    S = torch.tensor(S)
    assert greedy_maximize(FLConditionalGain(S, S[:, :0]), 10) == greedy_maximize(FacilityLocation(S), 10)


def test_cosine_kernel_is_shifted_cosine_in_chunks_and_its_knn_form_keeps_each_rows_top_k():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(23, 8, generator=g), torch.randn(11, 8, generator=g)
    expected = (torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1) + 1) / 2
    assert torch.allclose(cosine_kernel(a, b, chunk_size=5), expected, atol=1e-6)
    sparse = cosine_kernel(a, b, k=3, chunk_size=4)
    assert sparse.shape == (23, 11)
    # A chunk of 4 rows and the whole 23 go through different BLAS kernels, whose sums differ in the last bit:
    # the same neighbours must be kept, with values equal to float rounding.
    whole = knn_sparsify(cosine_kernel(a, b), 3).to_dense()
    assert torch.equal(sparse.to_dense() > 0, whole > 0)
    assert torch.allclose(sparse.to_dense(), whole, atol=1e-6)
    dense = sparse.to_dense()
    assert ((dense > 0).sum(1) == 3).all()
    assert torch.allclose(dense.max(1).values, expected.max(1).values, atol=1e-6)
    assert cosine_kernel(a).diagonal() == pytest.approx(torch.ones(23), abs=1e-6)


def test_bad_inputs_are_refused():
    S = torch.rand(5, 5)
    with pytest.raises(ValueError, match="non-negative"):
        FacilityLocation(S - 0.5)
    with pytest.raises(ValueError, match="one row per ground element"):
        FLMutualInformation(S, torch.rand(4, 2))
    with pytest.raises(ValueError, match="k must be"):
        greedy_maximize(FacilityLocation(S), 6)
    with pytest.raises(ValueError, match="unknown greedy method"):
        greedy_maximize(FacilityLocation(S), 2, method="greedy")
