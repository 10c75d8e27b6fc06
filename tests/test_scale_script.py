"""The pieces of benchmarks/scale.py that its numbers rest on: the synthetic pool and the head-light model."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCHMARKS))  # the script imports its neighbour readme.py
_SPEC = importlib.util.spec_from_file_location("scale", _BENCHMARKS / "scale.py")
scale = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(scale)


def test_the_synthetic_pool_is_the_same_stream_every_time_with_unique_ids_and_short_turns(shared_data):
    first = list(scale.synthetic_records(500, data=shared_data))
    assert first == list(scale.synthetic_records(500, data=shared_data))
    # a smaller pool is the head of a larger one, so the sizes measure the same rows growing
    assert first[:200] == list(scale.synthetic_records(200, data=shared_data))
    assert len({r["id"] for r in first}) == 500
    turns = [m["content"] for r in first for m in r["messages"]]
    assert all(0 < len(t) <= scale.CAP_CHARS for t in turns)
    assert len(set(turns)) > 300  # recombined, not one row repeated


def test_pool_file_holds_the_stream_and_leaves_no_partial_file(tmp_path, shared_data):
    path = scale.pool_file(tmp_path, 50, data=shared_data)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == list(scale.synthetic_records(50, data=shared_data))
    assert sorted(p.name for p in path.parent.iterdir()) == ["pool-50.jsonl"]  # no partial file left


def test_the_head_light_model_loads_from_its_folder_and_its_tokenizer_round_trips(tmp_path, shared_data):
    from slimtune.data.example import make_example
    from slimtune.data.tokenize import TokenizedDataset
    from slimtune.models import load_model

    folder = scale.headlight_model(tmp_path, data=shared_data)
    model, tokenizer = load_model(str(folder), device="cpu")
    assert len(tokenizer) == model.config.vocab_size <= scale.VOCAB
    text = "Natalia sold clips to 48 of her friends. Ça coûte 3,50 €? 日本語"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # SmolLM2's chat template: the response is learnt, the prompt is not
    example = make_example([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}])
    row = TokenizedDataset([example], tokenizer, 64, cache_dir=tmp_path / "pools")[0]
    learnt = [i for i, y in zip(row["input_ids"], row["labels"]) if y != -100]
    assert tokenizer.decode(learnt).startswith("5")
    assert "<|im_start|>user\nWhat is 2 + 3?" in tokenizer.decode(row["input_ids"])
    assert scale.headlight_model(tmp_path, data=shared_data) == folder  # built once, then reused


def test_slope_is_one_for_linear_time_and_two_for_quadratic():
    small = {"rows": 10_000, "seconds": 3.0}
    assert scale.slope(small, {"rows": 1_000_000, "seconds": 300.0}) == pytest.approx(1.0)
    assert scale.slope(small, {"rows": 100_000, "seconds": 300.0}) == pytest.approx(2.0)


def test_a_resumed_run_measures_again_only_the_stages_whose_settings_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "RESULTS", tmp_path / "scale.json")
    measured = {scale.key(stage, 10_000, 1): {"stage": stage, "rows": 10_000, "processes": 1,
                                               "settings": scale.settings_digest(stage)} for stage in scale.STAGES}
    scale.save_results({"measurements": measured})
    monkeypatch.setitem(scale.SELECTORS, "delift", ("delift", {"sparse_k": 8}, 0.1))
    kept = scale.load_results(fresh=False)["measurements"]
    assert sorted(kept) == sorted(scale.key(stage, 10_000, 1) for stage in scale.STAGES if stage != "delift")
    assert scale.load_results(fresh=True)["measurements"] == {}
