"""P3 (the T0 training mixture): prompts from 283 templates over 31 English data sets, one response each."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from slimtune.data.readers import read_examples
from slimtune.data.recipes.common import Recipe, in_split
from slimtune.data.report import LoadResult

_LIST_ITEM = re.compile(r"^\s*-\s+(.*?)\s*$")


def answer_options(prompt: str, answer: str) -> list[str] | None:
    """The answer choices of a multiple-choice prompt: its last list of ``- item`` lines (blank lines may
    separate items), provided the answer is one of them. Lists of other things (the steps of a process)
    do not hold the answer, so they are never mistaken for choices."""
    if "- " not in prompt:
        return None
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in prompt.split("\n"):
        item = _LIST_ITEM.match(line)
        if item:
            current.append(item.group(1))
        elif line.strip() and current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    if blocks and len(blocks[-1]) > 1 and answer.strip() in blocks[-1]:
        return blocks[-1]
    return None


def build(root: Path, split: str, templates: str | Sequence[str] | None = None) -> LoadResult:
    # The completion's trailing <|endoftext|> is stripped by the prompt-completion shape itself.
    result = read_examples(root / "p3" / "p3_sample.jsonl", shape="prompt-completion", source="p3",
                           skip_bad=True, as_table=False)
    prefixes = tuple(templates.split(",") if isinstance(templates, str) else templates or ())
    known = sorted({ex.task for ex in result.examples})
    for prefix in prefixes:
        if not any(task.startswith(prefix) for task in known):
            raise ValueError(f"no P3 template starts with '{prefix}'; there are {len(known)}, e.g. "
                             f"{', '.join(known[::max(1, len(known) // 8)])}")
    examples = []
    for ex in result.examples:
        if in_split(ex.id, split) and (not prefixes or ex.task.startswith(prefixes)):
            options = answer_options(ex.prompt_text, ex.response)
            examples.append(replace(ex, metadata={**ex.metadata, "options": options}) if options else ex)
    result.examples = examples
    return result


RECIPE = Recipe(
    name="p3", build=build, licence="per source data set (research use); release Apache-2.0",
    about="P3/T0 prompts (QA, summaries, sentiment, topics, ...); task = template; metadata 'options' for "
          "multiple-choice prompts", option="templates",
    option_help="template-name prefixes, comma-separated (p3:cosmos_qa,sciq)")
