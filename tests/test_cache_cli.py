"""``slimtune cache ls | verify | clear`` on a temporary SLIMTUNE_CACHE."""

import json

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from slimtune import cachecli, utils
from slimtune.cli import app
from slimtune.features.store import FeatureStore

runner = CliRunner()


def block(lo, hi):
    return {"x": np.arange(lo * 4, hi * 4, dtype=np.float32).reshape(hi - lo, 4)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache with a model, two feature stores (LESS, DELIFT) and a LESS warm-up run."""
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(cachecli, "console", Console(width=300, soft_wrap=True))  # one table row per line
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / "config.json").write_text("{}")
    (tmp_path / "tiny-llama" / "model.safetensors").write_bytes(b"\0" * 3000)
    less = FeatureStore.keyed({"kind": "less-adam", "rows": "abc"}, tmp_path / "features")
    less.fill(("x",), 10, 4, block)
    delift = FeatureStore.keyed({"kind": "delift-kernel", "targets": "abc"}, tmp_path / "features")
    delift.fill(("x",), 6, 3, block)
    run = tmp_path / "less-warmup" / "abc-123"
    run.mkdir(parents=True)
    (run / "slimtune_train.json").write_text("{}")
    return tmp_path, less, delift


def invoke(*args, input=None):
    return runner.invoke(app, ["cache", *args], input=input)


def test_ls_lists_models_feature_stores_by_kind_and_warmups_with_sizes(cache):
    _, less, delift = cache
    done = invoke("ls")
    assert done.exit_code == 0, done.output
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in done.output.splitlines()]
    lines = {row[3]: row for row in cells if row and row[0] in ("models", "less-adam", "delift-kernel",
                                                                "less-warmup")}
    assert set(lines) == {"tiny-llama", f"features/{less.path.name}", f"features/{delift.path.name}",
                          "less-warmup/abc-123"}
    assert lines["tiny-llama"][1] == "2.9 KiB" and lines[f"features/{less.path.name}"][2] == "x: 3 shards"
    assert lines[f"features/{delift.path.name}"][0] == "delift-kernel"
    assert lines["less-warmup/abc-123"][2] == "complete" and "4 item(s)" in done.output


def test_verify_names_bad_shards_and_fix_removes_them_so_the_next_fill_recomputes_them(cache, monkeypatch):
    _, less, delift = cache
    assert invoke("verify").exit_code == 0
    flipped, cut = less.shards("x")[1].path, delift.shards("x")[0].path
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 4
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-4])
    monkeypatch.setattr(utils, "_verified", {})  # a new process: nothing verified yet

    done = invoke("verify")
    assert done.exit_code == 1
    assert f"{flipped}: checksum mismatch" in done.output and str(cut) in done.output
    assert "5 shard(s) checked, 2 bad" in done.output

    fixed = invoke("verify", "--fix")
    assert fixed.exit_code == 0 and "removed 2 bad shard(s)" in fixed.output
    assert not flipped.exists() and invoke("verify").exit_code == 0
    recomputed = []
    for store, rows in ((less, 10), (delift, 6)):
        size = 4 if store is less else 3
        assert store.fill(("x",), rows, size, lambda lo, hi: recomputed.append(lo) or block(lo, hi))["computed"] == 1
        assert np.array_equal(np.asarray(store.open("x", rows)), block(0, rows)["x"])
    assert recomputed == [4, 0]


def test_verify_counts_shards_from_before_checksums_as_checked_by_size_only(cache):
    _, less, _ = cache
    manifest = less.shards("x")[0].manifest
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in old.items() if k not in ("bytes", "crc32")}))
    done = invoke("verify")
    assert done.exit_code == 0 and "1 written before checksums" in done.output


def test_clear_removes_one_kind_or_everything_and_asks_first(cache):
    root, less, delift = cache
    refused = invoke("clear", input="n\n")
    assert refused.exit_code == 1 and "nothing removed" in refused.output and less.path.exists()

    assert invoke("clear", "--kind", "delift-kernel", "--yes").exit_code == 0
    assert not delift.path.exists() and less.path.exists() and (root / "tiny-llama").exists()
    assert invoke("clear", "--kind", "features", "--yes").exit_code == 0
    assert not less.path.exists() and (root / "less-warmup" / "abc-123").exists()

    unknown = invoke("clear", "--kind", "gradients", "--yes")
    assert unknown.exit_code == 2 and "less-warmup" in unknown.output

    everything = invoke("clear", input="y\n")
    assert everything.exit_code == 0 and "removed 2 item(s)" in everything.output
    assert not (root / "tiny-llama").exists() and not (root / "less-warmup" / "abc-123").exists()
