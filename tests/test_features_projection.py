import math

import pytest
import torch

from slimtune.features.projection import RademacherProjector, SparseJLProjector, jl_epsilon, make_projector

PROJECTORS = [
    lambda dim, seed: RademacherProjector(dim, seed, block_elements=1 << 18),
    lambda dim, seed: SparseJLProjector(dim, seed, nnz=1, block_size=4096),
    lambda dim, seed: SparseJLProjector(dim, seed, nnz=4, block_size=4096),
]
IDS = ["rademacher", "countsketch", "sparse-jl-4"]


def unit_vectors(n=24, dim=12_000, seed=0):
    """Unit vectors with a spread of cosines: a few shared directions plus noise, like gradients of tasks."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=g)
    x = centres[torch.arange(n) % 3] + 1.5 * torch.randn(n, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("build", PROJECTORS, ids=IDS)
def test_projected_inner_products_stay_within_the_johnson_lindenstrauss_bound(build):
    x = unit_vectors()
    exact = x @ x.T
    assert exact.min() < 0.2 and (exact - torch.eye(len(x))).max() > 0.25  # the pairs are not all alike
    dim = 2048
    projected = build(dim, 0).project(x)
    error = (projected @ projected.T - exact).abs().max().item()
    assert error <= jl_epsilon(dim, len(x))
    # and the typical error is the one the variance formula predicts, not merely under a loose bound
    assert (projected @ projected.T - exact).std().item() < 2.5 * math.sqrt(2 / dim)


@pytest.mark.parametrize("build", PROJECTORS, ids=IDS)
def test_projecting_piece_by_piece_equals_projecting_the_whole_vector(build):
    x = unit_vectors(n=3, dim=10_000)
    projector = build(256, 7)
    whole = projector.project(x)
    out = None
    for lo, hi in [(0, 1), (1, 5000), (5000, 5003), (5003, 10_000)]:  # cuts inside and across blocks
        out = projector.project(x[:, lo:hi], lo, out)
    assert torch.allclose(out, whole, atol=1e-5)
    backwards = None  # the order extraction meets them in: the backward pass goes from the top layer down
    for lo, hi in [(5003, 10_000), (5000, 5003), (1, 5000), (0, 1)]:
        backwards = projector.project(x[:, lo:hi], lo, backwards)
    assert torch.allclose(backwards, whole, atol=1e-5)
    assert torch.equal(build(256, 7).project(x), whole)  # regenerated from the seed, not remembered
    assert not torch.allclose(build(256, 8).project(x), whole)


def test_jl_epsilon_shrinks_with_the_dimension_and_grows_with_the_number_of_vectors():
    assert jl_epsilon(8192, 1000) < jl_epsilon(2048, 1000) < jl_epsilon(2048, 10**6) < 1
    eps = jl_epsilon(2048, 100)
    assert 4 * math.log(100) / (eps**2 / 2 - eps**3 / 3) == pytest.approx(2048, rel=1e-6)


def test_projectors_are_built_by_name_and_unknown_names_are_refused():
    assert isinstance(make_projector("sparse", 64), SparseJLProjector)
    assert isinstance(make_projector("rademacher", 64), RademacherProjector)
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("gaussian")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_sparse_projector_gives_the_same_features_on_the_gpu():
    x = unit_vectors(n=4, dim=5000)
    projector = SparseJLProjector(512, 3, nnz=2, block_size=1024)
    assert torch.allclose(projector.project(x.cuda()).cpu(), projector.project(x), atol=1e-5)
    dense = RademacherProjector(512, 3)
    assert dense.identity("cuda")["generator"] == "cuda" and dense.identity("cpu")["generator"] == "cpu"
