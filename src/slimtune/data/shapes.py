"""Record shapes: how a user's record (Alpaca, prompt/completion, chat messages, ...) becomes a conversation.

A shape is recognised from a record's keys, one record at a time, so a file that mixes shapes still loads.
Every problem is a :class:`DataError` naming the field at fault (``messages[2].content`` for the content of a
conversation's third turn); the reader adds the file and line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slimtune.data.errors import DataError

Messages = list[dict[str, str]]

#: Prompt/completion files made for OpenAI-style fine-tuning often end each completion with this literal
#: marker; learnt as text it would teach the model to write the marker instead of stopping.
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Shape:
    name: str
    keys: tuple[str, ...]
    to_messages: Callable[[dict[str, Any]], Messages]
    optional: tuple[str, ...] = ()
    #: Where the format keeps a record's id, and fields that name its task (tried before the usual ones).
    id_field: str = "id"
    task_fields: tuple[str, ...] = ()

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(key for key in self.keys if key not in self.optional)

    def describe(self) -> str:
        return f"{self.name} ({', '.join(f'{key}?' if key in self.optional else key for key in self.keys)})"


_JSON_TYPES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def type_name(value: Any) -> str:
    """A value's type as a JSON user knows it (``string``, ``list``, ``null``)."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _text(record: dict[str, Any], key: str, *, label: str | None = None) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type_name(value)}", field=label or key)
    return value


def _response(text: str, field: str) -> str:
    if not text.strip():
        raise DataError("empty response", field=field)
    return text


def _alpaca(record: dict[str, Any]) -> Messages:
    prompt = _text(record, "instruction")
    context = "" if record.get("input") is None else _text(record, "input")
    if context.strip():
        prompt = f"{prompt}\n\n{context}"
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": _response(_text(record, "output"), "output")}]


def _pair(prompt_key: str, response_key: str, *, strip_marker: bool = False) -> Callable[[dict], Messages]:
    def convert(record: dict[str, Any]) -> Messages:
        response = _text(record, response_key)
        if strip_marker and response.rstrip().endswith(END_OF_TEXT):
            response = response.rstrip().removesuffix(END_OF_TEXT).rstrip()
        return [{"role": "user", "content": _text(record, prompt_key)},
                {"role": "assistant", "content": _response(response, response_key)}]

    return convert


def _conversation(key: str, role_key: str, content_key: str, roles: dict[str, str], *,
                  drop_trailing_user_turns: bool = False) -> Callable[[dict], Messages]:
    def convert(record: dict[str, Any]) -> Messages:
        turns = record[key]
        if not isinstance(turns, list):
            raise DataError(f"expected a list of {{{role_key}, {content_key}}} turns, got {type_name(turns)}",
                            field=key)
        messages = []
        for i, turn in enumerate(turns):
            where = f"{key}[{i}]"
            if not isinstance(turn, dict):
                raise DataError(f"expected an object with '{role_key}' and '{content_key}', got "
                                f"{type_name(turn)}", field=where)
            for part in (role_key, content_key):
                if part not in turn:
                    raise DataError("missing", field=f"{where}.{part}")
            speaker = turn[role_key]
            if not isinstance(speaker, str) or speaker not in roles:
                raise DataError(f"unknown role {speaker!r} (known: {', '.join(roles)})",
                                field=f"{where}.{role_key}")
            content = _text(turn, content_key, label=f"{where}.{content_key}")
            if roles[speaker] == "assistant":
                _response(content, f"{where}.{content_key}")
            messages.append({"role": roles[speaker], "content": content})
        while drop_trailing_user_turns and messages and messages[-1]["role"] == "user":
            messages.pop()
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("no assistant turn: there is no response to learn", field=key)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"the last turn is a {messages[-1]['role']} turn; a conversation must end "
                            "with an assistant turn", field=key)
        return messages

    return convert


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant"}

#: In order of precedence: a record that fits two shapes is read as the first.
SHAPES: dict[str, Shape] = {shape.name: shape for shape in (
    Shape("messages", ("messages",),
          _conversation("messages", "role", "content", {r: r for r in ("system", "user", "assistant")})),
    Shape("sharegpt", ("conversations",), _conversation("conversations", "from", "value", _SHAREGPT_ROLES)),
    # Taskmaster dialogues often end with the customer's thanks: nothing to learn there, so it is dropped.
    Shape("taskmaster", ("utterances",),
          _conversation("utterances", "speaker", "text", {"user": "user", "assistant": "assistant"},
                        drop_trailing_user_turns=True),
          id_field="conversation_id", task_fields=("scenario",)),
    Shape("alpaca", ("instruction", "input", "output"), _alpaca, optional=("input",)),
    Shape("prompt-completion", ("prompt", "completion"), _pair("prompt", "completion", strip_marker=True)),
    Shape("question-answer", ("question", "answer"), _pair("question", "answer")),
)}


def get_shape(name: str) -> Shape:
    """The shape called ``name`` (``prompt_completion`` and ``Prompt-Completion`` work too)."""
    key = name.strip().lower().replace("_", "-")
    if key not in SHAPES:
        raise ValueError(f"unknown shape '{name}'; known: {', '.join(SHAPES)}")
    return SHAPES[key]


def detect_shape(record: dict[str, Any]) -> Shape:
    """The first shape whose required keys the record has, else the one it overlaps most (so that the
    error names the missing key), else an error listing the keys found and the shapes known."""
    keys = set(record)
    for shape in SHAPES.values():
        if keys.issuperset(shape.required):
            return shape
    overlap = {name: len(keys.intersection(shape.keys)) for name, shape in SHAPES.items()}
    best = max(SHAPES, key=lambda name: overlap[name])
    if not overlap[best]:
        raise DataError(f"unknown record shape (keys found: {', '.join(record) or 'none'}); "
                        f"known shapes: {', '.join(shape.describe() for shape in SHAPES.values())}")
    return SHAPES[best]


def record_messages(record: dict[str, Any], shape: Shape | None = None) -> tuple[Shape, Messages]:
    """The record's shape (detected unless given) and its conversation."""
    shape = shape or detect_shape(record)
    missing = [key for key in shape.required if key not in record]
    if missing:
        raise DataError(f"missing; expected {shape.describe()}, found keys: {', '.join(record) or 'none'}",
                        field=missing[0])
    return shape, shape.to_messages(record)
