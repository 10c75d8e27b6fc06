"""GSM8K: grade-school math word problems; the response is the worked solution ending in ``#### <answer>``."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from slimtune.data.readers import read_examples
from slimtune.data.recipes.common import Recipe
from slimtune.data.report import LoadResult

_FINAL_ANSWER = re.compile(r"####\s*(.+?)\s*$")


def final_answer(solution: str) -> str | None:
    """The answer after ``####`` in a GSM8K solution, without thousands separators (``1,080`` -> ``1080``)."""
    match = _FINAL_ANSWER.search(solution)
    return match.group(1).replace(",", "") if match else None


def build(root: Path, split: str) -> LoadResult:
    result = read_examples(root / "gsm8k" / f"{split}.jsonl", shape="question-answer", source="gsm8k",
                           skip_bad=True, as_table=False)
    result.examples = [replace(ex, metadata={**ex.metadata, "answer": answer})
                       if (answer := final_answer(ex.response)) is not None else ex for ex in result.examples]
    return result


RECIPE = Recipe(
    name="gsm8k", build=build, splits=("train", "test"), licence="MIT",
    about="grade-school math: question -> worked solution; metadata 'answer' is the number after ####")
