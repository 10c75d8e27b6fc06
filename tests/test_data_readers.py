"""Reading user data: every shape and file type, and a precise error for every kind of bad record."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from slimtune.data import DataError, load_examples
from slimtune.data.example import content_id

USER_ASSISTANT = ({"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"})


@pytest.mark.parametrize("record", [
    {"instruction": "Say hi", "output": "Hi!"},
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"prompt": "Say hi", "completion": "Hi!"},
    {"prompt": "Say hi", "completion": "Hi!<|endoftext|>"},
    {"question": "Say hi", "answer": "Hi!"},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]},
    {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi!"}]},
    {"conversations": [{"from": "user", "value": "Say hi"}, {"from": "assistant", "value": "Hi!"}]},
], ids=["alpaca", "alpaca-empty-input", "prompt-completion", "completion-end-marker", "question-answer",
        "messages", "sharegpt", "sharegpt-user-assistant"])
def test_every_shape_becomes_the_same_conversation(write_jsonl, record):
    example, = load_examples(write_jsonl([record])).examples
    assert example.messages == USER_ASSISTANT
    # No id field: the id is the content's hash, so the same example has the same id in any shape or file.
    assert example.id == content_id(USER_ASSISTANT)


def test_alpaca_input_follows_the_instruction(write_jsonl):
    path = write_jsonl([{"instruction": "Translate", "input": "chat", "output": "cat"}])
    example, = load_examples(path).examples
    assert example.messages[0]["content"] == "Translate\n\nchat"


def test_multi_turn_conversations_keep_every_turn_and_system_prompt(write_jsonl):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
             {"from": "gpt", "value": "4"}, {"from": "human", "value": "And 3+3?"},
             {"from": "gpt", "value": "6"}]
    example, = load_examples(write_jsonl([{"conversations": turns}])).examples
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert example.response == "6"
    assert [m["content"] for m in example.prompt_messages] == ["Be brief.", "2+2?", "4", "And 3+3?"]


def test_a_file_may_mix_shapes_and_the_report_counts_them(write_jsonl):
    path = write_jsonl([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"},
                        {"question": "e", "answer": "f"}])
    report = load_examples(path).report
    assert report.shape == "mixed (prompt-completion 2, question-answer 1)"
    assert (report.read, report.kept, report.skipped) == (3, 3, 0)


def test_shape_override_reads_records_by_the_named_shape(write_jsonl):
    # Both shapes fit; by default messages wins, the override picks the other.
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
              "question": "Q", "answer": "A"}
    path = write_jsonl([record])
    assert load_examples(path).examples[0].response == "y"
    result = load_examples(path, shape="question_answer")
    assert result.examples[0].messages[0]["content"] == "Q"
    assert result.report.shape == "question-answer"
    with pytest.raises(ValueError, match="unknown shape 'chatml'; known: messages, sharegpt, taskmaster, "):
        load_examples(path, shape="chatml")


def test_metadata_names_source_task_file_and_line_and_keeps_the_record(write_jsonl):
    rows = [{"id": 7, "prompt": "a", "completion": "b", "category": "brainstorm"}, "",
            {"id": "x-2", "prompt": "c", "completion": "d"}]
    path = write_jsonl(rows, name="my_pool.jsonl")
    first, second = load_examples(path).examples
    assert (first.id, second.id) == ("7", "x-2")
    assert first.metadata == {"source": "my_pool", "task": "brainstorm", "file": str(path), "line": 1,
                              "row": 0, "format": "jsonl"}
    # Blank lines still count as lines, not as rows: "row" is the record's position for Dataset.select.
    assert (second.task, second.metadata["line"], second.metadata["row"]) == ("my_pool", 3, 1)
    assert first.record == rows[0]


def test_source_task_field_and_id_field_override_the_defaults(write_jsonl):
    path = write_jsonl([{"uid": "q1", "kind": "math", "task": "ignored", "question": "1+1", "answer": "2"}])
    example, = load_examples(path, source="mine", task_field="kind", id_field="uid").examples
    assert (example.id, example.task, example.metadata["source"]) == ("q1", "math", "mine")


def test_limit_keeps_the_first_examples_or_a_seeded_sample(write_jsonl):
    path = write_jsonl([{"question": str(i), "answer": str(i)} for i in range(20)])
    first = load_examples(path, limit=3)
    assert [ex.response for ex in first.examples] == ["0", "1", "2"]
    assert first.report.read == 3  # reading stopped early
    sample = [ex.response for ex in load_examples(path, limit=5, seed=1).examples]
    assert sample == [ex.response for ex in load_examples(path, limit=5, seed=1).examples]
    assert sample != ["0", "1", "2", "3", "4"]
    assert [ex.response for ex in load_examples(path, limit=3, seed=1).examples] == sample[:3]


# --- bad input: every error names file, line and field -------------------------------------------------

BAD_RECORDS = [
    ('{"prompt": "a", "completion": }', "not valid JSON (Expecting value at column 31)"),
    ('["prompt", "completion"]', "expected a JSON object, got list"),
    ({"instruction": "a", "input": "b"},
     "field 'output': missing; expected alpaca (instruction, input?, output), found keys: instruction, "
     "input"),
    ({"completion": "b"},
     "field 'prompt': missing; expected prompt-completion (prompt, completion), found keys: completion"),
    ({"instruction": "a", "output": "  \n"}, "field 'output': empty response"),
    ({"prompt": "a", "completion": "<|endoftext|>"}, "field 'completion': empty response"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "field 'messages[1].content': empty response"),
    ({"text": "a", "label": 1},
     "unknown record shape (keys found: text, label); known shapes: messages (messages), sharegpt "
     "(conversations), taskmaster (utterances), alpaca (instruction, input?, output), prompt-completion "
     "(prompt, completion), question-answer (question, answer)"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]},
     "field 'messages': the last turn is a user turn; a conversation must end with an assistant turn"),
    ({"conversations": [{"from": "system", "value": "a"}, {"from": "human", "value": "b"}]},
     "field 'conversations': no assistant turn: there is no response to learn"),
    ({"messages": "user: hi"}, "field 'messages': expected a list of {role, content} turns, got string"),
    ({"messages": ["hi"]}, "field 'messages[0]': expected an object with 'role' and 'content', got string"),
    ({"messages": [{"role": "bot", "content": "a"}]},
     "field 'messages[0].role': unknown role 'bot' (known: system, user, assistant)"),
    ({"messages": [{"role": ["user"], "content": "a"}]},
     "field 'messages[0].role': unknown role ['user'] (known: system, user, assistant)"),
    ({"messages": [{"role": "user"}]}, "field 'messages[0].content': missing"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}]},
     "field 'messages[1].content': expected a string, got list"),
    ({"question": "a", "answer": 42}, "field 'answer': expected a string, got number"),
    ({"id": {"n": 1}, "question": "a", "answer": "b"},
     "field 'id': expected a string or an integer, got object"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_RECORDS, ids=[p.split(":")[0][:40] for _, p in BAD_RECORDS])
def test_a_bad_record_stops_loading_with_file_line_and_field(write_jsonl, bad, problem):
    path = write_jsonl([{"question": "fine", "answer": "ok"}, bad])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert str(caught.value) == f"{path}:2: {problem}"
    assert (caught.value.file, caught.value.line) == (str(path), 2)


def test_bytes_that_are_not_utf8_are_reported_with_line_byte_and_column(write_jsonl):
    path = write_jsonl([{"question": "fine", "answer": "ok"}, b'{"question": "caf\xe9", "answer": "x"}'])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert str(caught.value) == f"{path}:2: not valid UTF-8 (byte 0xe9 at column 18)"
    # the column counts characters, not bytes
    path = write_jsonl([b'{"question": "\xc3\xa9t\xc3\xa9 \xff", "answer": "x"}'])
    with pytest.raises(DataError, match=r"data.jsonl:1: not valid UTF-8 \(byte 0xff at column 19\)"):
        load_examples(path)


def test_duplicate_ids_and_duplicate_records_name_both_lines(write_jsonl):
    path = write_jsonl([{"id": "a", "question": "1", "answer": "1"},
                        {"id": "a", "question": "2", "answer": "2"}])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert str(caught.value) == f"{path}:2: field 'id': duplicate id 'a' (first on line 1)"
    path = write_jsonl([{"question": "1", "answer": "1"}, {"question": "2", "answer": "2"},
                        {"question": "1", "answer": "1"}])
    with pytest.raises(DataError) as caught:
        load_examples(path)
    assert str(caught.value) == f"{path}:3: duplicate record: same content as line 1"


def test_missing_task_or_id_field_named_by_the_caller(write_jsonl):
    path = write_jsonl([{"question": "1", "answer": "1"}])
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'kind': missing \(named as the task field\)"):
        load_examples(path, task_field="kind")
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'uid': missing \(named as the id field\)"):
        load_examples(path, id_field="uid")


def test_skip_bad_counts_and_reports_each_bad_record_and_keeps_the_rest(write_jsonl):
    path = write_jsonl([{"question": "1", "answer": "one"}, "{oops", {"question": "2", "answer": ""},
                        {"question": "3", "answer": "three"}, {"question": "1", "answer": "one"},
                        b'{"question": "\xff"}'])
    result = load_examples(path, skip_bad=True)
    assert [ex.response for ex in result.examples] == ["one", "three"]
    report = result.report
    assert (report.read, report.kept, report.skipped) == (6, 2, 4)
    assert [(p.line, p.field) for p in report.problems] == [(2, None), (3, "answer"), (5, None), (6, None)]
    assert str(report.problems[1]) == f"{path}:3: field 'answer': empty response"


# --- file types ---------------------------------------------------------------------------------------

RECORDS = [{"id": "r1", "instruction": "Name a colour", "output": "Blue"},
           {"id": "r2", "instruction": "Café?", "input": "", "output": "Oui"}]


def _responses(result):
    return [ex.response for ex in result.examples]


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "pool.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode()))
    result = load_examples(path)
    assert _responses(result) == ["Blue", "Oui"]
    assert result.report.format == "jsonl.gz"
    assert result.examples[0].metadata["source"] == "pool"


@pytest.mark.parametrize("document", [RECORDS, {"version": 2, "data": RECORDS}], ids=["list", "data-key"])
def test_json_list_or_object_holding_the_list(tmp_path, document):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    result = load_examples(path)
    assert _responses(result) == ["Blue", "Oui"]
    assert [ex.metadata["line"] for ex in result.examples] == [1, 2]  # the record's position in the list


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    result = load_examples(path)
    assert (_responses(result), result.report.format) == (["Blue", "Oui"], "jsonl")


def test_broken_json_file_names_the_line(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text('[\n  {"prompt": "a",\n   "completion" "b"}\n]', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_examples(path, skip_bad=True)  # a broken document cannot be skipped past
    assert str(caught.value) == f"{path}:3: not valid JSON (Expecting ':' delimiter at column 17)"


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pool.parquet"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             "id": 1},
            {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": ""}], "id": 2}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_examples(path, skip_bad=True)
    assert _responses(result) == ["hello"]
    assert str(result.report.problems[0]) == f"{path}:2: field 'messages[1].content': empty response"


def test_csv_lines_are_where_each_row_starts(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_text('instruction,input,output\nList two fruits,,"apple\npear"\nName a colour,,Blue\n'
                    "Too,many,values,here\n", encoding="utf-8")
    result = load_examples(path, skip_bad=True)
    assert _responses(result) == ["apple\npear", "Blue"]
    assert [ex.metadata["line"] for ex in result.examples] == [2, 4]
    assert str(result.report.problems[0]) == f"{path}:5: 4 values for 3 columns (instruction, input, output)"


def test_csv_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "pool.csv"
    path.write_bytes(b"question,answer\nok,fine\ncaf\xe9,x\nlast,one\n")
    result = load_examples(path, skip_bad=True)
    assert _responses(result) == ["fine", "one"]
    assert str(result.report.problems[0]) == f"{path}:3: not valid UTF-8 (byte 0xe9 at column 4)"


def test_saved_datasets_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "hf_pool"
    Dataset.from_list(RECORDS).save_to_disk(str(folder))
    result = load_examples(folder)
    assert _responses(result) == ["Blue", "Oui"]
    assert (result.report.format, result.examples[1].metadata["row"]) == ("hf", 1)
    both = tmp_path / "hf_splits"
    splits = DatasetDict({"train": Dataset.from_list(RECORDS), "test": Dataset.from_list(RECORDS[:1])})
    splits.save_to_disk(str(both))
    with pytest.raises(ValueError, match="holds the splits train, test: choose one"):
        load_examples(both)
    assert _responses(load_examples(both / "test")) == ["Blue"]
    assert _responses(load_examples(both, split="test")) == ["Blue"]
    with pytest.raises(ValueError, match="has no split 'dev'; it has train, test"):
        load_examples(both, split="dev")
    # a subset would otherwise be dropped without a word, and the user would select from the wrong rows
    with pytest.raises(ValueError, match="hf_pool: subset 'main' names a configuration of a Hub data set"):
        load_examples(folder, subset="main")
    with pytest.raises(ValueError, match=r"subset 'main' names a configuration .* a datasets object is one"):
        load_examples(Dataset.from_list(RECORDS), subset="main")


def test_paths_that_cannot_be_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder, not a recipe .* and not a Hugging Face "
                       r"Hub id \(org/name\)"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "blob.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="No \\(supported\\) data files found"):
        load_examples(tmp_path)
    (tmp_path / "load_pool.py").write_text("import datasets")
    with pytest.raises(ValueError, match="datasets no longer runs loading scripts"):
        load_examples(tmp_path / "load_pool.py")


def test_truncated_gzip_names_the_file_instead_of_aborting(tmp_path):
    path = tmp_path / "pool.jsonl.gz"
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS * 50).encode())
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"^{path}: truncated or corrupt gzip file"):
        load_examples(path, skip_bad=True)  # the rest of the file is lost, not one bad record
    (tmp_path / "pool.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"pool\.json\.gz: truncated or corrupt gzip file"):
        load_examples(tmp_path / "pool.json.gz")


# --- data through Hugging Face datasets -----------------------------------------------------------------


def test_a_dataset_object_reads_like_a_file_and_bad_rows_name_the_row():
    from datasets import Dataset

    from slimtune.data import as_examples

    data = Dataset.from_dict({"prompt": ["Say hi", None, None], "completion": ["Hi!", None, None],
                              "question": [None, "2+2?", "3+3?"], "answer": [None, "4", " "]})
    result = load_examples(data, skip_bad=True)
    # Each row's shape is its own, though Arrow gives every row every column.
    assert result.report.shape == "mixed (prompt-completion 1, question-answer 1)"
    assert [ex.metadata["row"] for ex in result.examples] == [0, 1]
    assert str(result.report.problems[0]) == "dataset row 2: field 'answer': empty response"
    with pytest.raises(DataError, match=r"^dataset row 2: field 'answer': empty response"):
        as_examples(data)
    streamed = as_examples(data.select(range(2)).to_iterable_dataset())
    assert [ex.response for ex in streamed] == ["Hi!", "4"]


def test_a_folder_of_data_files_reads_the_split_asked_for(tmp_path):
    folder = tmp_path / "my_data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    (folder / "test.jsonl").write_text(json.dumps(RECORDS[0]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds the splits train, test: choose one"):
        load_examples(folder)
    result = load_examples(folder, split="train")
    assert _responses(result) == ["Blue", "Oui"]
    assert (result.report.source, result.report.format) == (f"dataset {folder} split train", "hf")


def test_a_file_type_only_datasets_reads(tmp_path):
    path = tmp_path / "pool.tsv"
    path.write_text("question\tanswer\n2+2?\tfour\n3+3?\tsix\n", encoding="utf-8")
    assert _responses(load_examples(path)) == ["four", "six"]
    (tmp_path / "broken.arrow").write_bytes(b"not arrow" * 10)
    with pytest.raises(ValueError, match=r"^dataset .*broken\.arrow: .*Not an Arrow file"):
        load_examples(tmp_path / "broken.arrow")


def _hub_snapshot(hub_cache, repo_id, files):
    """The layout ``huggingface-cli download --repo-type dataset`` leaves in the Hub cache."""
    commit = "0" * 40
    repo = hub_cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            (snapshot / name).write_text(content)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(content), snapshot / name)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Empty Hub and datasets caches, offline (as conftest sets HF_HUB_OFFLINE=1 for every test)."""
    import datasets
    from huggingface_hub import constants

    assert datasets.config.HF_HUB_OFFLINE and constants.HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path


