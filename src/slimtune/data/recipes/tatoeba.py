"""Tatoeba: line-aligned sentence pairs between English and ten languages, as translation requests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from slimtune.data.errors import DataError
from slimtune.data.example import Example, make_example
from slimtune.data.recipes.common import Recipe, in_split
from slimtune.data.report import LoadReport, LoadResult

LANGUAGES = {"eng": "English", "fra": "French", "deu": "German", "spa": "Spanish", "ita": "Italian",
             "por": "Portuguese", "nld": "Dutch", "rus": "Russian", "cmn": "Chinese", "jpn": "Japanese",
             "tur": "Turkish"}


def translation_pairs(pairs: str | Sequence[str] | None, available: Sequence[str]) -> list[tuple[str, str]]:
    """``(source, target)`` language pairs from ``fra-eng``, ``eng-fra``, ``fra`` (both directions), with
    ``*`` for every available language (``*-eng``); ``None`` means every language in both directions."""
    chosen: list[tuple[str, str]] = []
    for item in pairs.split(",") if isinstance(pairs, str) else pairs or ["*"]:
        item = item.strip().lower()
        source, _, target = item.partition("-")
        if not target:
            directions = [d for code in _codes(item, item, available) for d in ((code, "eng"), ("eng", code))]
        elif source == "eng":
            directions = [("eng", code) for code in _codes(target, item, available)]
        elif target == "eng":
            directions = [(code, "eng") for code in _codes(source, item, available)]
        else:
            raise ValueError(f"Tatoeba pair '{item}' has no English side; pairs go to or from English")
        chosen += [d for d in directions if d not in chosen]
    return chosen


def _codes(code: str, item: str, available: Sequence[str]) -> list[str]:
    if code == "*":
        return list(available)
    if code not in available:
        raise ValueError(f"unknown Tatoeba pair '{item}': use xxx-eng, eng-xxx or xxx (both directions), "
                         f"with xxx one of {', '.join(available)} or * for all")
    return [code]


def _name(code: str) -> str:
    return LANGUAGES.get(code, code)


def _lines(path: Path) -> list[str]:
    # split("\n") rather than splitlines(): the files are aligned on newlines only, and a sentence may hold
    # other characters that splitlines() would break at.
    return [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")][:-1]


def build(root: Path, split: str, pairs: str | Sequence[str] | None = None) -> LoadResult:
    folder = root / "tatoeba"
    available = sorted(path.name.split(".")[1].removesuffix("-eng")
                       for path in folder.glob("tatoeba.*-eng.eng"))
    if not available:
        raise FileNotFoundError(f"no Tatoeba files (tatoeba.xxx-eng.eng) in {folder}")
    directions = translation_pairs(pairs, available)
    report = LoadReport(source=str(folder), format="text")
    examples: list[Example] = []
    for code in available:
        wanted = [(s, t) for s, t in directions if code in (s, t)]
        if not wanted:
            continue
        foreign_file, english_file = folder / f"tatoeba.{code}-eng.{code}", folder / f"tatoeba.{code}-eng.eng"
        foreign, english = _lines(foreign_file), _lines(english_file)
        if len(foreign) != len(english):
            raise DataError(f"{len(foreign)} lines, but {english_file.name} has {len(english)}: the files "
                            "must be line-aligned", file=str(foreign_file))
        for line, texts in enumerate(({code: f, "eng": e} for f, e in zip(foreign, english)), 1):
            report.read += 1
            if not (texts[code].strip() and texts["eng"].strip()):
                report.problems.append(DataError("empty sentence", file=str(foreign_file), line=line))
                continue
            # Keyed by the English sentence, so both directions of a pair, and every language's pair with the
            # same English sentence, fall in the same split.
            if not in_split(texts["eng"], split):
                continue
            for source, target in wanted:
                examples.append(make_example(
                    [{"role": "user", "content": f"Translate from {_name(source)} to {_name(target)}: "
                                                 f"{texts[source]}"},
                     {"role": "assistant", "content": texts[target]}],
                    source="tatoeba", task=f"{source}-{target}", reference=texts[target],
                    file=str(foreign_file), line=line))
    report.shapes = Counter({"translation pairs": len(examples)})
    return LoadResult(examples, report)


RECIPE = Recipe(
    name="tatoeba", build=build, licence="CC-BY 2.0 FR",
    about="translation between English and fra deu spa ita por nld rus cmn jpn tur, both directions; "
          "task = fra-eng, eng-fra, ...; metadata 'reference'", option="pairs",
    option_help="fra-eng, eng-fra, fra (both), *-eng, comma-separated (tatoeba:fra,deu-eng)")
