"""A pool kept as a memory-mapped Arrow file: an ``Example`` is made only when a row is read.

A pool held as Python ``Example`` objects costs about 2.2 KB a row in every process (measured on the scale
benchmark's short rows: 2.2 GB at a million rows, 22 GB at ten million, per rank). :class:`ExampleTable` keeps
the rows in an Arrow IPC file instead and reads them through a memory map, so resident memory is the pages
read lately, which the kernel drops under pressure: RAM does not grow with the pool. Three columns:

- ``id``: the example ids (the manifest's and the writers' ids, read without building any Example);
- ``messages``: the conversation as ``{"role", "content"}`` structs, the very column tokenising reads
  (:func:`slimtune.data.tokenize.tokenize_pool`), so the token ids are made without any Example either;
- ``example``: the pickled Example, so a row read back is the object that was written, metadata and the
  untouched input record included, whatever their types (a Parquet date stays a date).

The file lives in a private folder under the slimtune cache and is unlinked as soon as it is mapped (Linux
keeps a mapped file's pages until the map goes), so neither a finished run nor a crash leaves it behind.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate

import pyarrow as pa

from slimtune.data.example import Example, pool_hash
from slimtune.utils import cache_dir

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA = pa.schema([("id", pa.string()), ("messages", MESSAGES_TYPE), ("example", pa.binary())])
#: Rows per record batch: a batch's Examples are all that is held in Python at once while writing.
BATCH_ROWS = 4096


class ExampleTable(Sequence[Example]):
    """A read-only sequence of Examples backed by an Arrow table (module docstring). Indexing with an int
    makes that row's Example; a slice makes a plain list of them (so ``table[:8] + other`` works as for a
    list); :meth:`take` selects rows without making any."""

    def __init__(self, table: pa.Table):
        if table.schema != SCHEMA:
            raise ValueError(f"an example table has the columns {SCHEMA.names} of types {SCHEMA.types}")
        self._table, self._pool_hash = table, None
        self._chunks = table.column("example").chunks
        self._starts = [0, *accumulate(len(chunk) for chunk in self._chunks)][:-1]

    @classmethod
    def write(cls, examples: Iterable[Example], folder: str | os.PathLike | None = None) -> ExampleTable:
        """The examples written to an Arrow file under ``folder`` (default: ``tables/`` in the slimtune
        cache) a batch at a time, then memory-mapped; the file is gone once mapped."""
        with ExampleWriter(folder) as writer:
            for example in examples:
                writer.append(example)
            return writer.finish()

    # ---- the Sequence -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for a pool of {len(self)} rows")
        return self._row(index % len(self))

    def __iter__(self) -> Iterator[Example]:
        for chunk in self._chunks:
            yield from map(pickle.loads, chunk.to_pylist())

    def __add__(self, other: Iterable[Example]) -> list[Example]:
        return [*self, *other]

    def __radd__(self, other: Iterable[Example]) -> list[Example]:
        return [*other, *self]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ExampleTable({len(self):,} rows)"

    def _row(self, index: int) -> Example:
        chunk = bisect.bisect_right(self._starts, index) - 1
        return pickle.loads(self._chunks[chunk][index - self._starts[chunk]].as_py())

    # ---- beyond a list ----------------------------------------------------------------------------------
    def known_pool_hash(self) -> str:
        """:func:`~slimtune.data.example.pool_hash` of the rows, computed once: the rows never change."""
        if self._pool_hash is None:
            self._pool_hash = pool_hash(iter(self))  # an iterator: the plain loop, not this method again
        return self._pool_hash

    @property
    def ids(self) -> list[str]:
        """Every row's id, read from its column."""
        return self._table.column("id").to_pylist()

    @property
    def messages(self) -> pa.ChunkedArray:
        """The conversations as an Arrow column of :data:`MESSAGES_TYPE` (what tokenising maps over)."""
        return self._table.column("messages")

    def take(self, indices: Sequence[int]) -> ExampleTable:
        """The rows at ``indices``, in that order, as a table (the selected rows are copied into memory)."""
        return ExampleTable(self._table.take(pa.array(indices, type=pa.int64())))


class ExampleWriter:
    """Appends Examples to a new Arrow file a batch at a time; :meth:`finish` maps it as an ExampleTable.
    Used as a context manager, a writer left unfinished (an error while reading) removes its file."""

    def __init__(self, folder: str | os.PathLike | None = None):
        folder = cache_dir() / "tables" if folder is None else folder
        os.makedirs(folder, exist_ok=True)
        handle, self._path = tempfile.mkstemp(prefix="pool-", suffix=".arrow", dir=folder)
        os.close(handle)
        self._sink = pa.OSFile(self._path, "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._batch: list[Example] = []
        self.rows = 0

    def append(self, example: Example) -> None:
        self._batch.append(example)
        self.rows += 1
        if len(self._batch) >= BATCH_ROWS:
            self._flush()

    def finish(self) -> ExampleTable:
        self._flush()
        self._writer.close()
        self._sink.close()
        table = pa.ipc.open_file(pa.memory_map(self._path)).read_all()
        self._remove()
        return ExampleTable(table)

    def _flush(self) -> None:
        if not self._batch:
            return
        self._writer.write_batch(pa.record_batch([
            pa.array([ex.id for ex in self._batch], pa.string()),
            pa.array([[{"role": m["role"], "content": m["content"]} for m in ex.messages] for ex in self._batch],
                     MESSAGES_TYPE),
            pa.array([pickle.dumps(ex, protocol=pickle.HIGHEST_PROTOCOL) for ex in self._batch], pa.binary()),
        ], schema=SCHEMA))
        self._batch.clear()

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    def __enter__(self) -> ExampleWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            if not self._sink.closed:
                self._sink.close()
            self._remove()


def take_rows(examples: Sequence[Example], positions: Sequence[int]) -> Sequence[Example]:
    """The rows of ``examples`` at ``positions``: a table of them when ``examples`` is a table, else a list."""
    if isinstance(examples, ExampleTable):
        return examples.take(positions)
    return [examples[i] for i in positions]


def example_ids(examples: Sequence[Example]) -> list[str]:
    """The ids of ``examples``, read from the id column when they are a table."""
    return examples.ids if isinstance(examples, ExampleTable) else [ex.id for ex in examples]


__all__ = ["ExampleTable", "ExampleWriter", "example_ids", "take_rows"]
