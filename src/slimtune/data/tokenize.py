"""Chat-template tokenisation with labels on assistant turns only, and the padding collator.

Labels are -100 everywhere except the tokens of every assistant turn (its content and the end-of-turn
marker, so the model learns to stop). Spans are found by rendering the conversation up to each assistant
turn with the template's generation prompt and comparing it with the render that includes the turn; this
works for any template whose renders of a conversation's prefixes are string prefixes of the whole, which
holds for ChatML, Llama, Mistral, Gemma and Phi templates. Tokens are then mapped to characters through the
fast tokenizer's offsets, so the ids are exactly those of tokenising the whole conversation at once.

Rows longer than the length limit lose tokens from the left (the start of the prompt), never from the last
assistant turn: a prompt that fills the window would otherwise leave no response to learn or score. A
response longer than the limit on its own keeps its start. Every stage (training, loss/IFD, LESS, scoring)
encodes through :func:`encode_example`, so they all see the same tokens.
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
    """What truncation did to a data set: rows cut short (and the tokens cut from them), and rows dropped
    because no response token survived."""

    total: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    dropped: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.total} examples, {self.truncated} truncated from the left ({self.tokens_cut} tokens "
                f"cut), {self.dropped} dropped (no response token left within the length limit)")


def encode_example(example: Example, tokenizer, max_length: int | None = None,
                   stats: EncodeStats | None = None) -> dict[str, list[int]]:
    """Token ids and labels (-100 outside assistant turns), cut to ``max_length`` by :func:`truncate_left`;
    ``stats`` (when given) counts the row and what was cut from it."""
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
    row = truncate_left({"input_ids": ids, "labels": labels}, max_length)
    if stats is not None:
        stats.total += 1
        cut = len(ids) - len(row["input_ids"])
        stats.truncated += cut > 0
        stats.tokens_cut += cut
    return row


def truncate_left(row: dict[str, list[int]], max_length: int | None) -> dict[str, list[int]]:
    """``row`` cut to at most ``max_length`` tokens, keeping the last assistant turn whole where it fits.

    The window ends where the last response ends and starts as far left as the limit allows, so the prompt
    loses its start. A response longer than the limit keeps its start, with the one token before it, so that
    every response token in the window is predicted (a causal LM's first position has no target). Tokens
    after the last response (unlabelled template tail) go first. A row with no label keeps its end.
    """
    ids, labels = row["input_ids"], row["labels"]
    if max_length is None or len(ids) <= max_length:
        return row
    start, end = last_turn_span(labels)
    if end < 0:
        start, end = len(ids), len(ids) - 1
    first = max(0, min(end + 1 - max_length, start - 1))
    window = slice(first, first + max_length)
    return {"input_ids": ids[window], "labels": labels[window]}


def last_turn_span(labels: list[int]) -> tuple[int, int]:
    """First and last position of the last assistant turn's labels; ``(-1, -1)`` when nothing is labelled.
    Turns are told apart by the unlabelled template header between them."""
    end = max((t for t, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def last_turn_only(labels: list[int]) -> list[int]:
    """Labels with every assistant turn but the last masked: the y of single-response methods and metrics."""
    start, end = last_turn_span(labels)
    return [label if start <= t <= end else IGNORE_INDEX for t, label in enumerate(labels)]


class TokenizedDataset(Dataset):
    """Examples tokenised once (cut from the left, :func:`truncate_left`); rows with no response token left
    are dropped and counted."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int | None = 512):
        ensure_chat_template(tokenizer)
        self.stats = EncodeStats()
        self.examples: list[Example] = []
        self.rows: list[dict[str, list[int]]] = []
        for ex in examples:
            row = encode_example(ex, tokenizer, max_length, self.stats)
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
