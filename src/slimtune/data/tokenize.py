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

A pool is tokenised once into an Arrow table (Hugging Face ``datasets``, :func:`tokenize_pool`): built by the
main process with a batched map over worker processes, cached by a fingerprint of pool, tokenizer and length
limit, and memory-mapped by every rank, so each rank reads one shared copy of the ids instead of holding its own.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Features, List, Value
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher
from jinja2 import TemplateError
from torch.utils.data import Dataset

from slimtune.data.errors import DataError
from slimtune.data.example import Example, pool_hash
from slimtune.data.table import ExampleTable
from slimtune.utils import cache_dir as default_cache_dir
from slimtune.utils import process_state

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
    are dropped and counted.

    The token ids live in an Arrow table (:func:`tokenize_pool`) that every rank memory-maps, so RAM does not
    grow with the pool; a row becomes Python lists only when it is read. ``examples`` are the caller's own
    sequence (no copies; a table's Examples are made when read), indexed like the rows: do not change it while
    the data set is used.
    Under a multi-process launch every rank must construct it (rank 0 tokenises, the others wait and read).
    """

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int | None = 512, *,
                 num_proc: int | None = None, cache_dir: str | os.PathLike | None = None):
        table = tokenize_pool(examples, tokenizer, max_length, num_proc=num_proc, cache_dir=cache_dir)
        dropped = table.data.column("dropped").to_numpy()
        cut = table.data.column("tokens_cut").to_numpy()
        self._source = examples
        self._kept = np.flatnonzero(~dropped)
        # read through pyarrow: a row costs a fraction of what datasets' formatting layer spends on it
        self._ids, self._labels = table.data.column("input_ids"), table.data.column("labels")
        self.lengths = pc.list_value_length(self._ids).to_numpy()[self._kept]
        self.lengths.flags.writeable = False
        self.stats = EncodeStats(total=len(table), truncated=int((cut > 0).sum()), tokens_cut=int(cut.sum()),
                                 dropped=int(dropped.sum()),
                                 dropped_ids=[examples[int(i)].id for i in np.flatnonzero(dropped)])

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index: int) -> dict[str, object]:
        return {**self._row(index), "example_index": index % len(self)}

    def __getitems__(self, indices: list[int]) -> list[dict[str, object]]:
        """Rows for a DataLoader batch, read from the table in one query."""
        positions = pa.array(self._kept[indices])
        ids, labels = self._ids.take(positions).to_pylist(), self._labels.take(positions).to_pylist()
        return [{"input_ids": i, "labels": y, "example_index": index % len(self)}
                for i, y, index in zip(ids, labels, indices)]

    def _row(self, index: int) -> dict[str, list[int]]:
        position = self._kept[index]
        return {"input_ids": self._ids[position].as_py(), "labels": self._labels[position].as_py()}

    @property
    def positions(self) -> np.ndarray:
        """Each row's position among the examples given (rows left out are skipped); read-only."""
        view = self._kept.view()
        view.flags.writeable = False
        return view

    @property
    def examples(self) -> Sequence[Example]:
        """The Example of each row, read from the caller's sequence."""
        return _LazySequence(len(self), lambda i: self._source[int(self._kept[i])])

    @property
    def rows(self) -> Sequence[dict[str, list[int]]]:
        """``{"input_ids", "labels"}`` of each row, read on access (for callers written against the list this
        data set used to hold; read-only). ``lengths`` holds the row lengths without reading any row."""
        return _LazySequence(len(self), self._row)

    def num_tokens(self) -> int:
        return int(self.lengths.sum())


class _LazySequence(Sequence):
    """A read-only list whose items are made on access."""

    def __init__(self, size: int, item):
        self._size, self._item = size, item

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(self._size))]
        if not -self._size <= index < self._size:
            raise IndexError(f"index {index} out of range for {self._size} rows")
        return self._item(index % self._size)


#: The map's input: each row's conversation as the chat template sees it.
RECORD_FEATURES = Features({"messages": List({"role": Value("string"), "content": Value("string")})})
#: The map's output, one row per input row (dropped rows included, so the stats can be read back from cache);
#: ``problem`` says why the chat template could not render a row (then dropped, with no tokens), else null.
TOKEN_FEATURES = Features({"input_ids": List(Value("int32")), "labels": List(Value("int32")),
                           "tokens_cut": Value("int32"), "dropped": Value("bool"), "problem": Value("string")})
#: Pools smaller than this tokenise in one process: below it, starting workers costs more than it saves.
PARALLEL_FROM_ROWS = 20_000
_WRITE_ROWS = 10_000