def test_a_hub_id_reads_a_downloaded_snapshot_offline_with_split_and_subset(hf_cache):
    card = ("---\nconfigs:\n- config_name: chat\n  data_files:\n  - {split: train, path: chat/train.parquet}\n"
            "  - {split: test, path: chat/test.parquet}\n- config_name: math\n  data_files:\n"
            "  - {split: train, path: math/train.parquet}\n---\n")
    _hub_snapshot(hf_cache / "hub", "acme/tiny-mix", {
        "README.md": card,
        "chat/train.parquet": [{"instruction": "Say hi", "output": "Hi!"}, {"instruction": "Bye", "output": ""}],
        "chat/test.parquet": [{"instruction": "Say yo", "output": "Yo!"}],
        "math/train.parquet": [{"question": "2+2?", "answer": "4"}]})
    result = load_examples("acme/tiny-mix", subset="chat", split="train", skip_bad=True)
    assert _responses(result) == ["Hi!"]
    assert (str(result.report.problems[0])
            == "dataset acme/tiny-mix split train row 1: field 'output': empty response")
    assert result.examples[0].metadata["source"] == "tiny-mix"
    assert _responses(load_examples("acme/tiny-mix", subset="chat", split="test")) == ["Yo!"]
    assert _responses(load_examples("acme/tiny-mix", subset="math")) == ["4"]
    with pytest.raises(ValueError, match=r"^dataset acme/tiny-mix: .*'poetry'"):
        load_examples("acme/tiny-mix", subset="poetry")


