"""Writing a subset back: same file type as the source, the original records, in the order given."""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest

from slimtune.data import load_examples, make_example, write_examples
from slimtune.data.example import pool_hash
from slimtune.select.base import Cost, Selection

# The original lines of a user's file, in both JSON escaping styles, with a field slimtune does not use.
LINES = [
    '{"instruction": "Name a colour", "output": "Blue", "extra": [1, 2]}',
    '{"instruction": "Caf\\u00e9?", "output": "Oui"}',
    '{"instruction": "Été ?", "input": "", "output": "Oui, l\'été"}',
    '{"instruction": "Count", "output": "1 2 3", "extra": null}',
]


def test_jsonl_subset_is_the_original_lines_in_the_given_order(write_jsonl, tmp_path):
    pool = load_examples(write_jsonl(LINES)).examples
    written = write_examples([pool[2], pool[1], pool[3]], tmp_path / "out" / "subset")
    assert written == tmp_path / "out" / "subset.jsonl"
    assert written.read_text(encoding="utf-8").splitlines() == [LINES[2], LINES[1], LINES[3]]


def test_gzipped_jsonl_is_written_gzipped(tmp_path):
    source = tmp_path / "pool.jsonl.gz"
    source.write_bytes(gzip.compress(("\n".join(LINES) + "\n").encode("utf-8")))
    written = write_examples(load_examples(source).examples[:2], tmp_path / "subset")
    assert written.name == "subset.jsonl.gz"
    assert gzip.decompress(written.read_bytes()).decode("utf-8").splitlines() == LINES[:2]


def test_csv_subset_has_the_same_columns_and_cells(tmp_path):
    source = tmp_path / "pool.csv"
    source.write_text('id,instruction,input,output,rating\n1,Name a colour,,Blue,5\n'
                      '2,List fruits,,"apple\npear",\n3,Count,,1 2 3,4\n', encoding="utf-8")
    pool = load_examples(source).examples
    written = write_examples([pool[2], pool[1]], tmp_path / "subset")
    assert written.name == "subset.csv"
    with open(written, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows == [["id", "instruction", "input", "output", "rating"], ["3", "Count", "", "1 2 3", "4"],
                    ["2", "List fruits", "", "apple\npear", ""]]
    assert [ex.id for ex in load_examples(written).examples] == ["3", "2"]


@pytest.mark.parametrize("document", [
    [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}],
    {"data": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]},
], ids=["list", "data-key"])
def test_json_subset_keeps_the_document_layout(tmp_path, document):
    source = tmp_path / "pool.json"
    source.write_text(json.dumps(document), encoding="utf-8")
    pool = load_examples(source).examples
    written = write_examples([pool[1]], tmp_path / "subset")
    assert written.name == "subset.json"
    expected = [{"prompt": "c", "completion": "d"}]
    assert json.loads(written.read_text()) == ({"data": expected} if isinstance(document, dict) else expected)


def test_parquet_subset_has_the_same_columns_and_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": i, "score": i / 2,
                "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(4)]
    source = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(records), source)
    pool = load_examples(source).examples
    written = write_examples([pool[3], pool[0]], tmp_path / "subset")
    assert written.name == "subset.parquet"
    table = pq.read_table(written)
    assert table.column_names == ["id", "score", "messages"]
    assert table.to_pylist() == [records[3], records[0]]


def test_datasets_folder_subset_is_written_as_jsonl_records(tmp_path):
    from datasets import Dataset

    records = [{"question": "1+1", "answer": "2"}, {"question": "2+2", "answer": "4"}]
    Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    written = write_examples(load_examples(tmp_path / "hf").examples[1:], tmp_path / "subset")
    assert written.name == "subset.jsonl"
    assert [json.loads(line) for line in written.read_text().splitlines()] == records[1:]


def test_examples_without_records_are_written_canonically_and_read_back_whole(tmp_path):
    translation = [{"role": "user", "content": "Translate: chat"}, {"role": "assistant", "content": "cat"}]
    examples = [make_example(translation, source="mine", task="fra-eng", reference="cat"),
                make_example([{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}],
                             id="sum-1", source="mine", task="math")]
    written = write_examples(examples, tmp_path / "subset")
    assert written.name == "subset.jsonl"
    again = load_examples(written).examples
    assert [(ex.id, ex.messages) for ex in again] == [(ex.id, ex.messages) for ex in examples]
    assert [ex.task for ex in again] == ["fra-eng", "math"]
    assert again[0].metadata["reference"] == "cat"
    assert again[0].metadata["source"] == "mine"


