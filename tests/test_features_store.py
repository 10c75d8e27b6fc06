import copy
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from slimtune import utils
from slimtune.features.store import (
    CorruptShardError,
    FeatureStore,
    ShardedArray,
    chunked_matmul,
    chunked_matmul_topk,
)


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


@pytest.fixture
def fresh_process(monkeypatch):
    """A rerun is a new process: forget which checksums this one has verified."""
    def forget():
        monkeypatch.setattr(utils, "_verified", {})
    return forget


def shard_file(store, name, lo, hi):
    return store.path / name / f"{lo:012d}-{hi:012d}.npy"


def test_bad_shards_are_named_discarded_and_recomputed_so_a_rerun_equals_an_uninterrupted_run(
        tmp_path, fresh_process, caplog):
    whole = FeatureStore(tmp_path / "whole")
    whole.fill(("x", "n"), 23, 5, rows)
    store = FeatureStore(tmp_path / "hurt")
    store.fill(("x", "n"), 23, 5, rows)
    flipped, cut, emptied = shard_file(store, "x", 0, 5), shard_file(store, "n", 10, 15), shard_file(store, "x", 15, 20)
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0x10  # one bit of one value, same size: only the checksum sees it
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-8])
    emptied.write_bytes(b"")
    fresh_process()

    seen = []
    rerun = FeatureStore(tmp_path / "hurt")
    with caplog.at_level("WARNING", logger="slimtune.store"):
        counts = rerun.fill(("x", "n"), 23, 5, lambda lo, hi: seen.append(lo) or rows(lo, hi))
    assert counts == {"computed": 3, "reused": 2} and sorted(seen) == [0, 10, 15]
    assert rerun.discarded == [flipped, cut, emptied]
    warned = caplog.text
    assert all(str(path) in warned for path in (flipped, cut, emptied))
    assert "checksum mismatch" in warned and "0 bytes" in warned
    for name in ("x", "n"):
        assert np.array_equal(np.asarray(rerun.open(name, 23)), np.asarray(whole.open(name, 23)))


@pytest.mark.parametrize("damage, found", [
    (lambda data: b"", "empty file (0 bytes)"),
    (lambda data: data[:-8], "bytes, the manifest says"),
    (lambda data: b"\x00" * len(data), "unreadable .npy header"),
])
def test_reading_a_damaged_shard_names_the_file_instead_of_failing_inside_numpy(tmp_path, damage, found):
    store = FeatureStore(tmp_path)
    store.fill(("x",), 12, 4, rows)
    bad = shard_file(store, "x", 4, 8)
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(CorruptShardError, match=re.escape(found)) as caught:
        store.open("x", 12)
    assert caught.value.problems.keys() == {bad} and str(bad) in str(caught.value)
    assert "mmap length" not in str(caught.value)


def test_a_changed_byte_is_caught_when_the_shard_is_first_mapped(tmp_path, fresh_process):
    store = FeatureStore(tmp_path)
    store.fill(("x",), 12, 4, rows)
    bad = shard_file(store, "x", 8, 12)
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    fresh_process()
    view = store.open("x", 12)  # sizes and headers are fine
    assert np.array_equal(view[:8], rows(0, 8)["x"])
    with pytest.raises(CorruptShardError, match="checksum mismatch") as caught:
        view[9]
    assert list(caught.value.problems) == [bad]


def test_stores_written_before_checksums_are_read_and_still_size_checked(tmp_path):
    store = FeatureStore(tmp_path)
    store.fill(("x",), 12, 4, rows)
    for manifest in (tmp_path / "x").glob("*.json"):
        old = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({k: v for k, v in old.items() if k not in ("bytes", "crc32")}))
    assert np.array_equal(np.asarray(store.open("x", 12)), rows(0, 12)["x"])
    assert store.fill(("x",), 12, 4, lambda lo, hi: pytest.fail("recomputed")) == {"computed": 0, "reused": 3}
    cut = shard_file(store, "x", 0, 4)
    cut.write_bytes(cut.read_bytes()[:-4])
    with pytest.raises(CorruptShardError, match="short file"):
        store.open("x", 12)


def test_a_claim_held_by_a_live_process_times_out_naming_the_rank_and_shard(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    claim = shard_file(store, "x", 0, 5).with_suffix(".claim")
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"rank": 1, "pid": os.getpid(), "host": socket.gethostname(), "time": 0}))
    monkeypatch.setenv("SLIMTUNE_STORE_TIMEOUT", "0.5")
    with pytest.raises(TimeoutError, match=r"rank 0 waited 0 s for shard x\[0:5\] .*claimed by rank 1") as caught:
        store.fill(("x",), 10, 5, rows)
    assert str(claim) in str(caught.value)
    assert store.has("x", 5, 10) and not store.has("x", 0, 5)  # the free shard was done while waiting