def test_a_hub_id_reads_what_load_dataset_prepared_before_offline(hf_cache):
    """Online, ``load_dataset("acme/prepared")`` leaves Arrow files under the datasets cache, in
    ``acme___prepared/<config>/<version>/<hash>/prepared-<split>.arrow``; offline, datasets reads them back."""
    import shutil

    import datasets

    files = hf_cache / "source"
    files.mkdir()
    for split, rows in {"train": RECORDS, "test": RECORDS[:1]}.items():
        (files / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data_files = {split: str(files / f"{split}.jsonl") for split in ("train", "test")}
    builder = datasets.load_dataset_builder("json", data_files=data_files, cache_dir=str(hf_cache / "build"))
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    target = hf_cache / "datasets" / "acme___prepared" / "default" / prepared.parent.name / prepared.name
    shutil.copytree(prepared, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", "prepared-")))
    assert _responses(load_examples("acme/prepared", split="train")) == ["Blue", "Oui"]
    assert _responses(load_examples("acme/prepared", split="test")) == ["Blue"]


def test_a_hub_id_missing_from_the_cache_offline_says_how_to_get_it(hf_cache):
    with pytest.raises(FileNotFoundError, match=r"dataset acme/absent: no such file or folder, and as a Hub id "
                       r"not in the local Hugging Face cache .*huggingface-cli download --repo-type dataset "
                       r"acme/absent"):
        load_examples("acme/absent")


# --- the same through the command line --------------------------------------------------------------------


def _cli(*args):
    from typer.testing import CliRunner

    from slimtune.cli import app

    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("command", ["inspect", "select"])
def test_a_truncated_gzip_exits_2_naming_the_file(tmp_path, command):
    path = tmp_path / "pool.jsonl.gz"
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS * 50).encode())
    path.write_bytes(whole[: len(whole) // 2])
    args = (["data", "inspect", path] if command == "inspect" else
            ["select", "--method", "random", "--budget", 2, "--data", path, "--out", tmp_path / "sel"])
    code, output = _cli(*args)
    assert code == 2
    assert f"{path}: truncated or corrupt gzip file" in output and "Aborted" not in output


def test_cli_reads_a_hub_split_and_subset_and_saves_indices(hf_cache):
    card = ("---\nconfigs:\n- config_name: chat\n  data_files:\n  - {split: train, path: chat/train.parquet}\n"
            "  - {split: test, path: chat/test.parquet}\n---\n")
    rows = [{"instruction": f"Say {w}", "output": w * (i + 1)} for i, w in enumerate("abcdef")]
    _hub_snapshot(hf_cache / "hub", "acme/chat", {"README.md": card, "chat/train.parquet": rows,
                                                  "chat/test.parquet": rows[:1]})
    code, output = _cli("data", "inspect", "acme/chat", "--data-subset", "chat", "--split", "train")
    assert code == 0 and "6 records read, 6 usable, 0 bad" in output
    out = hf_cache / "sel"
    code, output = _cli("select", "--method", "length", "-p", "unit=chars", "--budget", 2, "--data", "acme/chat",
                        "--split", "train", "--out", out, "--save-as", "jsonl,indices")
    assert code == 0, output
    assert json.loads((out / "indices.json").read_text()) == [5, 4]
    assert [json.loads(line)["output"] for line in (out / "subset.jsonl").read_text().splitlines()] == ["ffffff",
                                                                                                          "eeeee"]
    code, output = _cli("select", "--method", "random", "--budget", 2, "--data", "acme/chat", "--out", out,
                        "--save-as", "xml")
    assert code == 2 and "cannot save a subset as xml" in output
    code, output = _cli("data", "inspect", "acme/chat")
    assert code == 2 and "holds the splits train, test: choose one (--split" in output
