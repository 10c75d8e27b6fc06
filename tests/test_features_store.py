import numpy as np
import pytest
import torch

from slimtune.features.store import FeatureStore, ShardedArray, chunked_matmul, chunked_matmul_topk


def rows(lo, hi, width=6):
    """Deterministic rows that tell where they came from."""
    return {"x": np.arange(lo * width, hi * width, dtype=np.float32).reshape(hi - lo, width) / 100,
            "n": np.arange(lo, hi, dtype=np.int64)}


class Killed(RuntimeError):
    pass


def killed_after(shards):
    calls = []

    def compute(lo, hi):
        if len(calls) == shards:
            raise Killed
        calls.append((lo, hi))
        return rows(lo, hi)

    return compute, calls


def test_a_killed_fill_resumes_at_the_first_missing_shard_and_equals_an_uninterrupted_one(tmp_path):
    compute, calls = killed_after(2)
    store = FeatureStore(tmp_path / "resumed")
    with pytest.raises(Killed):
        store.fill(("x", "n"), 23, 5, compute)
    assert calls == [(0, 5), (5, 10)]

    seen = []
    resume = FeatureStore(tmp_path / "resumed")
    assert resume.fill(("x", "n"), 23, 5, lambda lo, hi: seen.append(lo) or rows(lo, hi)) == {
        "computed": 3, "reused": 2}
    assert seen == [10, 15, 20]
    again = resume.fill(("x", "n"), 23, 5, lambda lo, hi: pytest.fail("recomputed"))
    assert again == {"computed": 0, "reused": 5}

    whole = FeatureStore(tmp_path / "whole")
    whole.fill(("x", "n"), 23, 5, rows)
    for name in ("x", "n"):
        assert np.array_equal(np.asarray(store.open(name, 23)), np.asarray(whole.open(name, 23)))
    assert np.array_equal(np.asarray(store.open("x")), rows(0, 23)["x"])


def test_a_shard_without_its_manifest_does_not_exist(tmp_path):
    store = FeatureStore(tmp_path)
    store.write("x", 0, 4, rows(0, 4)["x"])
    store.write("x", 4, 8, rows(4, 8)["x"])
    (tmp_path / "x" / f"{4:012d}-{8:012d}.json").unlink()  # killed between the data file and its manifest
    assert store.has("x", 0, 4) and not store.has("x", 4, 8)
    with pytest.raises(ValueError, match="holds 4 rows, expected 8"):
        store.open("x", 8)
    gap = FeatureStore(tmp_path / "gap")
    gap.write("x", 4, 8, rows(4, 8)["x"])
    with pytest.raises(ValueError, match=r"rows 0\.\.4 are missing"):
        gap.open("x")


def test_keyed_stores_share_a_directory_exactly_when_their_keys_are_equal(tmp_path):
    key = {"kind": "less-adam", "pool": "abc", "model": "tiny", "projector": {"dim": 8, "seed": 0}}
    a = FeatureStore.keyed(key, tmp_path)
    b = FeatureStore.keyed(dict(reversed(list(key.items()))), tmp_path)
    c = FeatureStore.keyed({**key, "projector": {"dim": 8, "seed": 1}}, tmp_path)
    assert a.path == b.path != c.path
    assert a.path.name.startswith("less-adam-") and a.key == key


def test_the_lazy_view_indexes_across_shards_like_the_concatenated_array(tmp_path):
    store = FeatureStore(tmp_path)
    for lo, hi in [(0, 3), (3, 4), (4, 11)]:
        store.write("x", lo, hi, rows(lo, hi)["x"])
    view, full = store.open("x"), rows(0, 11)["x"]
    assert isinstance(view, ShardedArray) and view.shape == full.shape and len(view) == 11
    mask = np.array([True, False] * 5 + [True])
    for index in [slice(2, 9), slice(None), slice(10, 20), 5, -1, [9, 0, 3, 3], mask]:
        assert np.array_equal(view[index], full[index])
    assert np.array_equal(np.concatenate([chunk for _, chunk in view.chunks(4)]), full)


def test_chunked_similarity_and_top_k_equal_the_in_memory_ones(tmp_path):
    g = np.random.default_rng(0)
    features = g.standard_normal((53, 16)).astype(np.float16)
    queries = g.standard_normal((5, 16)).astype(np.float32)
    store = FeatureStore(tmp_path)
    store.fill(("f",), 53, 7, lambda lo, hi: {"f": features[lo:hi]})
    view = store.open("f")
    exact = torch.from_numpy(features.astype(np.float32)) @ torch.from_numpy(queries).T

    assert torch.allclose(chunked_matmul(view, queries, chunk_rows=4), exact, atol=1e-5)
    mean = chunked_matmul(view, queries, chunk_rows=10, reduce=lambda block: block.mean(1))
    assert torch.allclose(mean, exact.mean(1), atol=1e-5)

    values, index = chunked_matmul_topk(view, queries, 6, chunk_rows=4)
    expected = torch.topk(exact.T, 6, dim=1)
    assert torch.equal(index, expected.indices) and torch.allclose(values, expected.values, atol=1e-5)
