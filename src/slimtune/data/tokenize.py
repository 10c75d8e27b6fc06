"""Chat-template tokenisation with labels on assistant turns only, and the padding collator.

Labels are -100 everywhere except the tokens of every assistant turn (its content and the end-of-turn
marker, so the model learns to stop). Spans are found by rendering the conversation up to each assistant
turn with the template's generation prompt and comparing it with the render that includes the turn; this
works for any template whose renders of a conversation's prefixes are string prefixes of the whole, which
holds for ChatML, Llama, Mistral, Gemma and Phi templates. Tokens are then mapped to characters through the
fast tokenizer's offsets, so the ids are exactly those of tokenising the whole conversation at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from slimtune.data.example import Example

IGNORE_INDEX = -100

#: Used for tokenizers that ship no chat template (base models): ChatML, the most widely known format.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The template's text for ``messages`` followed by the assistant generation prompt."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def assistant_spans(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character span of each assistant turn in it."""
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(tokenizer, messages[:i])
        through = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not (full.startswith(through) and through.startswith(prompt)):
            raise ValueError("the chat template does not render conversation prefixes as text prefixes; "
                             "assistant-only labels cannot be located for it")
        spans.append((len(prompt), len(through)))
    return full, spans


@dataclass
class EncodeStats:
    """What truncation did to a data set: rows cut short, and rows dropped because no response survived."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.total} examples, {self.truncated} truncated, {self.dropped} dropped "
                f"(no response token left within the length limit)")


def encode_example(example: Example, tokenizer, max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids and labels (-100 outside assistant turns), truncated on the right to ``max_length``."""
    text, spans = assistant_spans(tokenizer, example.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_iter = iter(spans)
    span = next(span_iter, None)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        while span is not None and start >= span[1]:
            span = next(span_iter, None)
        if span is not None and end > span[0] and start < span[1]:
            labels[t] = ids[t]
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def last_turn_only(labels: list[int]) -> list[int]:
    """Labels with every assistant turn but the last masked: the y of single-response methods and metrics.
    Turns are told apart by the unlabelled template header between them."""
    end = max((t for t, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [label if start <= t <= end else IGNORE_INDEX for t, label in enumerate(labels)]


class TokenizedDataset(Dataset):
    """Examples tokenised once; rows with no response token left after truncation are dropped and counted."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int | None = 512):
        ensure_chat_template(tokenizer)
        self.stats = EncodeStats(total=len(examples))
        self.examples: list[Example] = []
        self.rows: list[dict[str, list[int]]] = []
        for ex in examples:
            full = encode_example(ex, tokenizer, None)
            row = full
            if max_length is not None and len(full["input_ids"]) > max_length:
                self.stats.truncated += 1
                row = {k: v[:max_length] for k, v in full.items()}
            if all(label == IGNORE_INDEX for label in row["labels"]):
                self.stats.dropped += 1
                self.stats.dropped_ids.append(ex.id)
                continue
            self.examples.append(ex)
            self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {**self.rows[index], "example_index": index}

    def num_tokens(self) -> int:
        return sum(len(r["input_ids"]) for r in self.rows)


@dataclass
class Collator:
    """Pads a list of rows into tensors. Right padding for training and scoring, left for generation.

    ``example_index`` (each row's position in its TokenizedDataset) is kept only when ``keep_index`` is set,
    because a plain model's forward would reject the extra key; the online trainer needs it to log ids.
    """

    pad_token_id: int
    padding_side: str = "right"
    keep_index: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[dict[str, object]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {name: torch.full((len(rows), longest), fill, dtype=torch.long)
                 for name, fill in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX),
                                    ("attention_mask", 0))}
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            cols = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            batch["input_ids"][b, cols] = torch.tensor(row["input_ids"])
            batch["labels"][b, cols] = torch.tensor(row["labels"])
            batch["attention_mask"][b, cols] = 1
        if self.keep_index:
            batch["example_index"] = torch.tensor([int(r["example_index"]) for r in rows])
        return batch