def tokenize_pool(examples: Sequence[Example], tokenizer, max_length: int | None, *,
                  num_proc: int | None = None, cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """Every example encoded by :func:`encode_example` (:func:`token_table`); a conversation the chat template
    cannot render raises a :class:`DataError` naming its file, line and field."""
    table = token_table(examples, tokenizer, max_length, num_proc=num_proc, cache_dir=cache_dir)
    problems = table.data.column("problem")
    if problems.null_count < len(problems):
        position = int(pc.index(pc.is_valid(problems), True).as_py())
        example = examples[position]
        raise DataError(f"the chat template cannot render this conversation: {problems[position].as_py()}",
                        file=example.metadata.get("file", f"id {example.id}"), line=example.metadata.get("line"),
                        field="messages")
    return table


def token_table(examples: Sequence[Example], tokenizer, max_length: int | None, *,
                num_proc: int | None = None, cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """Every example encoded by :func:`encode_example`, as a memory-mapped Arrow table of int32 ``input_ids``
    and ``labels``, each row's ``tokens_cut``, whether it was ``dropped`` (no response token left) and the
    ``problem`` that stopped the chat template rendering it (null for a rendered row).

    The table is cached under ``cache_dir`` (default ``slimtune.models.cache_dir() / "pools"``), in a folder
    per pool, by a fingerprint of the pool, the tokenizer, ``max_length`` and this module's code: a repeated
    call tokenises nothing (so the CLI's check of a pool and the method that then tokenises it share one
    pass). The main process builds it first and the other ranks then load the same files. ``num_proc``
    worker processes tokenise (default ``$SLIMTUNE_NUM_PROC``, else 1 below :data:`PARALLEL_FROM_ROWS` rows and
    one per available CPU above). A table of examples is tokenised from its messages column, making no Example.
    """
    ensure_chat_template(tokenizer)
    if len(examples) == 0:  # datasets skips the function on an empty table, which would keep the input's columns
        return datasets.Dataset.from_dict({name: [] for name in TOKEN_FEATURES}, features=TOKEN_FEATURES)
    if cache_dir is None:
        cache_dir = default_cache_dir() / "pools"
    pool = pool_hash(examples)
    folder = Path(cache_dir) / pool
    key = Hasher.hash([pool, len(examples), Hasher.hash(tokenizer), max_length, _ENCODER_CODE])
    workers = _workers(num_proc, len(examples))
    with process_state().main_process_first():
        records = _records(examples, folder / "records.arrow")
        return records.map(_encode_batch, batched=True, num_proc=workers,
                           fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                           features=TOKEN_FEATURES, remove_columns=records.column_names,
                           new_fingerprint=key, cache_file_name=str(folder / f"tokens-{key}.arrow"),
                           load_from_cache_file=True, desc="Tokenising")


def _encode_batch(batch: dict[str, list], tokenizer, max_length: int | None) -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in TOKEN_FEATURES}
    for messages in batch["messages"]:
        stats = EncodeStats()
        try:
            row = encode_example(Example(id="", messages=tuple(messages)), tokenizer, max_length, stats)
            problem = None
        except (ValueError, TemplateError) as err:  # a template refusing a role order is a data problem
            row, problem = {"input_ids": [], "labels": []}, str(err)
        out["input_ids"].append(row["input_ids"])
        out["labels"].append(row["labels"])
        out["tokens_cut"].append(stats.tokens_cut)
        out["dropped"].append(all(label == IGNORE_INDEX for label in row["labels"]))
        out["problem"].append(problem)
    return out


def _records(examples: Sequence[Example], path: Path) -> datasets.Dataset:
    """The pool's conversations as an Arrow file, written once in bounded batches: the map's input, so
    worker processes read their shard from disk instead of being sent pickled Examples."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        with ArrowWriter(features=RECORD_FEATURES, path=str(partial)) as writer:
            if isinstance(examples, ExampleTable):  # the table's own column: no Example is made
                for chunk in examples.messages.chunks:
                    writer.write_table(pa.table({"messages": chunk}))
            else:
                rows = iter(examples)
                while batch := list(itertools.islice(rows, _WRITE_ROWS)):
                    writer.write_batch({"messages": [[{"role": m["role"], "content": m["content"]}
                                                      for m in ex.messages] for ex in batch]})
            writer.finalize()
        os.replace(partial, path)
    return datasets.Dataset.from_file(str(path))


def _workers(num_proc: int | None, rows: int) -> int | None:
    """Processes for the map; ``None`` for one (datasets starts a pool for any number given)."""
    if num_proc is None:
        setting = os.environ.get("SLIMTUNE_NUM_PROC", "").strip()
        if setting and not (setting.isdigit() and int(setting) > 0):
            raise ValueError(f"SLIMTUNE_NUM_PROC must be a positive integer, got {setting!r}")
        num_proc = int(setting) if setting else (1 if rows < PARALLEL_FROM_ROWS else len(os.sched_getaffinity(0)))
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    return num_proc if num_proc > 1 else None


#: Part of the cache key: any edit to this module re-tokenises, as stale ids would silently skew every stage.
_ENCODER_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


@dataclass
class Collator:
    """Pads a list of rows into tensors. Right padding for training and scoring, left for generation.

    ``example_index`` (each row's position in its TokenizedDataset) is kept only when ``keep_index`` is set,
    because a plain model's forward would reject the extra key; the online trainer needs it to log ids.

    ``trim_logits`` (right padding only; for a model whose forward takes ``logits_to_keep`` and computes its own
    shifted cross-entropy) asks the model for logits from the position before the batch's first labelled token
    on, and cuts the labels to match. Prompt positions predict nothing that is trained on, and the LM head over
    a 49k vocabulary is a fifth of a small model's forward and backward: the loss, the token count the Trainer
    normalises by, and the gradients are those of the whole batch (6 SmolLM2 LoRA steps on the targeted pool:
    8% less time).
    """

    pad_token_id: int
    padding_side: str = "right"
    keep_index: bool = False
    pad_to_multiple_of: int | None = None
    trim_logits: bool = False

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
        if self.trim_logits and self.padding_side == "right":
            labelled = (batch["labels"] != IGNORE_INDEX).any(dim=0).nonzero()
            # The kept logit before the first labelled token predicts it; the label cut in front is never read.
            start = max(int(labelled[0]) - 1, 0) if len(labelled) else 0
            if start > 0:
                batch["labels"] = batch["labels"][:, start:]
                batch["logits_to_keep"] = longest - start
        return batch
