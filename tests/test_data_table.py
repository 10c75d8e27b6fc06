"""The pool as a memory-mapped Arrow table: a loaded pool holds no Example objects, rows read back are the
examples written (metadata and record included), and what the stages do with a list works on it."""

from __future__ import annotations

import datetime
import gc
import json
import os

import pytest

from slimtune.data import load_examples, make_example
from slimtune.data.example import Example, pool_hash
from slimtune.data.table import BATCH_ROWS, ExampleTable


def rows(n: int) -> list[dict]:
    return [{"id": f"row-{i}", "task": f"t{i % 3}", "messages": [
        {"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(n)]


def live_examples() -> int:
    gc.collect()
    return sum(type(o) is Example for o in gc.get_objects())


def test_a_loaded_pool_holds_no_example_until_a_row_is_read(write_jsonl):
    before = live_examples()
    pool = load_examples(write_jsonl(rows(2 * BATCH_ROWS + 5))).examples
    assert isinstance(pool, ExampleTable) and len(pool) == 2 * BATCH_ROWS + 5
    assert live_examples() == before  # the rows are in the mapped file, not in Python objects
    example = pool[BATCH_ROWS + 1]  # a row in the second batch: chunks are found by position
    assert example.id == f"row-{BATCH_ROWS + 1}" and example.response == f"answer {BATCH_ROWS + 1}"
    assert example.metadata["line"] == BATCH_ROWS + 2 and example.task == "t" + str((BATCH_ROWS + 1) % 3)
    assert example.record == rows(BATCH_ROWS + 2)[-1]  # the untouched record, for writing subsets back
    assert pool.ids == [f"row-{i}" for i in range(len(pool))]
    assert pool[-1].id == f"row-{len(pool) - 1}"
    with pytest.raises(IndexError, match="out of range"):
        pool[len(pool)]


def test_the_table_leaves_no_file_behind_and_reads_like_the_list_it_replaces(write_jsonl, tmp_path):
    examples = [make_example(r["messages"], id=r["id"], task=r["task"], when=datetime.date(2026, 12, 6), record=r)
                for r in rows(10)]
    table = ExampleTable.write(examples, tmp_path / "tables")
    assert os.listdir(tmp_path / "tables") == []  # unlinked once mapped: a crash leaves nothing either
    assert table == examples and list(table) == examples and table[2:4] == examples[2:4]
    assert table[3].metadata["when"] == datetime.date(2026, 12, 6)  # types survive, not only JSON's
    assert table[:2] + table[8:] == examples[:2] + examples[8:]
    assert examples[:1] + table == examples[:1] + examples
    assert pool_hash(table) == pool_hash(examples) == pool_hash(table)  # kept after the first, as a list's
    taken = table.take([7, 1])
    assert isinstance(taken, ExampleTable) and list(taken) == [examples[7], examples[1]]
    assert pool_hash(taken) == pool_hash([examples[7], examples[1]])
    assert table.messages.to_pylist() == [list(ex.messages) for ex in examples]  # what tokenising reads


def test_a_bad_record_mid_file_still_names_its_line_and_leaves_no_table_file(write_jsonl, tmp_path, monkeypatch):
    from slimtune.data import DataError

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    records = [json.dumps(r) for r in rows(BATCH_ROWS + 3)]
    records[BATCH_ROWS + 1] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(records) + "\n")
    with pytest.raises(DataError, match=rf"pool.jsonl:{BATCH_ROWS + 2}"):
        load_examples(path)
    assert os.listdir(tmp_path / "cache" / "tables") == []
    kept = load_examples(path, skip_bad=True)
    assert len(kept.examples) == BATCH_ROWS + 2 and kept.report.skipped == 1


def test_a_seeded_sample_of_a_table_is_a_table_of_the_same_draw_as_a_list(write_jsonl):
    path = write_jsonl(rows(50))
    drawn = load_examples(path, limit=7, seed=3).examples
    listed = load_examples(path).examples
    assert isinstance(drawn, ExampleTable)
    from slimtune.data.report import seeded_sample

    assert list(drawn) == seeded_sample(list(listed), 7, 3)
