"""Reading examples from JSONL (optionally gzipped), JSON, CSV, Parquet and saved datasets folders.

:func:`read_examples` returns the examples and a :class:`LoadReport` of what was read, kept and skipped. Each
example keeps its untouched record and, in ``metadata``, where it came from (``file``, ``line``) and the file's
``format``, which is how :func:`slimtune.data.writers.write_examples` writes a subset back in the user's own
format. Recipes build on these readers; :func:`slimtune.data.load_examples` takes either.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.data.errors import DataError
from slimtune.data.example import Example, make_example
from slimtune.data.shapes import Shape, get_shape, record_messages, type_name

#: Record fields that name a task when ``task_field`` is not given, in order of preference.
TASK_FIELDS = ("task", "category", "source")

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                   ".parquet": "parquet"}
_DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
#: Metadata that describes where a record was read from; a re-read file describes itself afresh.
_PROVENANCE = ("file", "line", "format", "json_key", "json_ascii")

#: ``(line, record or the error that stopped it being one, metadata the writer needs)``
Row = tuple[int, dict[str, Any] | DataError, dict[str, Any]]


@dataclass
class LoadReport:
    """What loading found. ``read`` counts records read (bad ones included), ``kept`` the examples returned,
    ``problems`` holds one located :class:`DataError` per skipped record; ``notes`` says what else happened
    (a recipe fell back to the bundled sample, dropped trailing turns, ...)."""

    source: str
    format: str
    read: int = 0
    kept: int = 0
    problems: list[DataError] = field(default_factory=list)
    shapes: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.problems)

    @property
    def shape(self) -> str:
        """The shape of the records, or ``mixed (alpaca 90, messages 10)``."""
        if len(self.shapes) == 1:
            return next(iter(self.shapes))
        if not self.shapes:
            return "none"
        return "mixed (" + ", ".join(f"{name} {count}" for name, count in self.shapes.most_common()) + ")"


@dataclass
class LoadResult:
    examples: list[Example]
    report: LoadReport


def read_examples(path: str | os.PathLike, *, shape: str | None = None, skip_bad: bool = False,
                  source: str | None = None, task_field: str | None = None, id_field: str | None = None,
                  limit: int | None = None, seed: int | None = None) -> LoadResult:
    """Examples from a file or a saved Hugging Face datasets folder.

    Shapes are recognised per record unless ``shape`` names one. A bad record raises a :class:`DataError`
    naming file, line and field; with ``skip_bad`` it is counted in the report instead. ``source`` names
    the data (default: the file's stem), ``task_field`` the field holding each record's task (default: the
    first of ``task``, ``category``, ``source``), ``id_field`` the field holding its id (default ``id``;
    without one the id is a hash of the content). ``limit`` keeps the first examples, or a random sample
    when ``seed`` is given.
    """
    location = Path(path)
    label, stem = str(path), _stem(location)
    forced = get_shape(shape) if shape else None
    examples: list[Example] = []
    first_line_of: dict[str, int] = {}
    report = LoadReport(source=label, format="")
    try:
        report.format, rows = _open_rows(location)
        for line, value, hints in rows:
            report.read += 1
            try:
                if isinstance(value, DataError):
                    raise value
                example, found, id_key = _example(value, forced, id_field=id_field, task_field=task_field,
                                                  source=source, stem=stem,
                                                  where={"file": label, "line": line, "format": report.format,
                                                         **hints})
                first = first_line_of.setdefault(example.id, line)
                if first != line:
                    raise (DataError(f"duplicate id {example.id!r} (first on line {first})", field=id_key)
                           if id_key else DataError(f"duplicate record: same content as line {first}"))
            except DataError as err:
                located = _locate(err, label, line)
                if not skip_bad:
                    raise located from None
                report.problems.append(located)
                continue
            examples.append(example)
            report.shapes[found.name] += 1
            if limit is not None and seed is None and len(examples) >= limit:
                break
    except DataError as err:
        raise _locate(err, label, None) from None
    if limit is not None and seed is not None:
        examples = seeded_sample(examples, limit, seed)
    report.kept = len(examples)
    return LoadResult(examples, report)


def seeded_sample(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """``limit`` examples drawn at random with ``seed``; a smaller limit draws a prefix of a larger one."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:limit]]


def _example(record: dict[str, Any], shape: Shape | None, *, id_field: str | None, task_field: str | None,
             source: str | None, stem: str, where: dict[str, Any]) -> tuple[Example, Shape, str | None]:
    """The example, its shape, and the record's id field when it carried an id."""
    found, messages = record_messages(record, shape)
    # A row written by Example.to_dict() carries its metadata; keeping it makes canonical files round-trip.
    stored = record["metadata"] if isinstance(record.get("metadata"), dict) else {}
    stored = {key: value for key, value in stored.items() if key not in _PROVENANCE}
    source = source or stored.get("source") or stem
    id_key = id_field or found.id_field
    if id_field and id_field not in record:
        raise DataError("missing (named as the id field)", field=id_field)
    has_id = record.get(id_key) not in (None, "")
    task = _task(record, task_field, found.task_fields, stored, source)
    metadata = {**stored, "source": source, "task": task, **where}
    example = make_example(messages, id=_label(record, id_key) if has_id else None, record=record, **metadata)
    return example, found, id_key if has_id else None


def _task(record: dict[str, Any], task_field: str | None, shape_fields: tuple[str, ...],
          stored: dict[str, Any], source: str) -> str:
    """From the field the caller named (which must be there), else stored metadata, else the shape's own
    task fields and the usual ones (:data:`TASK_FIELDS`), else the source."""
    if task_field:
        if task_field not in record:
            raise DataError("missing (named as the task field)", field=task_field)
        return _label(record, task_field)
    if "task" in stored:
        return str(stored["task"])
    fields = (*shape_fields, *TASK_FIELDS)
    named = (record[key] for key in fields if isinstance(record.get(key), str) and record[key].strip())
    return next(named, source)


def _label(record: dict[str, Any], key: str) -> str:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"expected a string or an integer, got {type_name(value)}", field=key)
    return str(value)


