"""Bad input and arguments are named before any work; rows a method cannot score never pass as a selection;
a selection's files are committed together."""

import copy
import gzip
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.data import load_examples
from slimtune.data.example import make_example
from slimtune.data.validate import check_examples
from slimtune.select import Selection, Selector, UnscoredRowsError
from slimtune.select.heuristics import LossSelector

runner = CliRunner()

ROWS = [{"instruction": f"Say {w}", "input": "", "output": w * (i + 1)} for i, w in enumerate("abcdefgh")]
ASSISTANT_FIRST = {"messages": [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]}
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def chat(prompt, response, **metadata):
    return make_example([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                        **metadata)


# -- the checks themselves ----------------------------------------------------------------------------------
def test_a_conversation_opening_with_the_assistant_is_named_by_file_line_and_field(write_jsonl, tokenizer):
    path = write_jsonl([GOOD_CHAT, ASSISTANT_FIRST])
    examples = list(load_examples(path).examples)
    for checked in (check_examples(examples), check_examples(examples, tokenizer=tokenizer, max_length=64)):
        assert [ex.id for ex in checked.examples] == [examples[0].id]
        assert len(checked.problems) == 1
        assert str(checked.problems[0]).startswith(f"{path}:2: field 'messages': the conversation starts with an "
                                                   "assistant turn")
        assert checked.skipped() == [{"where": f"{path}:2", "problem": str(checked.problems[0])}]


def test_a_template_that_refuses_a_conversation_is_reported_not_raised(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                            "{% endif %}" + tokenizer.chat_template)
    with_system = make_example([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}], file="d.jsonl", line=7)
    checked = check_examples([chat("Hi", "Hello"), with_system], tokenizer=strict, max_length=64)
    assert len(checked.examples) == 1
    assert "d.jsonl:7: field 'messages': the chat template cannot render" in str(checked.problems[0])
    assert "no system role" in str(checked.problems[0])


def test_an_empty_conversation_and_one_without_a_response_are_problems():
    checked = check_examples([make_example([], id="empty"),
                              make_example([{"role": "user", "content": "Hi"}], id="no-reply")])
    assert [str(p) for p in checked.problems] == [
        "id empty: field 'messages': empty conversation: no turns",
        "id no-reply: field 'messages': no assistant turn: nothing to learn"]


def test_a_row_whose_prompt_fills_the_window_gets_a_finite_loss_score(tiny):
    pool = [chat("What is 2+2?", "4"), chat(" ".join(["context"] * 400) + " So, what is 3+3?", "6"),
            chat("Name a colour.", "Blue")]
    selection = LossSelector(model="tiny", max_length=80, device="cpu").select(pool, 3)
    assert np.isfinite(selection.scores).all() and not selection.cost.unscored
    assert selection.cost.details["encode"].startswith("3 examples, 1 truncated from the left")


def test_less_scores_a_row_whose_prompt_fills_the_window(tmp_path):
    from slimtune.models import LoraSettings
    from slimtune.select.less import LessSelector
    from slimtune.train import TrainSettings

    pool = [chat("What is 2+2?", "4"), chat(" ".join(["context"] * 400) + " So, what is 3+3?", "6"),
            chat("Name a colour.", "Blue")]
    fresh_lora = TrainSettings(lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    less = LessSelector(model="tiny", warmup=False, training=fresh_lora, max_length=32, proj_dim=256,
                        grad_batch_size=2, cache_dir=str(tmp_path), device="cpu")
    selection = less.select(pool, 3, target=[chat("What is 5+5?", "10")])
    assert np.isfinite(selection.scores).all() and not selection.cost.unscored


# -- rows a method cannot score -------------------------------------------------------------------------------
@dataclass
class _HalfBlind(Selector):
    """Scores rows by position but cannot score the ones it is told are blind."""

    name: ClassVar[str] = "half-blind"
    blind: tuple[int, ...] = ()
    explain: bool = False

    def score(self, pool, *, target=None, existing=None, cost):
        scores = np.arange(len(pool), 0, -1, dtype=np.float64)
        for i in self.blind:
            scores[i] = np.nan
            if self.explain:
                cost.unscored[i] = "the prompt is in a language the model lacks"
        return scores


def test_unscored_rows_that_would_be_kept_stop_the_selection_with_count_and_cause():
    pool = [chat(f"q{i}", f"a{i}", file="pool.jsonl", line=i + 1) for i in range(10)]
    with pytest.raises(UnscoredRowsError) as err:
        _HalfBlind(blind=(7, 8, 9), explain=True).select(pool, 8)
    message = str(err.value)
    assert "3 of 10 rows could not be scored" in message and "1 of them would be among the 8 kept" in message
    assert "pool.jsonl:8" in message and "the prompt is in a language the model lacks (3 rows)" in message
    assert "--allow-unscored" in message


def test_unscored_rows_outside_the_kept_set_or_allowed_are_recorded_in_the_manifest(tmp_path):
    pool = [chat(f"q{i}", f"a{i}") for i in range(10)]
    selection = _HalfBlind(blind=(9,)).select(pool, 5)
    assert selection.kept == [0, 1, 2, 3, 4]
    rows = selection.manifest()["examples"]
    assert selection.manifest()["unscored"] == 1 and rows[9]["unscored"].startswith("the method gave no finite")
    allowed = _HalfBlind(blind=(2,)).select(pool, 10, allow_unscored=True)
    assert allowed.kept[-1] == 2
    allowed.save(tmp_path / "sel", pool)
    assert Selection.load(tmp_path / "sel").cost.unscored == {2: "the method gave no finite score (nan)"}


# -- a selection's files are one unit ------------------------------------------------------------------------
def test_a_reused_out_folder_keeps_no_earlier_subset_and_a_failed_save_leaves_no_manifest(tmp_path, monkeypatch,
                                                                                         write_jsonl):
    csv_pool = tmp_path / "pool.csv"
    csv_pool.write_text("instruction,output\n" + "".join(f"Say {w},{w}\n" for w in "abc"))
    jsonl_pool = write_jsonl(ROWS[:3], "pool.jsonl")
    out = tmp_path / "sel"
    for path in (csv_pool, jsonl_pool):
        pool = list(load_examples(path).examples)
        _HalfBlind().select(pool, 2).save(out, pool)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "subset.jsonl"]
    assert json.loads((out / "manifest.json").read_text())["subset_file"] == "subset.jsonl"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("slimtune.select.base.write_json", crash)
    with pytest.raises(OSError):
        _HalfBlind().select(pool, 1).save(out, pool)
    assert not (out / "manifest.json").exists()  # the half-written selection is not a selection