def test_claims_of_dead_or_timed_out_processes_are_taken_over(tmp_path):
    store = FeatureStore(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "x").mkdir()
    gone = shard_file(store, "x", 0, 5).with_suffix(".claim")
    gone.write_text(json.dumps({"rank": 0, "pid": int(dead.stdout), "host": socket.gethostname(), "time": 0}))
    elsewhere = shard_file(store, "x", 5, 10).with_suffix(".claim")
    elsewhere.write_text(json.dumps({"rank": 2, "pid": 1, "host": "another-node", "time": 0}))
    os.utime(elsewhere, (time.time() - 120, time.time() - 120))
    unwritten = shard_file(store, "x", 10, 15).with_suffix(".claim")  # its writer died right after O_EXCL
    unwritten.write_text("")
    os.utime(unwritten, (time.time() - 20, time.time() - 20))
    assert store.fill(("x",), 15, 5, rows, timeout=60) == {"computed": 3, "reused": 0}
    assert not gone.exists() and not elsewhere.exists() and not unwritten.exists()
    assert np.array_equal(np.asarray(store.open("x", 15)), rows(0, 15)["x"])


def test_rank_zero_logs_rows_per_second_and_eta(tmp_path, caplog):
    with caplog.at_level("INFO", logger="slimtune.store"):
        FeatureStore(tmp_path).fill(("x",), 23, 5, rows)
    reports = [r.fill_progress for r in caplog.records if hasattr(r, "fill_progress")]
    assert reports and reports[-1].rows_done == reports[-1].rows_total == 23
    assert reports[-1].rows_per_second > 0 and reports[-1].seconds_left == 0
    assert "rows/s" in caplog.text


OPEN_UNDER_A_LOW_FILE_LIMIT = """
import resource, sys
import numpy as np
from slimtune.features.store import FeatureStore, chunked_matmul
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
view = FeatureStore(sys.argv[1]).open("x", int(sys.argv[2]))
sums = chunked_matmul(view, np.ones((1, 3), np.float32))[:, 0].numpy()
print(np.array_equal(sums, 3 * np.arange(len(view), dtype=np.float32)), view[[0, 5, 9999]][:, 0].tolist())
"""


def test_a_store_of_5000_shards_opens_and_reads_under_256_open_files(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not under test; 10,000 fsyncs are slow
    store = FeatureStore(tmp_path)
    for lo in range(0, 10_000, 2):
        store.write("x", lo, lo + 2, np.arange(lo, lo + 2, dtype=np.float32)[:, None].repeat(3, 1))
    done = subprocess.run([sys.executable, "-c", OPEN_UNDER_A_LOW_FILE_LIMIT, str(tmp_path), "10000"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split(maxsplit=1) == ["True", "[0.0, 5.0, 9999.0]\n"]


def damage_each_way(store, name):
    """Flip a byte in the first shard of ``name`` (same size), cut the second short, empty the third."""
    first, second, third = (shard.path for shard in store.shards(name)[:3])
    data = bytearray(first.read_bytes())
    data[-2] ^= 0x40
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:-2])
    third.write_bytes(b"")
    return [first, second, third]


def test_damaged_less_features_and_delift_kernel_blocks_are_recomputed_to_the_uninterrupted_result(
        tiny, shared_data, tmp_path, fresh_process, caplog):
    """Both kinds of store through their real writers: a rerun after the damage equals the first run."""
    from helpers import gsm8k_examples

    from slimtune.data.tokenize import TokenizedDataset
    from slimtune.features.gradients import FEATURES, NORMS, extract_gradient_features
    from slimtune.features.projection import SparseJLProjector
    from slimtune.features.utility import InContextUtility
    from slimtune.models import LoraSettings, apply_lora

    model, tokenizer = tiny
    pool = gsm8k_examples(shared_data, 6)
    kernel_settings = dict(max_text_tokens=24, block_pairs=9)  # 36 pairs in 4 blocks
    first = InContextUtility(model, tokenizer, cache=tmp_path / "delift", **kernel_settings).kernel(pool)
    [kernel_store] = (store for store in map(FeatureStore, (tmp_path / "delift").iterdir()) if store.shards("with"))

    torch.manual_seed(0)
    lora = apply_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8, dropout=0.0))
    data = TokenizedDataset(pool, tokenizer, 256)
    extract = dict(projector=SparseJLProjector(64, seed=0), batch_size=2, shard_rows=1,
                   pad_token_id=tokenizer.pad_token_id)
    feature_store = FeatureStore(tmp_path / "less")
    extract_gradient_features(lora, data, feature_store, **extract)
    features = {name: np.asarray(feature_store.open(name, len(data))) for name in (FEATURES, NORMS)}

    bad = damage_each_way(kernel_store, "with") + damage_each_way(feature_store, FEATURES)
    fresh_process()
    with caplog.at_level("WARNING", logger="slimtune.store"):
        again = InContextUtility(model, tokenizer, cache=tmp_path / "delift", **kernel_settings).kernel(pool)
        redone = extract_gradient_features(lora, data, FeatureStore(tmp_path / "less"), **extract)
    assert again.stats["blocks_from_cache"] == first.stats["blocks"] - 3 and redone.shards["computed"] == 3
    assert np.array_equal(again.values, first.values)
    for name, stored in features.items():
        assert np.array_equal(np.asarray(FeatureStore(tmp_path / "less").open(name, len(data))), stored)
    assert all(str(path) in caplog.text for path in bad)
