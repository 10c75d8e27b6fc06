"""Checks that run once, after reading and before any model loads: can each example be used by the stage
that asked for it?

The readers accept any well-formed record; a stage needs more. Training and every model-scored method render
a conversation through the tokenizer's chat template and learn (or score) its last assistant turn, so a
conversation with no turn before its first response, one the template refuses, or one left with no response
token inside the length limit (after the prompt is cut from the left, as training cuts it) would fail or
score nothing hours later. Each problem is a :class:`DataError` naming the file, line and field, so the
command can stop with all of them listed, or skip them with ``--skip-bad`` and record them in the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from slimtune.data.errors import DataError
from slimtune.data.example import Example


@dataclass
class Checked:
    """The usable examples, in input order, and a problem for each one left out."""

    examples: list[Example]
    problems: list[DataError] = field(default_factory=list)

    def skipped(self) -> list[dict[str, str]]:
        """The problems as manifest rows: where, and what."""
        return [{"where": _where(p), "problem": str(p)} for p in self.problems]


def check_examples(examples: Sequence[Example], *, tokenizer=None, max_length: int | None = None) -> Checked:
    """Sort ``examples`` into usable ones and problems.

    Without a tokenizer only the conversation's shape is checked (what any chat template needs); with one,
    each example is encoded exactly as training encodes it (:func:`slimtune.data.tokenize.encode_example`),
    and must keep at least one response token within ``max_length``.
    """
    if tokenizer is not None:
        from jinja2 import TemplateError

        from slimtune.data.tokenize import IGNORE_INDEX, encode_example, ensure_chat_template

        ensure_chat_template(tokenizer)
    checked = Checked(examples=[])
    for example in examples:
        problem = _shape_problem(example)
        if problem is None and tokenizer is not None:
            try:
                row = encode_example(example, tokenizer, max_length)
            except (ValueError, TemplateError) as err:  # a template refusing a role order is a data problem
                problem = f"the chat template cannot render this conversation: {err}"
            else:
                if all(label == IGNORE_INDEX for label in row["labels"]):
                    problem = (f"no response token within max_length={max_length}: the last assistant turn "
                               "renders to nothing the model can learn")
        if problem is None:
            checked.examples.append(example)
        else:
            checked.problems.append(DataError(problem, file=example.metadata.get("file", f"id {example.id}"),
                                              line=example.metadata.get("line"), field="messages"))
    return checked


def _shape_problem(example: Example) -> str | None:
    roles = [m["role"] for m in example.messages]
    if not roles:
        return "empty conversation: no turns"
    if "assistant" not in roles:
        return "no assistant turn: nothing to learn"
    if roles[0] == "assistant":
        return ("the conversation starts with an assistant turn: a response needs a user turn before it "
                "(drop the leading assistant turn, or put the text in a user or system turn)")
    return None


def _where(problem: DataError) -> str:
    return f"{problem.file}:{problem.line}" if problem.line is not None else str(problem.file)
