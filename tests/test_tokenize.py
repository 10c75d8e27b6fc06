import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import slimtune.data.tokenize as tokenize
from slimtune.data.errors import DataError
from slimtune.data.example import make_example
from slimtune.data.recipes import load_recipe
from slimtune.data.tokenize import IGNORE_INDEX, Collator, EncodeStats, TokenizedDataset, encode_example

WORKER = Path(__file__).with_name("tokenize_worker.py")


def learnt_text(tokenizer, row):
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return make_example([{"role": r, "content": c} for r, c in zip(roles, turns)])


def test_single_turn_labels_cover_exactly_the_response_and_end_of_turn(tokenizer):
    row = encode_example(chat("What is 12*3?", "12*3 = 36"), tokenizer)
    assert learnt_text(tokenizer, row) == "12*3 = 36<|im_end|>\n"
    # ids are those of tokenising the whole rendered conversation at once
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12*3?"},
                                           {"role": "assistant", "content": "12*3 = 36"}], tokenize=False)
    assert row["input_ids"] == tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_every_assistant_turn_of_a_multi_turn_chat_is_learnt_and_no_user_turn(tokenizer):
    row = encode_example(chat("I'd like a latte.", "Is the order correct?", "Yes.", "Ready soon at the bar."),
                         tokenizer)
    assert learnt_text(tokenizer, row) == "Is the order correct?<|im_end|>\nReady soon at the bar.<|im_end|>\n"


def test_system_turn_is_never_learnt(tokenizer):
    ex = make_example([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}])
    assert learnt_text(tokenizer, encode_example(ex, tokenizer)) == "Hello<|im_end|>\n"


def test_long_prompts_lose_their_start_and_keep_the_whole_response_counted_in_tokens_cut(tokenizer, tmp_path):
    short = chat("Hi", "Hello")
    long_prompt = chat("Start " + " ".join(["word"] * 300) + " END", "The answer is ok")
    data = TokenizedDataset([short, long_prompt], tokenizer, max_length=64, cache_dir=tmp_path)
    full = encode_example(long_prompt, tokenizer)
    assert data.stats.total == 2 and data.stats.truncated == 1 and data.stats.dropped == 0
    assert data.stats.tokens_cut == len(full["input_ids"]) - 64
    row = data[1]
    assert len(row["input_ids"]) == 64
    assert learnt_text(tokenizer, row) == "The answer is ok<|im_end|>\n"
    assert row["input_ids"] == full["input_ids"][-64:]
    text = tokenizer.decode(row["input_ids"])
    assert "END" in text and "Start" not in text


