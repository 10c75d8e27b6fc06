from slimtune.data.example import make_example
from slimtune.data.tokenize import IGNORE_INDEX, Collator, TokenizedDataset, encode_example


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


def test_long_prompts_lose_their_start_and_keep_the_whole_response_counted_in_tokens_cut(tokenizer):
    short = chat("Hi", "Hello")
    long_prompt = chat("Start " + " ".join(["word"] * 300) + " END", "The answer is ok")
    data = TokenizedDataset([short, long_prompt], tokenizer, max_length=64)
    full = encode_example(long_prompt, tokenizer)
    assert data.stats.total == 2 and data.stats.truncated == 1 and data.stats.dropped == 0
    assert data.stats.tokens_cut == len(full["input_ids"]) - 64
    row = data.rows[1]
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


def test_collator_pads_right_for_training_and_left_for_generation(tokenizer):
    data = TokenizedDataset([chat("Hi", "Hello"), chat("A longer question here", "A longer answer")], tokenizer)
    right = Collator(tokenizer.pad_token_id)([data[0], data[1]])
    left = Collator(tokenizer.pad_token_id, padding_side="left", keep_index=True)([data[0], data[1]])
    n0 = len(data.rows[0]["input_ids"])
    assert right["attention_mask"][0, :n0].all() and not right["attention_mask"][0, n0:].any()
    assert (right["labels"][0, n0:] == IGNORE_INDEX).all()
    assert left["attention_mask"][0, -n0:].all() and not left["attention_mask"][0, :-n0].any()
    assert left["input_ids"][0, -n0:].tolist() == data.rows[0]["input_ids"]
    assert left["example_index"].tolist() == [0, 1] and "example_index" not in right