def _stem(path: Path) -> str:
    name = path.name.removesuffix(".gz") if path.is_file() else path.name
    return Path(name).stem


def _locate(err: DataError, file: str, line: int | None) -> DataError:
    if err.file is not None:
        return err
    return DataError(err.problem, file=file, line=err.line if err.line is not None else line, field=err.field)


def _open_rows(path: Path) -> tuple[str, Iterator[Row]]:
    """The file's format (``jsonl``, ``jsonl.gz``, ``json``, ``csv``, ``parquet``, ``hf``) and its rows."""
    if path.is_dir():
        if not _is_datasets_folder(path):
            raise ValueError(f"{path} is a folder but not a saved Hugging Face datasets folder (it has none "
                             f"of {', '.join(_DATASETS_MARKERS)})")
        return "hf", _datasets_rows(path)
    name = path.name.lower()
    compressed = name.endswith(".gz")
    kind = _SUFFIX_FORMATS.get(Path(name.removesuffix(".gz")).suffix)
    if kind is None or (compressed and kind == "parquet"):
        raise ValueError(f"{path}: unsupported file type; slimtune reads .jsonl, .json and .csv files (each "
                         "optionally .gz), .parquet files and saved Hugging Face datasets folders")
    gz = ".gz" if compressed else ""
    if kind == "json":
        with _open_binary(path) as fh:
            kind, rows = _json_rows(fh.read())
        return kind + gz, rows
    if kind == "parquet":
        return kind, _parquet_rows(path)
    return kind + gz, (_jsonl_rows if kind == "jsonl" else _csv_rows)(_binary_lines(path))


