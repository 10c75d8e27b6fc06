"""Writing examples back in the user's own format, so a selected subset drops into their existing pipeline."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimtune.data.example import Example
from slimtune.utils import atomic_write_bytes, json_default

#: The file types written, by suffix; longer suffixes first so ``.jsonl.gz`` is not taken for ``.gz``.
FORMATS = ("jsonl.gz", "json.gz", "csv.gz", "jsonl", "json", "csv", "parquet")


def write_examples(examples: Sequence[Example], path: str | os.PathLike) -> Path:
    """Write ``examples`` in order and return the path written.

    Examples read from files are written as their original records, in the type of the file they came from
    (a saved datasets folder becomes JSONL; sources of different types become JSONL). Examples without a
    record (built in code, or from the Tatoeba recipe) are written as ``Example.to_dict()`` rows in JSONL,
    which :func:`slimtune.data.load_examples` reads back with ids and metadata. A suffix in ``path``
    (``subset.csv``) chooses the type; without one (``out/subset``) the source's suffix is added.
    """
    path = Path(path)
    with_records = all(ex.record is not None for ex in examples)
    sources = {ex.metadata.get("format") for ex in examples}
    source_format = sources.pop() if with_records and len(sources) == 1 else None
    requested = next((fmt for fmt in FORMATS if path.name.lower().endswith(f".{fmt}")), None)
    fmt = requested or (source_format if source_format in FORMATS else "jsonl")
    if requested is None:
        path = path.with_name(f"{path.name}.{fmt}")
    rows = [ex.record if with_records else ex.to_dict() for ex in examples]
    kind = fmt.removesuffix(".gz")
    if kind == "parquet":
        data = _parquet(rows)
    else:
        escaped = [with_records and bool(ex.metadata.get("json_ascii")) for ex in examples]
        json_keys = {ex.metadata.get("json_key") for ex in examples}
        json_key = json_keys.pop() if with_records and len(json_keys) == 1 else None
        text = (_jsonl(rows, escaped) if kind == "jsonl" else _csv(rows) if kind == "csv"
                else _json(rows, all(escaped), json_key))
        data = text.encode("utf-8")
        if fmt.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def _dumps(value: Any, ascii_escaped: bool, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=ascii_escaped, default=json_default, **kwargs)


def _jsonl(rows: list[dict[str, Any]], escaped: list[bool]) -> str:
    return "".join(_dumps(row, ascii_escaped) + "\n" for row, ascii_escaped in zip(rows, escaped))


def _json(rows: list[dict[str, Any]], ascii_escaped: bool, json_key: str | None) -> str:
    return _dumps({json_key: rows} if json_key else rows, ascii_escaped, indent=2) + "\n"


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = _columns(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    # Lists and objects (chat turns) have no CSV form of their own; JSON keeps them readable and parseable.
    return value if isinstance(value, str) else _dumps(value, False)


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict({column: [row.get(column) for row in rows] for column in _columns(rows)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
