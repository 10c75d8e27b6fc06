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

import numpy as np

from slimtune.data.errors import DataError
from slimtune.data.example import Example
from slimtune.data.table import take_rows


@dataclass
class Checked:
    """The usable examples, in input order (a table stays a table), and a problem for each one left out."""

    examples: Sequence[Example]
    problems: list[DataError] = field(default_factory=list)

    def skipped(self) -> list[dict[str, str]]:
        """The problems as manifest rows: where, and what."""
        return [{"where": _where(p), "problem": str(p)} for p in self.problems]


def check_examples(examples: Sequence[Example], *, tokenizer=None, max_length: int | None = None) -> Checked:
    """Sort ``examples`` into usable ones and problems.

    Without a tokenizer only the conversation's shape is checked (what any chat template needs); with one,
    each example is encoded exactly as training encodes it (:func:`slimtune.data.tokenize.token_table`, in
    parallel, into the cached token table that the method reading the pool then finds already made), and must
    keep at least one response token within ``max_length``.
    """
    problems_at = {position: problem for position, example in enumerate(examples)
                   if (problem := _shape_problem(example)) is not None}
    if tokenizer is not None:
        from slimtune.data.tokenize import token_table

        shaped = [i for i in range(len(examples)) if i not in problems_at]
        table = token_table(take_rows(examples, shaped) if problems_at else examples, tokenizer, max_length).data
        template_problems, dropped = table.column("problem"), table.column("dropped").to_numpy()
        for row in np.flatnonzero(dropped).tolist():
            problems_at[shaped[row]] = (
                f"the chat template cannot render this conversation: {template_problems[row].as_py()}"
                if template_problems[row].is_valid else
                f"no response token within max_length={max_length}: the last assistant turn renders to nothing "
                "the model can learn")
    if not problems_at:  # the common case: the caller's own sequence, nothing copied
        return Checked(examples)
    problems = []
    for position in sorted(problems_at):
        example = examples[position]
        problems.append(DataError(problems_at[position], file=example.metadata.get("file", f"id {example.id}"),
                                  line=example.metadata.get("line"), field="messages"))
    return Checked(take_rows(examples, [i for i in range(len(examples)) if i not in problems_at]), problems)



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
