"""Writing a subset back in the user's own format, as a Hugging Face datasets folder, or as the positions of its
rows in the source (``Dataset.select(indices)``), so a selection drops into the user's existing pipeline."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimtune.data.example import Example
from slimtune.utils import atomic_write_bytes, json_default

#: The file types written, by suffix; longer suffixes first so ``.jsonl.gz`` is not taken for ``.gz``.
FORMATS = ("jsonl.gz", "json.gz", "csv.gz", "jsonl", "json", "csv", "parquet")
#: What :func:`save_subset` writes besides these formats: the source's own format, a datasets folder, the
#: source positions as JSON or NumPy.
SAVE_KINDS = ("source", "datasets", "indices", "indices.npy")


def save_kinds(kinds: str | Sequence[str]) -> list[str]:
    """The kinds asked for (``"jsonl,indices"`` or a list), checked before any work is spent."""
    kinds = [kind.strip().lower() for kind in (kinds.split(",") if isinstance(kinds, str) else kinds)]
    unknown = [kind for kind in kinds if kind not in (*SAVE_KINDS, *FORMATS)]
    if unknown or not any(kinds):
        raise ValueError(f"cannot save a subset as {', '.join(unknown) or 'nothing'}; choose from "
                         f"{', '.join((*SAVE_KINDS, *FORMATS))}")
    return kinds


def save_subset(examples: Sequence[Example], out_dir: str | os.PathLike,
                kinds: Sequence[str] = ("source",)) -> list[Path]:
    """Write ``examples`` into ``out_dir`` once per kind and return the paths, in the order asked: ``source``
    (``subset.<the source's suffix>``), a format of :data:`FORMATS` (``subset.csv``), ``datasets``
    (``subset_dataset/``, a ``save_to_disk`` folder), ``indices`` (``indices.json``) or ``indices.npy``."""
    kinds = save_kinds(kinds)
    out = Path(out_dir)
    written = []
    for kind in kinds:
        if kind == "datasets":
            written.append(write_datasets_folder(examples, out / "subset_dataset"))
        elif kind.startswith("indices"):
            written.append(write_indices(examples, out / kind if kind.endswith(".npy") else out / "indices.json"))
        else:
            written.append(write_examples(examples, out / ("subset" if kind == "source" else f"subset.{kind}")))
    return written


def write_examples(examples: Sequence[Example], path: str | os.PathLike) -> Path:
    """Write ``examples`` in order and return the path written.

    Examples read from files are written as their original records, in the type of the file they came from
    (a saved datasets folder becomes JSONL; sources of different types become JSONL). Examples without a
    record (built in code, or from the Tatoeba recipe) are written as ``Example.to_dict()`` rows in JSONL,
    which :func:`slimtune.data.load_examples` reads back with ids and metadata. A suffix in ``path``
    (``subset.csv``) chooses the type; without one (``out/subset``) the source's suffix is added.
    """
    path = Path(path)
    with_records, rows = _rows(examples)
    sources = {ex.metadata.get("format") for ex in examples}
    source_format = sources.pop() if with_records and len(sources) == 1 else None
    requested = next((fmt for fmt in FORMATS if path.name.lower().endswith(f".{fmt}")), None)
    fmt = requested or (source_format if source_format in FORMATS else "jsonl")
    if requested is None:
        path = path.with_name(f"{path.name}.{fmt}")
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


def write_datasets_folder(examples: Sequence[Example], path: str | os.PathLike) -> Path:
    """The records (as :func:`write_examples` chooses them) as a ``save_to_disk`` folder, which
    ``datasets.load_from_disk`` and :func:`slimtune.data.load_examples` read; replaced whole, never half-written."""
    from datasets import Dataset

    path = Path(path)
    _, rows = _rows(examples)
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    Dataset.from_dict({column: [row.get(column) for row in rows] for column in _columns(rows)}).save_to_disk(
        str(partial))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)
    return path


def write_indices(examples: Sequence[Example], path: str | os.PathLike) -> Path:
    """Each example's position in its source, in order, as a JSON list (``.json``) or an int64 array
    (``.npy``): ``dataset.select(indices)`` on the source read by ``datasets`` gives the subset."""
    path = Path(path)
    sources = {ex.metadata.get("file") for ex in examples}
    missing = next((ex for ex in examples if "row" not in ex.metadata), None)
    if len(sources) > 1 or missing is not None:
        why = (f"example {missing.id} has no position in a source" if missing is not None
               else f"the examples come from {len(sources)} sources")
        raise ValueError(f"cannot write {path.name}: indices are positions in one source, but {why}; save the "
                         "subset as records instead (source, jsonl or datasets)")
    positions = [int(ex.metadata["row"]) for ex in examples]
    if path.suffix == ".npy":
        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, np.asarray(positions, dtype=np.int64))
        data = buffer.getvalue()
    else:
        data = (json.dumps(positions) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def _rows(examples: Sequence[Example]) -> tuple[bool, list[dict[str, Any]]]:
    """Whether every example has its original record, and the rows to write: those records, else
    ``Example.to_dict()`` rows (which :func:`slimtune.data.load_examples` reads back with ids and metadata)."""
    with_records = all(ex.record is not None for ex in examples)
    return with_records, [ex.record if with_records else ex.to_dict() for ex in examples]


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
