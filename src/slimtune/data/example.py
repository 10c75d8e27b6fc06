"""The one record type every stage of slimtune speaks: a conversation with a stable id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """A training or evaluation example.

    ``messages`` is an OpenAI-style conversation (``{"role", "content"}`` dicts, roles in :data:`ROLES`);
    every assistant turn is a response the model learns. ``metadata`` holds at least ``source`` (a data set or
    file name) and ``task`` (what a target set or a stratum is keyed by); readers add ``file`` and ``line``.
    ``record`` is the untouched input record, so a selected subset can be written back in the user's format.
    """

    id: str
    messages: tuple[dict[str, str], ...]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def task(self) -> str:
        return str(self.metadata.get("task", self.metadata.get("source", "default")))

    @property
    def prompt_messages(self) -> tuple[dict[str, str], ...]:
        """All turns before the last assistant turn (the x of the methods' papers)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def response(self) -> str:
        """The last assistant turn (the y of the methods' papers)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")

    @property
    def prompt_text(self) -> str:
        """The prompt flattened to plain text, for embeddings and in-context templates."""
        return "\n".join(m["content"] for m in self.prompt_messages if m["role"] != "system")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "messages": [dict(m) for m in self.messages], "metadata": self.metadata}


def content_id(messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> str:
    """A stable id from the conversation's content, for records that carry none."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def make_example(messages: list[dict[str, str]], *, id: str | None = None, **metadata: Any) -> Example:
    """Build an Example from messages, hashing the content when no id is given."""
    msgs = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    record = metadata.pop("record", None)
    return Example(id=id if id is not None else content_id(msgs), messages=msgs, metadata=metadata, record=record)


def pool_hash(examples: Iterable[Example]) -> str:
    """Hash of a pool's ids and contents in order: the key under which features and selections are cached.
    A sequence that keeps its own (an :class:`~slimtune.data.table.ExampleTable`, computed on first use) says it
    through ``known_pool_hash()``, so a million-row pool is not read again for every cache key."""
    known = getattr(examples, "known_pool_hash", None)
    if known is not None:
        return known()
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.id.encode("utf-8"))
        h.update(content_id(ex.messages).encode("ascii"))
    return h.hexdigest()[:16]
