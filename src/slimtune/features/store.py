"""The feature store: named 2-D arrays kept as row-range shards of ``.npy`` files, memory-mapped on read.

Everything expensive that slimtune computes per example (gradient features, kernel rows) goes through here,
so caching, resuming, sharding across processes and streaming larger-than-RAM data are solved once:

- **keyed**: :meth:`FeatureStore.keyed` maps a key (pool hash, model, checkpoint, feature settings; any JSON)
  to a directory under a root (``slimtune.models.cache_dir() / "features"`` by default), so a repeated run
  with the same key finds its arrays and computes nothing;
- **atomic**: a shard ``<name>/<lo>-<hi>.npy`` holds rows lo..hi of array ``name``; it is written to a
  temporary file and renamed, then its manifest ``<lo>-<hi>.json`` is written the same way. A shard exists
  when its manifest does, so a process killed mid-write leaves nothing that is read back;
- **resumable**: :meth:`FeatureStore.fill` computes only the shards whose manifests are missing;
- **rank-sharded**: under ``torchrun`` / ``accelerate launch`` (``torch.distributed`` initialised, or the
  ``RANK`` / ``WORLD_SIZE`` environment) shard i is computed by rank i % world; every rank then waits until
  all shards exist. Shard boundaries do not depend on the number of processes, so the merged store is the
  store a single process writes;
- **streaming**: :meth:`FeatureStore.open` returns a :class:`ShardedArray`, a lazily concatenated view of
  memory-mapped shards; :func:`chunked_matmul` and :func:`chunked_matmul_topk` read it a chunk of rows at a
  time, so selection works on a pool whose features exceed RAM.

Arrays are generic (any dtype, any width, any row ranges), so a kernel's row blocks fit as well as features.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slimtune.utils import atomic_write_bytes, write_json

#: Rows of a ShardedArray read into memory at once by the chunked operations.
DEFAULT_CHUNK_ROWS = 8192


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when initialised, else the launcher's env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def key_digest(key: Mapping[str, Any]) -> str:
    canon = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class Shard:
    name: str
    lo: int
    hi: int
    path: Path


class FeatureStore:
    """A directory of named, row-sharded arrays. See the module docstring for the guarantees."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def keyed(cls, key: Mapping[str, Any], root: str | os.PathLike | None = None) -> FeatureStore:
        """The store for ``key`` under ``root``; ``key["kind"]`` (if any) prefixes the directory name."""
        if root is None:
            from slimtune.models import cache_dir

            root = cache_dir() / "features"
        path = Path(root) / f"{key.get('kind', 'features')}-{key_digest(key)}"
        store = cls(path)
        if not (path / "key.json").exists():
            write_json(path / "key.json", dict(key))
        return store

    @property
    def key(self) -> dict[str, Any]:
        file = self.path / "key.json"
        return json.loads(file.read_text()) if file.exists() else {}

    # -- writing -------------------------------------------------------------------------------------------
    def _stem(self, name: str, lo: int, hi: int) -> Path:
        return self.path / name / f"{lo:012d}-{hi:012d}"

    def has(self, name: str, lo: int, hi: int) -> bool:
        return self._stem(name, lo, hi).with_suffix(".json").exists()

    def write(self, name: str, lo: int, hi: int, array: np.ndarray | Tensor, **meta: Any) -> None:
        """Store rows ``lo..hi`` of array ``name`` (its first axis must have hi - lo entries)."""
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array)
        if array.shape[0] != hi - lo:
            raise ValueError(f"shard {name}[{lo}:{hi}] needs {hi - lo} rows, got {array.shape[0]}")
        stem = self._stem(name, lo, hi)
        stem.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(stem.with_suffix(".npy"), buffer.getvalue())
        write_json(stem.with_suffix(".json"), {"name": name, "lo": lo, "hi": hi, "shape": list(array.shape),
                                               "dtype": str(array.dtype), **meta})

    def fill(self, names: Sequence[str], n_rows: int, shard_rows: int,
             compute: Callable[[int, int], Mapping[str, np.ndarray | Tensor]], *,
             timeout: float | None = None) -> dict[str, int]:
        """Make arrays ``names`` hold rows 0..n_rows, computing ``compute(lo, hi) -> {name: rows}`` for every
        missing shard of ``shard_rows`` rows that belongs to this rank, then waiting for the other ranks'.

        Returns counts of shards ``computed`` here and ``reused`` from an earlier run or another rank.
        """
        rank, world = distributed_rank_world()
        bounds = [(lo, min(n_rows, lo + shard_rows)) for lo in range(0, n_rows, shard_rows)]
        computed = 0
        for i, (lo, hi) in enumerate(bounds):
            if i % world != rank or all(self.has(name, lo, hi) for name in names):
                continue
            arrays = compute(lo, hi)
            for name in names:
                self.write(name, lo, hi, arrays[name])
            computed += 1
        if world > 1:
            self._wait(bounds, names, timeout)
        return {"computed": computed, "reused": len(bounds) - computed}

    def _wait(self, bounds: list[tuple[int, int]], names: Sequence[str], timeout: float | None) -> None:
        """Block until every shard exists: a collective barrier when a process group is up (ranks finish
        together), then polling the file system, which also serves launchers without a process group."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(self.has(name, lo, hi) for name in names for lo, hi in bounds):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"other ranks did not finish the shards of {self.path} in {timeout} s")
            time.sleep(0.2)

    # -- reading -------------------------------------------------------------------------------------------
    def shards(self, name: str) -> list[Shard]:
        """The committed shards of ``name``, ordered by first row."""
        folder = self.path / name
        if not folder.is_dir():
            return []
        found = []
        for manifest in folder.glob("*.json"):
            lo, hi = (int(part) for part in manifest.stem.split("-"))
            found.append(Shard(name, lo, hi, manifest.with_suffix(".npy")))
        return sorted(found, key=lambda s: s.lo)

    def open(self, name: str, rows: int | None = None) -> ShardedArray:
        """A lazily concatenated view of ``name``; its shards must tile rows 0..n (0..``rows`` if given)."""
        shards = self.shards(name)
        expected = 0
        for shard in shards:
            if shard.lo != expected:
                raise ValueError(f"{self.path / name}: rows {expected}..{shard.lo} are missing")
            expected = shard.hi
        if not shards or (rows is not None and expected != rows):
            raise ValueError(f"{self.path / name} holds {expected} rows, expected {rows}")
        return ShardedArray([np.load(s.path, mmap_mode="r") for s in shards])


class ShardedArray:
    """Row-wise concatenation of memory-mapped parts; indexing reads only the rows it returns."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi as one in-memory array."""
        lo, hi = max(0, lo), min(len(self), hi)
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        pieces = []
        while lo < hi:
            start = self.starts[first]
            take = min(hi, self.starts[first + 1])
            pieces.append(self.parts[first][lo - start:take - start])
            lo, first = take, first + 1
        return np.concatenate(pieces) if pieces else np.empty((0, *self.shape[1:]), self.dtype)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(len(self))
            return self.rows(start, stop)
        picked = np.arange(len(self))[index]
        flat = np.atleast_1d(picked)
        out = np.empty((len(flat), *self.shape[1:]), self.dtype)
        part_of = np.searchsorted(self.starts, flat, side="right") - 1
        for part in np.unique(part_of):
            mine = part_of == part
            out[mine] = self.parts[part][flat[mine] - self.starts[part]]
        return out[0] if np.ndim(picked) == 0 else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.rows(0, len(self))
        return whole if dtype is None else whole.astype(dtype)

    def chunks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(lo, rows lo..lo + chunk_rows)`` over the whole array."""
        for lo in range(0, len(self), chunk_rows):
            yield lo, self.rows(lo, lo + chunk_rows)


def _as_tensor(rows: np.ndarray | Tensor, device: torch.device | str | None) -> Tensor:
    tensor = torch.as_tensor(np.asarray(rows)) if not isinstance(rows, Tensor) else rows
    return tensor.to(device=device, dtype=torch.float32)


def _chunks(a: ShardedArray | np.ndarray | Tensor, chunk_rows: int,
            ) -> Iterator[tuple[int, np.ndarray | Tensor]]:
    if isinstance(a, ShardedArray):
        yield from a.chunks(chunk_rows)
    else:
        for lo in range(0, len(a), chunk_rows):
            yield lo, a[lo:lo + chunk_rows]


def chunked_matmul(a: ShardedArray | np.ndarray | Tensor, b: np.ndarray | Tensor, *,
                   reduce: Callable[[Tensor], Tensor] | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                   device: torch.device | str | None = None) -> Tensor:
    """``reduce(a @ b.T)`` computed ``chunk_rows`` rows of ``a`` at a time (float32, on the CPU).

    ``reduce`` maps a (rows, len(b)) block to a per-row result (e.g. a weighted mean over target columns),
    so only the reduced output, not the full similarity matrix, is ever held.
    """
    other = _as_tensor(b, device)
    out = []
    for _, rows in _chunks(a, chunk_rows):
        block = _as_tensor(rows, device) @ other.T
        out.append((reduce(block) if reduce is not None else block).cpu())
    return torch.cat(out)


def chunked_matmul_topk(a: ShardedArray | np.ndarray | Tensor, b: np.ndarray | Tensor, k: int, *,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS, device: torch.device | str | None = None,
                        ) -> tuple[Tensor, Tensor]:
    """For every row of ``b``, the ``k`` rows of ``a`` with the largest inner product: ``(values, indices)``,
    both (len(b), k), best first. Reads ``a`` a chunk at a time and keeps only a running top-k."""
    other = _as_tensor(b, device)
    k = min(k, len(a))
    best_values = torch.full((len(other), 0), -torch.inf, device=other.device)
    best_index = torch.zeros((len(other), 0), dtype=torch.long, device=other.device)
    for lo, rows in _chunks(a, chunk_rows):
        block = other @ _as_tensor(rows, device).T  # (len(b), chunk)
        index = torch.arange(lo, lo + block.shape[1], device=other.device).expand_as(block)
        values = torch.cat([best_values, block], dim=1)
        merged = torch.cat([best_index, index], dim=1)
        # stable sort keeps the lower row first among ties, as a full sort of the whole matrix would
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
        best_values, best_index = values.gather(1, order), merged.gather(1, order)
    return best_values.cpu(), best_index.cpu()
