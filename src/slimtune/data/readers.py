"""Reading examples from files (JSONL, optionally gzipped, JSON, CSV, Parquet) and from anything Hugging Face
``datasets`` reads: a saved datasets folder, a folder of data files, a Hub id (``org/name``, from the local cache
when offline), any other data file, or a ``Dataset``/``IterableDataset`` object.

:func:`read_examples` returns the examples and a :class:`LoadReport` of what was read, kept and skipped. Each
example keeps its untouched record and, in ``metadata``, where it came from (``file``, ``line`` for files,
``row``: its position in the source, which ``Dataset.select`` takes) and the source's ``format``, which is how
:mod:`slimtune.data.writers` writes a subset back in the user's own format. Recipes and the choice between a
recipe and a path live above this module, in :mod:`slimtune.data.loading`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.data.errors import DataError
from slimtune.data.example import Example, make_example
from slimtune.data.report import LoadReport, LoadResult, seeded_sample
from slimtune.data.shapes import Shape, get_shape, record_messages, type_name
from slimtune.data.table import ExampleWriter

#: Record fields that name a task when ``task_field`` is not given, in order of preference.
TASK_FIELDS = ("task", "category", "source")

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                   ".parquet": "parquet"}
_DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
#: Metadata that describes where a record was read from; a re-read file describes itself afresh.
_PROVENANCE = ("file", "line", "row", "format", "json_key", "json_ascii")
#: The format of every source read through ``datasets``; its subsets are written as JSONL.
DATASETS_FORMAT = "hf"

#: ``(line, or row for a dataset; record or the error that stopped it being one; metadata the writer needs)``
Row = tuple[int, dict[str, Any] | DataError, dict[str, Any]]


@dataclass
class _Rows:
    """An open source: its label in messages, its format, its stem (the default source name), its rows, and
    whether they are counted as dataset rows from 0 rather than file lines from 1."""

    label: str
    format: str
    stem: str
    rows: Iterator[Row]
    by_row: bool = False


def read_examples(data: Any, *, shape: str | None = None, skip_bad: bool = False, source: str | None = None,
                  task_field: str | None = None, id_field: str | None = None, limit: int | None = None,
                  seed: int | None = None, split: str | None = None, subset: str | None = None,
                  as_table: bool = True) -> LoadResult:
    """Examples from a file, a folder, a Hub id or a ``datasets`` object (see the module's description): a
    memory-mapped :class:`~slimtune.data.table.ExampleTable`, or with ``as_table=False`` a list (for callers
    that keep a small sample of the rows and reshape them, as recipes do).

    Shapes are recognised per record unless ``shape`` names one. A bad record raises a :class:`DataError`
    naming file, line and field (``dataset org/name split train row 12`` for a dataset); with ``skip_bad`` it
    is counted in the report instead. ``source`` names the data (default: the file's stem), ``task_field``
    the field holding each record's task (default: the first of ``task``, ``category``, ``source``),
    ``id_field`` the field holding its id (default ``id``; without one the id is a hash of the content).
    ``limit`` keeps the first examples, or a random sample when ``seed`` is given. ``split`` and ``subset``
    (a configuration name) choose within a dataset that has several.
    """
    forced = get_shape(shape) if shape else None
    try:
        opened = _open_source(data, split=split, subset=subset)
    except DataError as err:  # a file that cannot be read at all (a broken JSON document, ...)
        raise _locate(err, str(data), None) from None
    label = opened.label
    unit = "row" if opened.by_row else "line"
    first_of: dict[str, int] = {}
    report = LoadReport(source=label, format=opened.format)
    with ExampleWriter() if as_table else _ListWriter() as writer:
        try:
            for number, value, hints in opened.rows:
                position = report.read
                report.read += 1
                where = {"file": label, "row": position, "format": opened.format, **hints}
                if not opened.by_row:
                    where["line"] = number
                try:
                    if isinstance(value, DataError):
                        raise value
                    example, found, id_key = _example(value, forced, id_field=id_field, task_field=task_field,
                                                      source=source, stem=opened.stem, where=where)
                    first = first_of.setdefault(example.id, number)
                    if first != number:
                        raise (DataError(f"duplicate id {example.id!r} (first on {unit} {first})", field=id_key)
                               if id_key else DataError(f"duplicate record: same content as {unit} {first}"))
                except DataError as err:
                    located = _locate(err, label, number, by_row=opened.by_row)
                    if not skip_bad:
                        raise located from None
                    report.problems.append(located)
                    continue
                writer.append(example)
                report.shapes[found.name] += 1
                if limit is not None and seed is None and writer.rows >= limit:
                    break
        except DataError as err:
            raise _locate(err, label, None) from None
        examples = writer.finish()
    if limit is not None and seed is not None:
        examples = seeded_sample(examples, limit, seed)
    report.kept = len(examples)
    return LoadResult(examples, report)


class _ListWriter(list):
    """:class:`~slimtune.data.table.ExampleWriter`'s verbs over a plain list."""

    @property
    def rows(self) -> int:
        return len(self)

    def finish(self) -> list[Example]:
        return self

    def __enter__(self) -> _ListWriter:
        return self

    def __exit__(self, *error) -> None:
        pass


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


def _locate(err: DataError, label: str, number: int | None, *, by_row: bool = False) -> DataError:
    if err.file is not None:
        return err
    if by_row and number is not None:
        return DataError(err.problem, file=f"{label} row {number}", field=err.field)
    return DataError(err.problem, file=label, line=err.line if err.line is not None else number, field=err.field)


def _open_source(data: Any, *, split: str | None, subset: str | None) -> _Rows:
    """The rows of a path, a Hub id or a ``datasets`` object, with their label and format."""
    if not isinstance(data, (str, os.PathLike)):
        # Imported only here and for datasets sources: importing datasets costs seconds a JSONL file need not pay.
        from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

        if not isinstance(data, (Dataset, IterableDataset, DatasetDict, IterableDatasetDict)):
            raise TypeError(f"expected a path, a Hub id or a datasets.Dataset, got {type(data).__name__}")
        if subset:
            raise ValueError(f"subset {subset!r} names a configuration of a Hub data set; a datasets object is "
                             "one configuration already (load the one you want with load_dataset(id, subset))")
        name = data.info.dataset_name if isinstance(data, (Dataset, IterableDataset)) else None
        return _dataset_rows(data, f"dataset {name}" if name else "dataset", name or "dataset", split)
    path = Path(data)
    if path.is_file() and _file_format(path) is not None:
        if split or subset:
            raise ValueError(f"{path}: split and subset choose within a dataset; a file is read whole")
        fmt, rows = _open_rows(path)
        return _Rows(str(data), fmt, _stem(path), rows)
    if path.suffix == ".py":
        raise ValueError(f"{path}: datasets no longer runs loading scripts (since datasets 4.0); point at the "
                         "data files the script reads, or at a folder holding them")
    if path.is_dir() and is_datasets_folder(path):
        from datasets import load_from_disk

        if subset:
            raise ValueError(f"{path}: subset {subset!r} names a configuration of a Hub data set; a folder "
                             "written by save_to_disk holds one configuration (choose a split with --split)")

        return _dataset_rows(load_from_disk(str(path)), f"dataset {data}", path.name, split)
    if path.exists():
        # A folder of data files (as a Hub repository lays them out) or a file type only datasets knows.
        folder, files = (path, None) if path.is_dir() else (path.parent, path.name)
        return _dataset_rows(_load_dataset(f"dataset {data}", str(folder), subset, data_files=files),
                             f"dataset {data}", _stem(path), split)
    if looks_like_hub_id(str(data)):
        return _dataset_rows(_hub_dataset(str(data), subset), f"dataset {data}", str(data).split("/")[-1],
                             split)
    raise FileNotFoundError(f"{data}: no such file or folder, and not a Hugging Face Hub id (org/name)")


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith(".")


def _load_dataset(label: str, path: str, subset: str | None, **kwargs: Any) -> Any:
    """``load_dataset``, with what it raises for an unknown subset or an unreadable file (said in datasets'
    own words) prefixed by the source, so that the command line reports it as bad input."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return load_dataset(path, subset, **kwargs)
    except (ValueError, DatasetGenerationError) as err:
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise ValueError(f"{label}: {err}{cause}") from None


def _hub_dataset(repo_id: str, subset: str | None) -> Any:
    """A Hub dataset: from the Hub, else (offline or unreachable) from what ``load_dataset`` prepared
    before, else from a copy that ``huggingface-cli download --repo-type dataset`` left in the Hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return _load_dataset(f"dataset {repo_id}", repo_id, subset)
    except ConnectionError as err:
        try:
            folder = snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
        except LocalEntryNotFoundError:
            raise FileNotFoundError(
                f"dataset {repo_id}: no such file or folder, and as a Hub id not in the local Hugging Face cache "
                f"while the Hub cannot be reached ({err}); download it once online (huggingface-cli download "
                f"--repo-type dataset {repo_id}) or unset HF_HUB_OFFLINE") from None
    return _load_dataset(f"dataset {repo_id}", folder, subset)


def _dataset_rows(data: Any, label: str, stem: str, split: str | None) -> _Rows:
    """Rows of one split: the one named, else the only one there is."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(data, (DatasetDict, IterableDatasetDict)):
        if split is None and len(data) != 1:
            raise ValueError(f"{label} holds the splits {', '.join(data)}: choose one (--split, or split= in "
                             "Python)")
        split = split or next(iter(data))
        if split not in data:
            raise ValueError(f"{label} has no split '{split}'; it has {', '.join(data)}")
        data = data[split]
    elif split is not None and data.split is not None and str(data.split) != split:
        raise ValueError(f"{label} is the split '{data.split}', not '{split}'")
    split = split or (str(data.split) if data.split is not None else None)
    if split:
        label = f"{label} split {split}"
    # Arrow has no missing keys: a column absent from a row reads as None there, which would make a dataset
    # mixing shapes (prompt/completion rows beside question/answer rows) look like one shape with holes.
    rows = ((row, {key: value for key, value in record.items() if value is not None}, {})
            for row, record in enumerate(data))
    return _Rows(label, DATASETS_FORMAT, stem, rows, by_row=True)


def _stem(path: Path) -> str:
    name = path.name.removesuffix(".gz") if path.is_file() else path.name
    return Path(name).stem


def _file_format(path: Path) -> str | None:
    """The format slimtune reads a file in itself, or None to leave the file to ``datasets``."""
    name = path.name.lower()
    kind = _SUFFIX_FORMATS.get(Path(name.removesuffix(".gz")).suffix)
    if kind is None or (name.endswith(".gz") and kind == "parquet"):
        return None
    return kind


def _open_rows(path: Path) -> tuple[str, Iterator[Row]]:
    """The file's format (``jsonl``, ``jsonl.gz``, ``json``, ``csv``, ``parquet``) and its rows."""
    kind = _file_format(path)
    gz = ".gz" if path.name.lower().endswith(".gz") else ""
    if kind == "json":
        kind, rows = _json_rows(_read_all(path))
        return kind + gz, rows
    if kind == "parquet":
        return kind, _parquet_rows(path)
    return kind + gz, (_jsonl_rows if kind == "jsonl" else _csv_rows)(_binary_lines(path))


def is_datasets_folder(path: Path) -> bool:
    return any((path / marker).exists() for marker in _DATASETS_MARKERS)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _gzip_error(err: Exception, line: int | None = None) -> DataError:
    after = f" after line {line}" if line else ""
    return DataError(f"truncated or corrupt gzip file{after} ({err or type(err).__name__}); recompress it or "
                     "download it again")


#: What reading a damaged gzip stream raises; EOFError would otherwise reach click, which prints "Aborted.".
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _read_all(path: Path) -> bytes:
    with _open_binary(path) as fh:
        try:
            return fh.read()
        except _GZIP_ERRORS as err:
            raise _gzip_error(err) from None


def _binary_lines(path: Path) -> Iterator[bytes]:
    with _open_binary(path) as fh:
        lines_read = 0
        try:
            for raw in fh:
                yield raw
                lines_read += 1
        except _GZIP_ERRORS as err:
            raise _gzip_error(err, lines_read) from None


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
