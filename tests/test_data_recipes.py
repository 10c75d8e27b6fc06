"""Recipes on the real shared data, their held-out splits and sampling, and the bundled-sample fallback."""

from __future__ import annotations

import json
import logging
import runpy
import sys

import pytest

from slimtune.data import load_examples, load_recipe, run_recipe, write_examples
from slimtune.data import recipes as recipes_module
from slimtune.data.recipes import SAMPLE_DIR, answer_options, final_answer


def _ids(examples):
    return [ex.id for ex in examples]


@pytest.fixture(scope="module")
def p3_all(full_shared_data):
    return run_recipe("p3:all")


def test_gsm8k_splits_and_final_answers(full_shared_data):
    train, test = load_recipe("gsm8k"), load_recipe("gsm8k:test")
    assert (len(train), len(test)) == (7473, 1319)
    first = train[0]
    assert first.messages[0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert first.response.endswith("#### 72")  # the whole worked solution is learnt
    assert (first.task, first.metadata["source"], first.metadata["answer"]) == ("gsm8k", "gsm8k", "72")
    assert train[345].metadata["answer"] == "1080"  # "#### 1,080"
    assert {ex.metadata["answer"] for ex in test} >= {"-3", "18"}
    assert not set(_ids(train)) & set(_ids(test))


def test_final_answer():
    assert final_answer("so 2 + 2 = 4.\n#### 1,234,567") == "1234567"
    assert final_answer("#### -0.5 ") == "-0.5"
    assert final_answer("no marker here") is None


def test_p3_strips_the_end_marker_keys_tasks_by_template_and_holds_out_a_test_split(p3_all):
    examples = p3_all.examples
    # 11,128 rows less 117 exact duplicates and 280 TREC rows whose completion is empty in the release
    assert (p3_all.report.read, len(examples), p3_all.report.skipped) == (11128, 10731, 397)
    assert not any("<|endoftext|>" in ex.response for ex in examples)
    assert len({ex.task for ex in examples}) == 276
    assert examples[0].response == "350,000 tons of supplies"
    assert examples[0].task == "adversarial_qa_dbert_answer_the_following_q"
    test = load_recipe("p3:test")
    assert 0.08 < len(test) / len(examples) < 0.12
    assert set(_ids(test)) <= set(_ids(examples))
    # the train split is the rest: drawing the whole of it never meets a test row
    train = load_recipe("p3", limit=len(examples), seed=0)
    assert len(train) + len(test) == len(examples)
    assert not set(_ids(train)) & set(_ids(test))


def test_p3_options_only_where_the_prompt_lists_the_answer_among_choices(p3_all):
    with_options = [ex for ex in p3_all.examples if "options" in ex.metadata]
    assert all(ex.response in ex.metadata["options"] for ex in with_options)
    by_task = {ex.task: ex for ex in reversed(with_options)}  # the first example of each template
    assert by_task["commonsense_qa_most_suitable_answer"].metadata["options"] == [
        "making love", "feel good", "happyness", "wonderful thing", "cloud judgment"]
    assert len(by_task["sciq_Multiple_Choice"].metadata["options"]) == 4
    # a list of process steps is not a list of choices
    assert not any(ex.task.startswith("wiqa_what_is_the_final_step") for ex in with_options)
    assert len(with_options) == 838


def test_answer_options():
    prompt = "Steps:\n- mix\n- bake\n\nWhich comes next?\n\n- eat\n\n- sleep\n\n- run\n"
    assert answer_options(prompt, "sleep") == ["eat", "sleep", "run"]
    assert answer_options(prompt, "cool down") is None
    assert answer_options("What is 2+2?", "4") is None


def test_p3_templates_option(p3_all):
    both = load_recipe("p3", split="all", templates=["sciq", "dream"])
    assert _ids(both) == [ex.id for ex in p3_all.examples if ex.task.startswith(("sciq", "dream"))]
    assert {ex.task for ex in both if ex.task.startswith("sciq")} == {
        "sciq_Direct_Question", "sciq_Direct_Question_Closed_Book_", "sciq_Multiple_Choice",
        "sciq_Multiple_Choice_Closed_Book_", "sciq_Multiple_Choice_Question_First"}
    with pytest.raises(ValueError, match="no P3 template starts with 'nonsense'"):
        load_recipe("p3:nonsense")


def test_tatoeba_directions_tasks_and_prompts(full_shared_data):
    examples = load_recipe("tatoeba:all")
    tasks = {ex.task for ex in examples}
    languages = ["cmn", "deu", "fra", "ita", "jpn", "nld", "por", "rus", "spa", "tur"]
    assert tasks == {f"{code}-eng" for code in languages} | {f"eng-{code}" for code in languages}
    assert len(examples) == 2 * 10 * 1000
    fra_eng = next(ex for ex in examples if ex.task == "fra-eng")
    assert fra_eng.messages[0]["content"] == ("Translate from French to English: Au commencement, Dieu créa "
                                              "le ciel et la terre.")
    assert fra_eng.response == "In the beginning God created the heaven and the earth."
    assert fra_eng.metadata["reference"] == fra_eng.response
    eng_jpn = next(ex for ex in examples if ex.task == "eng-jpn")
    assert eng_jpn.messages[0]["content"].startswith("Translate from English to Japanese: ")


def test_tatoeba_pair_options(full_shared_data):
    assert {ex.task for ex in load_recipe("tatoeba:fra-eng")} == {"fra-eng"}
    assert {ex.task for ex in load_recipe("tatoeba", pairs="fra")} == {"fra-eng", "eng-fra"}
    assert {ex.task for ex in load_recipe("tatoeba:eng-deu,spa")} == {"eng-deu", "spa-eng", "eng-spa"}
    assert len({ex.task for ex in load_recipe("tatoeba:*-eng")}) == 10
    with pytest.raises(ValueError, match="unknown Tatoeba pair 'xxx-eng'"):
        load_recipe("tatoeba:xxx-eng")
    with pytest.raises(ValueError, match="no English side"):
        load_recipe("tatoeba:fra-deu")


def test_tatoeba_split_keeps_an_english_sentence_on_one_side(full_shared_data):
    train, test = load_recipe("tatoeba"), load_recipe("tatoeba:test")
    english = {split: {ex.metadata["reference"] if ex.task.endswith("-eng") else
                       ex.messages[0]["content"].split(": ", 1)[1] for ex in examples}
               for split, examples in (("train", train), ("test", test))}
    assert not english["train"] & english["test"]
    assert len(train) + len(test) == 20000
    # both directions of a pair fall in the same split
    assert sum(ex.task == "fra-eng" for ex in test) == sum(ex.task == "eng-fra" for ex in test) > 50


def test_taskmaster_dialogues_end_with_an_assistant_turn(full_shared_data):
    result = run_recipe("taskmaster4:all")
    examples = result.examples
    assert len(examples) == 1500
    assert all(ex.messages[-1]["role"] == "assistant" for ex in examples)
    assert all(ex.messages[0]["role"] == "user" for ex in examples)
    assert sum(sum(m["role"] == "assistant" for m in ex.messages) >= 2 for ex in examples) > 1000
    assert result.report.notes == ["dropped the trailing user turns of 39 dialogue(s) so that each ends with "
                                   "an assistant turn"]
    first = examples[0]
    assert first.id == "dlg-9231bd20-2da9-4905-89f4-2e2bd59fd20b"
    assert first.task == "Auto template 18 order a coffee drink specify espresso shots"
    assert len(first.messages) == 4
    train, test = load_recipe("taskmaster4"), load_recipe("taskmaster4:test")
    assert len(train) + len(test) == 1500 and not set(_ids(train)) & set(_ids(test))


def test_sampling_is_seeded_and_a_smaller_limit_draws_a_prefix(full_shared_data):
    draw = _ids(load_recipe("taskmaster4", limit=50, seed=3))
    assert draw == _ids(load_recipe("taskmaster4", limit=50, seed=3))
    assert draw != _ids(load_recipe("taskmaster4", limit=50, seed=4))
    assert _ids(load_recipe("taskmaster4", limit=20, seed=3)) == draw[:20]
    assert len({ex.task for ex in load_recipe("p3", limit=50, seed=3)}) > 30  # spread over templates
    assert len(load_recipe("gsm8k:test", limit=5000)) == 1319
    # load_examples samples recipes too (seed 0 unless given)
    assert _ids(load_examples("gsm8k:test", limit=10).examples) == _ids(load_recipe("gsm8k:test", limit=10))


def test_recipe_specs(shared_data):
    assert run_recipe("tatoeba:fra-eng").report.source == "tatoeba:fra-eng:train"
    assert _ids(load_recipe("gsm8k", split="test", limit=3)) == _ids(load_recipe("gsm8k:test", limit=3))
    with pytest.raises(ValueError, match=r"'all' in 'gsm8k:all' is not a split of gsm8k \(train, test\)$"):
        load_recipe("gsm8k:all")
    with pytest.raises(ValueError, match="gsm8k has no split 'all'; it has train, test"):
        load_recipe("gsm8k", split="all")
    with pytest.raises(ValueError, match="'tatoeba:test:all' names two splits"):
        load_recipe("tatoeba:test:all")
    with pytest.raises(ValueError, match="'gsm8k:test' names split test, but split='train' was passed"):
        load_recipe("gsm8k:test", split="train")
    with pytest.raises(ValueError, match="'validation' in 'taskmaster4:validation' is not a split of "
                       r"taskmaster4 \(train, test, all\)$"):
        load_recipe("taskmaster4:validation")
    with pytest.raises(TypeError, match="recipe gsm8k takes no option pairs"):
        load_recipe("gsm8k", pairs="fra")
    with pytest.raises(ValueError, match="shape, source, task_field, id_field and subset apply to files"):
        load_examples("gsm8k", shape="alpaca")


def test_a_folder_named_like_a_recipe_does_not_hide_it(shared_data, monkeypatch):
    monkeypatch.chdir(shared_data)  # holds the folder gsm8k/, which is not a datasets folder
    assert load_examples("gsm8k").report.source == "gsm8k:train"


def test_recipe_subset_is_written_as_the_original_rows_and_reads_back_the_same(shared_data, tmp_path):
    for name, path in (("gsm8k", "gsm8k/train.jsonl"), ("p3", "p3/p3_sample.jsonl"),
                       ("taskmaster4", "taskmaster4/dialogs.jsonl")):
        subset = load_recipe(name, limit=40, seed=1)
        written = write_examples(subset, tmp_path / name / "subset")
        assert written.name == "subset.jsonl"
        original = set((shared_data / path).read_text(encoding="utf-8").splitlines())
        lines = written.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 40 and set(lines) <= original
        again = load_examples(written, source=name).examples
        assert [(e.id, e.messages, e.task) for e in again] == [(e.id, e.messages, e.task) for e in subset]


def test_shared_data_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_SHARED_DATA", str(SAMPLE_DIR))
    assert len(load_recipe("gsm8k:test")) == 60
    monkeypatch.setenv("SLIMTUNE_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"SLIMTUNE_SHARED_DATA=.*nowhere is not a folder"):
        load_recipe("gsm8k")


def test_without_shared_data_recipes_fall_back_to_the_bundled_sample(monkeypatch, caplog):
    monkeypatch.setattr(recipes_module, "shared_data_dir", lambda: None)
    monkeypatch.setattr(recipes_module, "_announced", set())
    with caplog.at_level(logging.WARNING, logger="slimtune.data.recipes"):
        result = load_examples("gsm8k:test")
        load_recipe("p3")
    assert len(result.examples) == 60
    assert result.report.notes[0].startswith("../shared/data not found")
    assert [r.getMessage() for r in caplog.records] == [result.report.notes[0]]  # said once, not per call
    for spec, least in (("gsm8k", 200), ("p3", 200), ("p3:test", 15), ("tatoeba", 250), ("tatoeba:test", 20),
                        ("taskmaster4", 120), ("taskmaster4:test", 12)):
        examples = load_recipe(spec)
        assert len(examples) >= least, spec
        assert all(ex.metadata["file"].startswith(str(SAMPLE_DIR)) for ex in examples)
    assert recipes_module.describe_recipes()[0] == result.report.notes[0]


def test_sample_is_small_drawn_from_the_shared_data_and_reproducible(full_shared_data, tmp_path, monkeypatch):
    files = sorted(path for path in SAMPLE_DIR.rglob("*") if path.is_file() and path.name != "README.md")
    assert sum(path.stat().st_size for path in files) < 1_000_000
    for path in files:
        original = set((full_shared_data / path.relative_to(SAMPLE_DIR)).read_bytes().splitlines())
        assert set(path.read_bytes().splitlines()) <= original, path
    monkeypatch.setattr(sys, "argv", ["make_sample.py", "--shared", str(full_shared_data), "--out", str(tmp_path)])
    runpy.run_path(str(SAMPLE_DIR.parents[3] / "scripts" / "make_sample.py"), run_name="__main__")
    assert [path.read_bytes() for path in files] == [(tmp_path / path.relative_to(SAMPLE_DIR)).read_bytes()
                                                     for path in files]
    licences = (SAMPLE_DIR / "README.md").read_text()
    assert all(term in licences for term in ("MIT", "Apache-2.0", "CC-BY 2.0 FR", "CC-BY 4.0"))
    assert json.loads((SAMPLE_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()[0])["answer"]