def test_a_response_longer_than_the_limit_keeps_its_start_and_every_kept_response_token_is_predicted(tokenizer):
    long_answer = chat("Count", " ".join(str(i) for i in range(300)))
    row = encode_example(long_answer, tokenizer, max_length=32)
    labelled = [t for t, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    assert len(row["input_ids"]) == 32
    assert labelled == list(range(1, 32))  # one header token before the response, then its first 31 tokens
    assert learnt_text(tokenizer, row).startswith("0 1 2 3")


def test_multi_turn_rows_keep_the_last_turn_when_cut(tokenizer):
    dialogue = chat(" ".join(["long"] * 200), "First reply " * 20, "And now?", "Last reply")
    row = encode_example(dialogue, tokenizer, max_length=40)
    assert learnt_text(tokenizer, row).endswith("Last reply<|im_end|>\n")


def test_collator_pads_right_for_training_and_left_for_generation(tokenizer, tmp_path):
    data = TokenizedDataset([chat("Hi", "Hello"), chat("A longer question here", "A longer answer")], tokenizer,
                            cache_dir=tmp_path)
    right = Collator(tokenizer.pad_token_id)([data[0], data[1]])
    left = Collator(tokenizer.pad_token_id, padding_side="left", keep_index=True)([data[0], data[1]])
    n0 = len(data[0]["input_ids"])
    assert right["attention_mask"][0, :n0].all() and not right["attention_mask"][0, n0:].any()
    assert (right["labels"][0, n0:] == IGNORE_INDEX).all()
    assert left["attention_mask"][0, -n0:].all() and not left["attention_mask"][0, :-n0].any()
    assert left["input_ids"][0, -n0:].tolist() == data[0]["input_ids"]
    assert left["example_index"].tolist() == [0, 1] and "example_index" not in right
    # a DataLoader reads a batch in one query (__getitems__): the same rows, as the int64 the model takes
    loaded, = DataLoader(data, batch_size=2, collate_fn=Collator(tokenizer.pad_token_id))
    assert all(torch.equal(loaded[name], right[name]) for name in right)
    assert loaded["input_ids"].dtype == loaded["labels"].dtype == torch.long


# -- pools as Arrow tables ---------------------------------------------------------------------------------

def eager_encoding(examples, tokenizer, max_length):
    """The encoding loop TokenizedDataset ran in memory before its rows moved to Arrow: the reference."""
    stats, kept = EncodeStats(), []
    for ex in examples:
        row = encode_example(ex, tokenizer, max_length, stats)
        if all(label == IGNORE_INDEX for label in row["labels"]):
            stats.dropped += 1
            stats.dropped_ids.append(ex.id)
        else:
            kept.append((ex, row))
    return kept, stats


def all_rows(data):
    return [data[i] for i in range(len(data))]


@pytest.fixture(scope="module")
def real_rows():
    """Real rows of every shape (the shared data, else the bundled sample): math, multi-turn dialogues,
    translations, and P3 prompts long enough to be cut."""
    return [*load_recipe("gsm8k:train", limit=8, seed=0), *load_recipe("taskmaster4", limit=4, seed=0),
            *load_recipe("tatoeba:fra-eng", limit=4, seed=0), *load_recipe("p3", limit=16, seed=0)]


@pytest.mark.parametrize("max_length", [128, 1])  # 1: no response token fits, every row is dropped
def test_the_arrow_rows_are_the_eager_encoding_row_for_row(real_rows, tokenizer, tmp_path, max_length):
    kept, stats = eager_encoding(real_rows, tokenizer, max_length)
    data = TokenizedDataset(real_rows, tokenizer, max_length, cache_dir=tmp_path)
    assert all_rows(data) == [{**row, "example_index": i} for i, (_, row) in enumerate(kept)]
    assert data.stats == stats and (stats.truncated > 0 if max_length == 128 else stats.dropped == len(real_rows))
    assert len(data.examples) == len(kept) and all(data.examples[i] is ex for i, (ex, _) in enumerate(kept))
    assert list(data.rows) == [row for _, row in kept]
    assert data.lengths.tolist() == [len(row["input_ids"]) for _, row in kept]
    assert data.num_tokens() == sum(data.lengths)


def test_an_empty_pool_is_an_empty_data_set_with_nothing_counted(tokenizer, tmp_path):
    data = TokenizedDataset([], tokenizer, 128, cache_dir=tmp_path)
    assert len(data) == 0 and data.num_tokens() == 0 and data.stats == EncodeStats() and not data.examples


def test_a_second_build_of_the_same_pool_tokenises_nothing(real_rows, tokenizer, tmp_path, monkeypatch):
    first = TokenizedDataset(real_rows, tokenizer, 128, cache_dir=tmp_path)
    written = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.arrow")}
    batches = []
    encode = tokenize._encode_batch
    monkeypatch.setattr(tokenize, "_encode_batch", lambda *args, **kwargs: batches.append(1) or encode(*args, **kwargs))
    again = TokenizedDataset(real_rows, tokenizer, 128, cache_dir=tmp_path)
    assert batches == [] and {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.arrow")} == written
    assert all_rows(again) == all_rows(first) and again.stats == first.stats
    TokenizedDataset(real_rows, tokenizer, 64, cache_dir=tmp_path)  # another length limit: other ids
    assert batches


def test_two_worker_processes_tokenise_as_one_does(real_rows, tokenizer, tmp_path):
    alone = TokenizedDataset(real_rows, tokenizer, 128, cache_dir=tmp_path / "one")
    shared = TokenizedDataset(real_rows, tokenizer, 128, num_proc=2, cache_dir=tmp_path / "two")
    assert all_rows(shared) == all_rows(alone) and shared.stats == alone.stats


def test_num_proc_from_the_environment_must_be_a_count(real_rows, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_NUM_PROC", "all")
    with pytest.raises(ValueError, match="SLIMTUNE_NUM_PROC must be a positive integer, got 'all'"):
        TokenizedDataset(real_rows, tokenizer, 128, cache_dir=tmp_path)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_conversation_the_template_refuses_names_its_file_and_line(tokenizer, tmp_path, num_proc):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                            "{% endif %}" + tokenizer.chat_template)
    with_system = make_example([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}], file="d.jsonl", line=7)
    with pytest.raises(DataError, match=r"^d\.jsonl:7: field 'messages': the chat template cannot render "
                                        r"this conversation: no system role"):
        TokenizedDataset([chat("Hi", "Hello"), with_system], strict, 64, num_proc=num_proc, cache_dir=tmp_path)


def test_under_torchrun_one_rank_tokenises_and_the_other_reads_its_table(tokenizer, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
               str(tmp_path / "cache"), str(tmp_path / "report")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / "report" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["batches"] > 0 and reports[1]["batches"] == 0
    sys.path.insert(0, str(WORKER.parent))
    try:
        from tokenize_worker import pool
    finally:
        sys.path.remove(str(WORKER.parent))
    kept, stats = eager_encoding(pool(), tokenizer, 96)
    expected = [{**row, "example_index": i} for i, (_, row) in enumerate(kept)]
    assert reports[0]["rows"] == reports[1]["rows"] == expected
    assert reports[0]["stats"] == reports[1]["stats"] == stats.summary()
