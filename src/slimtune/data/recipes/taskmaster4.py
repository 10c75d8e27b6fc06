"""Taskmaster-4: multi-turn coffee-ordering dialogues; every assistant turn is a response to learn."""

from __future__ import annotations

from pathlib import Path

from slimtune.data.readers import read_examples
from slimtune.data.recipes.common import Recipe, in_split
from slimtune.data.report import LoadResult


def build(root: Path, split: str) -> LoadResult:
    # The taskmaster shape takes ids from conversation_id and tasks from scenario, and drops trailing user
    # turns; a dialogue with no assistant turn is a counted skip.
    result = read_examples(root / "taskmaster4" / "dialogs.jsonl", shape="taskmaster", source="taskmaster4",
                           skip_bad=True, as_table=False)
    result.examples = [ex for ex in result.examples if in_split(ex.id, split)]
    trimmed = sum(ex.record["utterances"][-1]["speaker"] != "assistant" for ex in result.examples)
    if trimmed:
        result.report.notes.append(f"dropped the trailing user turns of {trimmed} dialogue(s) so that each "
                                   "ends with an assistant turn")
    return result


RECIPE = Recipe(
    name="taskmaster4", build=build, licence="CC-BY 4.0",
    about="multi-turn coffee-ordering dialogues, every assistant turn learnt; task = scenario")