# -- the command line ----------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path, write_jsonl):
    other = [{"instruction": f"Other {i}", "input": "", "output": str(i)} for i in range(4)]
    paths = {"pool": write_jsonl(ROWS, "pool.jsonl"), "empty": write_jsonl([], "empty.jsonl"),
             "afirst": write_jsonl([GOOD_CHAT, ASSISTANT_FIRST], "afirst.jsonl"),
             "other": write_jsonl(other, "other.jsonl"), "file": tmp_path / "a_file", "dir": tmp_path / "a_dir",
             "cut": tmp_path / "cut.jsonl.gz", "out": tmp_path / "out"}
    paths["file"].write_text("not a folder")
    paths["dir"].mkdir()
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS * 50).encode())
    paths["cut"].write_bytes(whole[: len(whole) // 2])
    pool = list(load_examples(paths["other"]).examples)
    _HalfBlind().select(pool, 2).save(tmp_path / "other_sel", pool)
    paths["other_sel"] = tmp_path / "other_sel"
    return paths


SELECT = ["select", "--data", "{pool}", "--out", "{out}"]
TRAIN = ["train", "--data", "{pool}", "--out", "{out}", "--model", "tiny"]
CASES = {
    "budget abc": ([*SELECT, "--method", "random", "--budget", "abc"], "--budget 'abc'"),
    "budget 0": ([*SELECT, "--method", "random", "--budget", "0"], "--budget '0'"),
    "budget -1": ([*SELECT, "--method", "random", "--budget", "-1"], "--budget '-1'"),
    "budget 1.5": ([*SELECT, "--method", "random", "--budget", "1.5"], "--budget '1.5'"),
    "budget nan": ([*SELECT, "--method", "random", "--budget", "nan"], "--budget 'nan'"),
    "budget inf": ([*SELECT, "--method", "random", "--budget", "inf"], "--budget 'inf'"),
    "unknown method": ([*SELECT, "--method", "bogus", "--budget", "2"], "--method: unknown selection method"),
    "-p wrong type": ([*SELECT, "--method", "random", "--budget", "2", "-p", "seed=abc"],
                      '--param seed="abc": method \'random\' takes int'),
    "-p not an int": ([*SELECT, "--method", "loss", "--budget", "2", "-p", "max_length=1.5"],
                      "--param max_length=1.5"),
    "-p refused value": ([*SELECT, "--method", "length", "--budget", "2", "-p", "unit=5"],
                         "--param: method 'length': unit must be one of"),
    "-p unknown key": ([*SELECT, "--method", "random", "--budget", "2", "-p", "bogus=1"],
                       "has no parameter bogus"),
    "-p unknown nested key": ([*SELECT, "--method", "less", "--budget", "2", "--target", "{pool}", "-p",
                               "training.lora.rr=4"], "--param: method 'less' has no parameter training.lora.rr; "
                               "training.lora takes: alpha, dropout, r, target_modules"),
    "-p nested wrong type": ([*SELECT, "--method", "less", "--budget", "2", "--target", "{pool}", "-p",
                              "training.epochs=many"], "--param training.epochs=\"many\": method 'less' takes "
                              "float for training.epochs"),
    "-p nested key the selector sets": ([*SELECT, "--method", "less", "--budget", "2", "--target", "{pool}",
                                         "-p", "training.seed=3"], "training.seed: the selector sets this"),
    "-p key under a value": ([*SELECT, "--method", "random", "--budget", "2", "-p", "seed=1", "-p", "seed.x=2"],
                             "'seed.x=2': seed is given a value"),
    "target missing": ([*SELECT, "--method", "less", "--budget", "2"], "--target: method 'less'"),
    "target empty": ([*SELECT, "--method", "less", "--budget", "2", "--target", "{empty}"],
                     "--target {empty}: holds no examples"),
    "target ignored": ([*SELECT, "--method", "random", "--budget", "2", "--target", "{pool}"],
                       "--target: method 'random' does not use it"),
    "empty pool": (["select", "--data", "{empty}", "--out", "{out}", "--method", "random", "--budget", "2"],
                   "--data {empty}: holds no examples"),
    "out is a file": ([*SELECT[:3], "--out", "{file}", "--method", "loss", "--model", "tiny", "--budget", "2"],
                      "--out {file}: is a file"),
    "out under a file": ([*SELECT[:3], "--out", "{file}/sel", "--method", "random", "--budget", "2"],
                         "--out {file}/sel"),
    "assistant first": (["select", "--data", "{afirst}", "--out", "{out}", "--method", "loss", "--model", "tiny",
                         "--budget", "1"], "{afirst}:2: field 'messages': the conversation starts with"),
    "truncated gzip": (["select", "--data", "{cut}", "--out", "{out}", "--method", "random", "--budget", "2"],
                       "{cut}"),
    "keep 0": ([*TRAIN, "--online", "uniform", "--keep", "0"], "--keep 0.0"),
    "keep negative": ([*TRAIN, "--online", "uniform", "--keep", "-0.5"], "--keep -0.5"),
    "online unknown key": ([*TRAIN, "--online", "uds", "-p", "bogus=1"],
                           "online method 'uds' has no parameter bogus"),
    "online wrong type": ([*TRAIN, "--online", "uniform", "-p", "seed=x"], "online method 'uniform' takes int"),
    "online no params": ([*TRAIN, "--online", "big-loss", "-p", "seed=1"], "has no parameter seed; it takes: none"),
    "online unknown": ([*TRAIN, "--online", "bogus"], "--online: unknown online method"),
    "train -p without online": ([*TRAIN, "-p", "seed=1"], "--param: train takes parameters for an --online"),
    "train out is a file": ([*TRAIN[:3], "--out", "{file}", "--model", "tiny"], "--out {file}: is a file"),
    "subset of another pool": ([*TRAIN, "--subset", "{other_sel}"], "--subset {other_sel}: 2 of its 2 kept id(s)"),
    "subset missing": ([*TRAIN, "--subset", "{dir}"], "--subset {dir}: no {dir}/manifest.json"),
    "train assistant first": (["train", "--data", "{afirst}", "--out", "{out}", "--model", "tiny"],
                              "{afirst}:2: field 'messages'"),
    "eval needs a model": (["eval", "--data", "{pool}"], "--model / --run: give exactly one"),
    "eval run missing": (["eval", "--data", "{pool}", "--run", "{dir}"], "--run {dir}: no slimtune_train.json"),
    "eval task unknown": (["eval", "--data", "{pool}", "--model", "tiny", "--task", "bogus"], "--task bogus"),
    "eval out is a folder": (["eval", "--data", "{pool}", "--model", "tiny", "--out", "{dir}"],
                             "--out {dir}: is a folder"),
    "eval limit 0": (["eval", "--data", "{pool}", "--model", "tiny", "--limit", "0"], "--limit 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_bad_argument_or_input_exits_2_naming_it_before_any_model_loads(case, files, monkeypatch, tiny):
    from transformers import AutoModelForCausalLM

    args, expected = CASES[case]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments and inputs were checked")

    # weights load through this one door (the tiny fixture has built the test model's files already)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
    result = runner.invoke(app, [a.format(**files) for a in args])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, (result.output, result.exception)
    assert expected.format(**files) in text
    assert "Traceback" not in result.output and text != "Aborted."
    assert not (files["out"] / "manifest.json").exists()


def test_skip_bad_leaves_unusable_rows_out_and_lists_them_in_the_manifest(files):
    result = runner.invoke(app, ["select", "--data", str(files["afirst"]), "--out", str(files["out"]),
                                 "--method", "length", "-p", "unit=chars", "--budget", "1", "--skip-bad"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((files["out"] / "manifest.json").read_text())
    assert manifest["pool_size"] == 1
    assert [s["where"] for s in manifest["skipped"]] == [f"{files['afirst']}:2"]