def _is_datasets_folder(path: Path) -> bool:
    return any((path / marker).exists() for marker in _DATASETS_MARKERS)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _binary_lines(path: Path) -> Iterator[bytes]:
    with _open_binary(path) as fh:
        yield from fh


def _utf8_error(raw: bytes, start: int, line: int | None = None) -> DataError:
    column = len(raw[:start].decode("utf-8")) + 1
    return DataError(f"not valid UTF-8 (byte 0x{raw[start]:02x} at column {column})", line=line)


def _json_error(err: json.JSONDecodeError, line: int | None = None) -> DataError:
    return DataError(f"not valid JSON ({err.msg} at column {err.colno})", line=line)


def _ascii_hint(text: str) -> dict[str, Any]:
    # Only a line that escaped its non-ASCII characters (\u00e9) writes differently from one that did not.
    return {"json_ascii": True} if text.isascii() and "\\u" in text else {}


def _jsonl_rows(lines: Iterable[bytes]) -> Iterator[Row]:
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, _utf8_error(raw, err.start), {}
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield number, _json_error(err), {}
            continue
        if isinstance(record, dict):
            yield number, record, _ascii_hint(text)
        else:
            yield number, DataError(f"expected a JSON object, got {type_name(record)}"), {}


def _json_rows(data: bytes) -> tuple[str, Iterator[Row]]:
    """A JSON file holding a list of records, or an object with one key holding that list
    (``{"data": [...]}``); a ``.json`` file holding one object per line is read as JSON Lines."""
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise _utf8_error(data[line_start:], err.start - line_start, line=line) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and err.lineno > 1:
            return "jsonl", _jsonl_rows(io.BytesIO(data))
        raise _json_error(err, line=err.lineno) from None
    hints = _ascii_hint(text)
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list)]
        if len(lists) != 1:
            raise DataError("expected a list of records, or an object with one key holding that list; found "
                            f"keys: {', '.join(value) or 'none'}")
        hints["json_key"] = lists[0]
        value = value[lists[0]]
    elif not isinstance(value, list):
        raise DataError(f"expected a list of records, got {type_name(value)}")
    return "json", ((number, record if isinstance(record, dict)
                     else DataError(f"expected a JSON object, got {type_name(record)}"), hints)
                    for number, record in enumerate(value, 1))


def _csv_rows(lines: Iterable[bytes]) -> Iterator[Row]:
    """CSV rows keyed by the header; ``line`` is where a row starts (quoted values may span lines)."""
    undecodable: dict[int, DataError] = {}

    def text_lines() -> Iterator[str]:
        for number, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                # Decoded leniently so that the CSV parser stays in step; the row holding the line is refused.
                undecodable[number] = _utf8_error(raw, err.start, line=number)
                text = raw.decode("utf-8", errors="replace")
            yield text.removeprefix("\ufeff") if number == 1 else text

    reader = csv.reader(text_lines())
    try:
        header = next(reader, None)
        if header is None:
            return
        if 1 in undecodable:
            raise undecodable[1]
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            bad = next((undecodable[n] for n in range(start, end + 1) if n in undecodable), None)
            if bad is not None:
                yield start, bad, {}
            elif not row:
                continue
            elif len(row) != len(header):
                problem = f"{len(row)} values for {len(header)} columns ({', '.join(header)})"
                yield start, DataError(problem), {}
            else:
                yield start, dict(zip(header, row)), {}
    except csv.Error as err:
        raise DataError(f"not valid CSV ({err})", line=reader.line_num) from None


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"not a readable Parquet file ({err})") from None
    number = 0
    for batch in parquet.iter_batches():
        for record in batch.to_pylist():
            number += 1
            yield number, record, {}


def _datasets_rows(path: Path) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if len(data) != 1:
            raise ValueError(f"{path} holds the splits {', '.join(data)}: give one split's folder, e.g. "
                             f"{path / next(iter(data))}")
        data = next(iter(data.values()))
    for number, record in enumerate(data, 1):
        yield number, record, {}