def test_a_suffix_in_the_path_chooses_the_file_type(write_jsonl, tmp_path):
    pool = load_examples(write_jsonl(LINES)).examples
    written = write_examples(pool[:2], tmp_path / "subset.csv")
    assert written == tmp_path / "subset.csv"
    with open(written, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0] == {"instruction": "Name a colour", "output": "Blue", "extra": "[1, 2]"}


def test_selection_save_writes_the_subset_in_the_pools_format(tmp_path):
    source = tmp_path / "pool.csv"
    source.write_text("question,answer\n1+1,2\n2+2,4\n3+3,6\n", encoding="utf-8")
    pool = load_examples(source).examples
    selection = Selection(method="by-hand", params={}, pool_ids=[ex.id for ex in pool], scores=np.zeros(3),
                          kept=[2, 0], pool_hash=pool_hash(pool), cost=Cost())
    subset = selection.save(tmp_path / "sel", pool)
    assert subset == tmp_path / "sel" / "subset.csv"
    assert subset.read_text() == "question,answer\n3+3,6\n1+1,2\n"
    assert json.loads((tmp_path / "sel" / "manifest.json").read_text())["subset_file"] == "subset.csv"


# --- a selection as a datasets folder and as indices for Dataset.select ----------------------------------


def test_indices_select_the_subset_from_the_source_as_datasets_reads_it(write_jsonl, tmp_path):
    from datasets import load_dataset, load_from_disk

    from slimtune.data.writers import save_subset

    # A blank line and a skipped bad record must not shift the positions datasets sees.
    source = write_jsonl([LINES[0], "", '{"instruction": "no output"}', *LINES[1:]])
    pool = load_examples(source, skip_bad=True).examples
    subset = [pool[3], pool[0], pool[2]]
    json_path, npy_path, folder = save_subset(subset, tmp_path / "sel", ["indices", "indices.npy", "datasets"])
    assert (json_path.name, npy_path.name, folder.name) == ("indices.json", "indices.npy", "subset_dataset")
    indices = json.loads(json_path.read_text())
    assert indices == [4, 0, 3] and np.load(npy_path).tolist() == indices
    rows = load_dataset("json", data_files=str(source), split="train").select(indices)
    assert [row["instruction"] for row in rows] == [ex.record["instruction"] for ex in subset]
    saved = load_from_disk(str(folder))
    assert [row["output"] for row in saved] == ["1 2 3", "Blue", "Oui, l'été"]
    # The folder reads back as the same examples.
    assert [ex.id for ex in load_examples(folder).examples] == [ex.id for ex in subset]


def test_indices_refuse_examples_without_one_source(tmp_path):
    from slimtune.data.writers import save_subset, write_indices

    built = [make_example([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])]
    with pytest.raises(ValueError, match=r"indices are positions in one source, but example .* has no position"):
        write_indices(built, tmp_path / "indices.json")
    with pytest.raises(ValueError, match="cannot save a subset as xml; choose from source, datasets, indices"):
        save_subset(built, tmp_path, ["jsonl", "xml"])


def test_select_on_a_dataset_saves_indices_that_dataset_select_turns_into_the_subset(tmp_path):
    from datasets import Dataset

    from slimtune.select import selector_class

    data = Dataset.from_dict({"question": [f"q{i}" for i in range(6)], "answer": ["x" * (i % 4 + 1) for i in range(6)]})
    selector = selector_class("length")(unit="chars")
    selection = selector.select(data, 2)
    selection.save(tmp_path / "sel", data, ["indices", "datasets"])
    indices = json.loads((tmp_path / "sel" / "indices.json").read_text())
    assert indices == selection.kept == [3, 2]  # the longest answers, longest first
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["subset_files"] == ["indices.json", "subset_dataset"]
    assert data.select(indices)["answer"] == ["xxxx", "xxx"]
