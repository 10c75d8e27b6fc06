"""The feature store: named 2-D arrays kept as row-range shards of ``.npy`` files, memory-mapped on read.

Everything expensive that slimtune computes per example (gradient features, kernel rows) goes through here,
so caching, resuming, sharding across processes and streaming larger-than-RAM data are solved once:

- **keyed**: :meth:`FeatureStore.keyed` maps a key (pool hash, model, checkpoint, feature settings; any JSON)
  to a directory under a root (``slimtune.models.cache_dir() / "features"`` by default), so a repeated run
  with the same key finds its arrays and computes nothing;
- **atomic**: a shard ``<name>/<lo>-<hi>.npy`` holds rows lo..hi of array ``name``; it is written to a
  temporary file and renamed, then its manifest ``<lo>-<hi>.json`` is written the same way. A shard exists
  when its manifest does, so a process killed mid-write leaves nothing that is read back;
- **verified**: the manifest records the shard's shape, dtype, byte size and the CRC-32 of the whole file.
  Every read checks the size and the ``.npy`` header against it (a ``stat`` and one small read per shard);
  the checksum is checked the first time a process uses a shard (by :meth:`FeatureStore.fill`, or on first
  mapping by :meth:`FeatureStore.open`), remembered for the file's (size, mtime, inode) and not repeated.
  That costs one extra sequential read of the store per process: zlib's CRC-32 runs at 1.5-2 GB/s on one
  core here, about disk speed and ~4x blake2b, and a cache is not a trust boundary, so a 32-bit check for
  accidental damage (torn copies, bit rot, a truncating disk-full) is what is needed, not a cryptographic
  hash. A bad shard is never used: ``fill`` logs a warning naming the file, discards and recomputes it;
  ``open`` raises :class:`CorruptShardError` naming it (the next ``fill`` recomputes it). Manifests written
  before checksums existed are still read, checked by header and size only (recomputing LESS features costs
  hours; those files were written by the same atomic path);
- **resumable**: :meth:`FeatureStore.fill` computes only the shards that are missing or bad;
- **claimed**: under ``torchrun`` / ``accelerate launch`` (``torch.distributed`` initialised, or the
  ``RANK`` / ``WORLD_SIZE`` environment) every rank claims missing shards one at a time with a claim file
  created by ``O_EXCL`` (rank, pid, host, time), so a run resumed at any world size spreads what is left over
  the ranks it has now. A claim whose process died (pid gone, on this host) or, from another host, older
  than the timeout is taken over. Claims only spread the work: shards are deterministic and written
  atomically, so the rare double computation a takeover race allows costs time, never correctness. Every
  rank returns from ``fill`` only when all shards exist; waiting has a timeout (``SLIMTUNE_STORE_TIMEOUT``
  seconds, default :data:`DEFAULT_TIMEOUT`) whose error names the rank, the shard and its claimant. Shard
  boundaries do not depend on the number of processes, so the merged store is the store one process writes;
- **progress**: rank 0 logs rows/s and ETA on the ``slimtune.store`` logger (INFO, silent unless a handler
  is configured), each record carrying a :class:`FillProgress` as ``record.fill_progress`` for a display;
- **streaming**: :meth:`FeatureStore.open` returns a :class:`ShardedArray`, a lazily concatenated view that
  maps shards on demand and keeps at most :data:`MAX_OPEN_SHARDS` mapped (one file descriptor each), so a
  store of any number of shards opens under a small ``ulimit -n``; :func:`chunked_matmul` and
  :func:`chunked_matmul_topk` read it a chunk of rows at a time, so selection works on a pool whose features
  exceed RAM.

Arrays are generic (any dtype, any width, any row ranges), so a kernel's row blocks fit as well as features.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slimtune.progress import stage
from slimtune.utils import (
    atomic_write_bytes,
    checksum_matches,
    distributed_rank_world,
    remember_verified,
    write_json,
)

log = logging.getLogger("slimtune.store")

#: Rows of a ShardedArray read into memory at once by the chunked operations.
DEFAULT_CHUNK_ROWS = 8192
#: Shards a ShardedArray keeps mapped at once (each mapping holds a file descriptor).
MAX_OPEN_SHARDS = 64
#: Seconds a rank waits for a shard claimed by another process before giving up (SLIMTUNE_STORE_TIMEOUT).
DEFAULT_TIMEOUT = 3600.0
#: Seconds between rank 0's progress records.
PROGRESS_EVERY = 30.0
_POLL = 0.2
_UNREADABLE_CLAIM = 10.0

#: path -> (size, mtime_ns, inode) of shard files whose checksum this process has verified


def store_timeout() -> float:
    """The wait timeout in seconds: ``SLIMTUNE_STORE_TIMEOUT`` if set, else :data:`DEFAULT_TIMEOUT`."""
    value = os.environ.get("SLIMTUNE_STORE_TIMEOUT")
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"SLIMTUNE_STORE_TIMEOUT={value!r} is not a number of seconds") from None


def key_digest(key: Mapping[str, Any]) -> str:
    canon = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:20]


class CorruptShardError(ValueError):
    """Shards that failed verification; ``problems`` maps each data file to what is wrong with it."""

    def __init__(self, problems: Mapping[Path, str]):
        self.problems = dict(problems)
        listed = "; ".join(f"{path}: {problem}" for path, problem in list(self.problems.items())[:5])
        more = f" (and {len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(f"bad feature-store shard(s): {listed}{more}. They are not used: rerun the command "
                         "to recompute them, or remove them with `slimtune cache verify --fix`")


@dataclass(frozen=True)
class Shard:
    name: str
    lo: int
    hi: int
    path: Path

    @property
    def manifest(self) -> Path:
        return self.path.with_suffix(".json")


@dataclass(frozen=True)
class _Layout:
    """Where a verified shard's rows lie in its file."""
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    crc32: int | None  # None in manifests written before checksums


@dataclass(frozen=True)
class FillProgress:
    """What :meth:`FeatureStore.fill` reports on rank 0 (``seconds_left`` is None until a rate is known)."""
    store: Path
    names: tuple[str, ...]
    rows_done: int
    rows_total: int
    rows_per_second: float
    seconds_left: float | None


def inspect_shard(shard: Shard, *, checksum: bool) -> tuple[_Layout | None, str | None]:
    """``(layout, None)`` for a good shard, ``(None, problem)`` otherwise: manifest readable, data file
    present with the recorded size, ``.npy`` header matching the manifest's shape and dtype and the file
    long enough for it, and (``checksum``) the file's CRC-32 equal to the manifest's. A checksum verified
    once by this process is not recomputed while the file's size, mtime and inode stay the same."""
    try:
        manifest = json.loads(shard.manifest.read_text())
        shape, dtype = tuple(manifest["shape"]), np.dtype(manifest["dtype"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"unreadable manifest {shard.manifest.name} ({err})"
    try:
        stat = shard.path.stat()
    except FileNotFoundError:
        return None, "data file missing"
    if stat.st_size == 0:
        return None, "empty file (0 bytes)"
    if "bytes" in manifest and stat.st_size != manifest["bytes"]:
        return None, f"{stat.st_size} bytes, the manifest says {manifest['bytes']}"
    try:
        with open(shard.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found_shape, fortran, found_dtype = read_header(fh)
            offset = fh.tell()
    except (OSError, ValueError, EOFError) as err:
        return None, f"unreadable .npy header ({err})"
    if found_shape != shape or found_dtype != dtype or fortran:
        return None, (f"header says {found_dtype}{list(found_shape)}{' (Fortran order)' if fortran else ''}, "
                      f"the manifest {dtype}{list(shape)}")
    if not shape or shape[0] != shard.hi - shard.lo:
        return None, f"holds {shape[0] if shape else 0} rows, its name says {shard.hi - shard.lo}"
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if stat.st_size != expected:
        return None, f"short file: {stat.st_size} of {expected} bytes"
    layout = _Layout(offset, shape, dtype, manifest.get("crc32"))
    problem = checksum_problem(shard.path, layout.crc32) if checksum else None
    return (None, problem) if problem else (layout, None)


def checksum_problem(path: Path, crc32: int | None) -> str | None:
    """None when ``path``'s CRC-32 is ``crc32`` (or none was recorded), else the mismatch; a process checks a
    file once (:func:`slimtune.utils.checksum_matches`)."""
    if crc32 is None or checksum_matches(path, crc32):
        return None
    return "checksum mismatch (the bytes changed after they were written)"


class FeatureStore:
    """A directory of named, row-sharded arrays. See the module docstring for the guarantees."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        #: data files this object found bad, discarded and recomputed, in the order found
        self.discarded: list[Path] = []

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

    @classmethod
    @contextmanager
    def cached(cls, key: Mapping[str, Any], cache: bool | str | os.PathLike = True) -> Iterator[FeatureStore]:
        """The store for ``key`` as a caller's ``cache`` argument asks: True for the slimtune cache, a folder for
        a store root elsewhere, False for a store in a temporary folder, gone when the block ends (arrays read
        from it stay valid: their memory maps outlive the files' names)."""
        if cache is False:
            import tempfile

            with tempfile.TemporaryDirectory(prefix=f"slimtune-{key.get('kind', 'features')}-") as tmp:
                yield cls(tmp)
        else:
            yield cls.keyed(key, None if cache is True else cache)

    @property
    def key(self) -> dict[str, Any]:
        file = self.path / "key.json"
        return json.loads(file.read_text()) if file.exists() else {}

    def _shard(self, name: str, lo: int, hi: int) -> Shard:
        return Shard(name, lo, hi, self.path / name / f"{lo:012d}-{hi:012d}.npy")

    # -- writing -------------------------------------------------------------------------------------------
    def has(self, name: str, lo: int, hi: int) -> bool:
        """Whether shard ``name[lo:hi]`` was committed (its manifest exists); :meth:`verify` checks it."""
        return self._shard(name, lo, hi).manifest.exists()

    def verify(self, name: str, lo: int, hi: int, *, checksum: bool = True) -> str | None:
        """None when shard ``name[lo:hi]`` is committed and sound, else what is wrong with it."""
        shard = self._shard(name, lo, hi)
        if not shard.manifest.exists():
            return "missing"
        return inspect_shard(shard, checksum=checksum)[1]

    def discard(self, name: str, lo: int, hi: int) -> None:
        """Remove shard ``name[lo:hi]``: manifest first, so it stops existing before its data goes."""
        shard = self._shard(name, lo, hi)
        shard.manifest.unlink(missing_ok=True)
        shard.path.unlink(missing_ok=True)

    def write(self, name: str, lo: int, hi: int, array: np.ndarray | Tensor, **meta: Any) -> None:
        """Store rows ``lo..hi`` of array ``name`` (its first axis must have hi - lo entries)."""
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()
        array = np.ascontiguousarray(array)
        if array.shape[0] != hi - lo:
            raise ValueError(f"shard {name}[{lo}:{hi}] needs {hi - lo} rows, got {array.shape[0]}")
        shard = self._shard(name, lo, hi)
        shard.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
        atomic_write_bytes(shard.path, data)
        write_json(shard.manifest, {"name": name, "lo": lo, "hi": hi, "shape": list(array.shape),
                                    "dtype": str(array.dtype), "bytes": len(data), "crc32": zlib.crc32(data),
                                    **meta})
        remember_verified(shard.path)

    def fill(self, names: Sequence[str], n_rows: int, shard_rows: int,
             compute: Callable[[int, int], Mapping[str, np.ndarray | Tensor]], *,
             timeout: float | None = None) -> dict[str, int]:
        """Make arrays ``names`` hold rows 0..n_rows in shards of ``shard_rows`` rows: every rank claims
        missing or bad shards one at a time and computes ``compute(lo, hi) -> {name: rows}`` for them, then
        waits until the other ranks' claims are written (``timeout`` seconds without progress, default
        :func:`store_timeout`). Existing shards are verified (checksums included) before they count.

        Returns counts of shards ``computed`` here and ``reused`` from an earlier run or another rank.
        """
        rank, world = distributed_rank_world()
        timeout = store_timeout() if timeout is None else timeout
        bounds = [(lo, min(n_rows, lo + shard_rows)) for lo in range(0, n_rows, shard_rows)]
        if world > 1:  # ranks start at different shards, so they rarely contend for the same claim
            start = rank * len(bounds) // world
            bounds = bounds[start:] + bounds[:start]
        pending = []
        for lo, hi in bounds:
            if self._sound(names, lo, hi):
                _drop_stale_claim(self._claim_path(names, lo, hi), timeout)
            else:
                pending.append((lo, hi))
        progress = _ProgressLog(self.path, tuple(names), n_rows, n_rows - sum(hi - lo for lo, hi in pending),
                                enabled=rank == 0)
        computed, last_progress = 0, time.monotonic()
        label = f"{self.key.get('kind', self.path.name)} ({'+'.join(names)})"
        with stage(label, total=sum(hi - lo for lo, hi in pending), unit="rows") if pending else nullcontext() \
                as shown:
            while pending:
                left, busy = [], None
                for lo, hi in pending:
                    outcome = self._settle(names, lo, hi, compute, rank, timeout)
                    if isinstance(outcome, dict):  # another live process is computing it
                        left.append((lo, hi))
                        busy = busy or ((lo, hi), outcome)
                        continue
                    computed += outcome
                    progress.done(hi - lo)
                    shown.advance(hi - lo)
                    last_progress = time.monotonic()
                if left and len(left) == len(pending):  # nothing moved in this pass: wait for the claimants
                    if time.monotonic() - last_progress > timeout:
                        (lo, hi), claim = busy
                        raise TimeoutError(
                            f"rank {rank} waited {timeout:.0f} s for shard {names[0]}[{lo}:{hi}] of {self.path}, "
                            f"claimed by {_describe(claim)}; if that process is gone, delete "
                            f"{self._claim_path(names, lo, hi)}, or raise SLIMTUNE_STORE_TIMEOUT")
                    time.sleep(_POLL)
                pending = left
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # no rank reads the store while another may still discard a bad shard it found
            torch.distributed.barrier()
        return {"computed": computed, "reused": len(bounds) - computed}

    def _sound(self, names: Sequence[str], lo: int, hi: int) -> bool:
        return all(self.verify(name, lo, hi) is None for name in names)

    def _settle(self, names: Sequence[str], lo: int, hi: int,
                compute: Callable[[int, int], Mapping[str, np.ndarray | Tensor]], rank: int,
                timeout: float) -> int | dict:
        """Make shard lo..hi of ``names`` sound: 0 if it is (written by someone else), 1 if computed here,
        or the claim of the live process that is computing it."""
        claim = self._claim_path(names, lo, hi)
        if self._sound(names, lo, hi):
            _drop_stale_claim(claim, timeout)
            return 0
        claim.parent.mkdir(parents=True, exist_ok=True)
        holder = _claim(claim, rank, timeout)
        if holder is not None:
            return holder
        try:
            self._drop_torn_writes(names, lo, hi)  # the claim is ours: no live process is writing this shard
            problems = {name: self.verify(name, lo, hi) for name in names}  # again, now that it is ours
            if all(problem is None for problem in problems.values()):
                return 0
            for name, problem in problems.items():
                if problem not in (None, "missing"):
                    shard = self._shard(name, lo, hi)
                    log.warning("%s: %s; discarded and recomputed", shard.path, problem)
                    self.discarded.append(shard.path)
                    self.discard(name, lo, hi)
            arrays = compute(lo, hi)
            for name in names:
                self.write(name, lo, hi, arrays[name])
            return 1
        finally:
            claim.unlink(missing_ok=True)

    def _drop_torn_writes(self, names: Sequence[str], lo: int, hi: int) -> None:
        """Remove the temporary files (``.NAME.tmpPID``, see :func:`slimtune.utils.atomic_write_bytes`) of a
        shard's writes that a killed process left half done; a file as large as the shard would stay forever."""
        for name in names:
            shard = self._shard(name, lo, hi)
            for stem in (shard.path.name, shard.manifest.name):
                for torn in shard.path.parent.glob(f".{stem}.tmp*"):
                    torn.unlink(missing_ok=True)

    def _claim_path(self, names: Sequence[str], lo: int, hi: int) -> Path:
        return self._shard(names[0], lo, hi).path.with_suffix(".claim")

    # -- reading -------------------------------------------------------------------------------------------
    def shards(self, name: str) -> list[Shard]:
        """The committed shards of ``name``, ordered by first row."""
        folder = self.path / name
        if not folder.is_dir():
            return []
        found = []
        for manifest in folder.glob("*-*.json"):
            lo, hi = (int(part) for part in manifest.stem.split("-"))
            found.append(Shard(name, lo, hi, manifest.with_suffix(".npy")))
        return sorted(found, key=lambda s: s.lo)

    def open(self, name: str, rows: int | None = None, *, max_open: int = MAX_OPEN_SHARDS) -> ShardedArray:
        """A lazily concatenated view of ``name``; its shards must tile rows 0..n (0..``rows`` if given).

        Every shard's size and header are checked now; its checksum the first time it is mapped (unless this
        process verified it already). A bad shard raises :class:`CorruptShardError` naming its file.
        """
        shards = self.shards(name)
        expected = 0
        for shard in shards:
            if shard.lo != expected:
                raise ValueError(f"{self.path / name}: rows {expected}..{shard.lo} are missing")
            expected = shard.hi
        if not shards or (rows is not None and expected != rows):
            raise ValueError(f"{self.path / name} holds {expected} rows, expected {rows}")
        layouts, problems = [], {}
        for shard in shards:
            layout, problem = inspect_shard(shard, checksum=False)
            if problem is not None:
                problems[shard.path] = problem
            layouts.append(layout)
        if problems:
            raise CorruptShardError(problems)
        tails = {(layout.shape[1:], layout.dtype) for layout in layouts}
        if len(tails) > 1:
            raise ValueError(f"{self.path / name}: shards disagree on row shape or dtype: {sorted(map(str, tails))}")
        return ShardedArray(shards, layouts, max_open=max_open)


def _claim(path: Path, rank: int, stale_after: float) -> dict | None:
    """Create the claim file ``path`` (None: it is ours), or return the live claim that holds it; a stale
    claim (see :func:`_stale`) is removed and retaken."""
    mine = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text, age = path.read_text(), time.time() - path.stat().st_mtime
            except FileNotFoundError:  # released between our two looks
                continue
            try:
                holder = json.loads(text)
            except ValueError:  # being written this instant
                holder = {}
            if not _stale(holder, age, stale_after):
                return holder or {"file": str(path)}
            log.info("%s: taking over the claim of %s", path, _describe(holder))
            try:
                if path.read_text() == text:  # nobody retook it since we looked
                    path.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(mine, fh)
        return None
    return {"file": str(path), "note": "contended"}


def _drop_stale_claim(path: Path, stale_after: float) -> None:
    """Remove the claim beside a sound shard when its process is gone: one killed after writing the shard but
    before removing its claim would otherwise leave it for good (nothing settles a sound shard again)."""
    try:
        text, age = path.read_text(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    if _stale(holder, age, stale_after):
        path.unlink(missing_ok=True)


def _stale(holder: Mapping[str, Any], age: float, stale_after: float) -> bool:
    """On this host a claim is stale exactly when its process is gone; from another host (whose processes
    cannot be seen) when it is older than ``stale_after`` seconds; unreadable (its writer died between
    creating and filling it, a matter of microseconds) after :data:`_UNREADABLE_CLAIM` seconds."""
    if not holder:
        return age > _UNREADABLE_CLAIM
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return age > stale_after
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _describe(claim: Mapping[str, Any]) -> str:
    if "pid" not in claim:
        return f"a claim being written ({claim.get('file', '?')})"
    since = time.strftime("%H:%M:%S", time.localtime(claim.get("time", 0)))
    return f"rank {claim.get('rank')} (pid {claim['pid']} on {claim.get('host')}) since {since}"


class _ProgressLog:
    """Rows/s and ETA of a fill on the ``slimtune.store`` logger, every :data:`PROGRESS_EVERY` seconds."""

    def __init__(self, store: Path, names: tuple[str, ...], total: int, already: int, *, enabled: bool):
        self.store, self.names, self.total, self.done_rows = store, names, total, already
        self.already, self.enabled = already, enabled
        self.start = self.last = time.monotonic()

    def done(self, rows: int) -> None:
        self.done_rows += rows
        now = time.monotonic()
        if not self.enabled or (now - self.last < PROGRESS_EVERY and self.done_rows < self.total):
            return
        self.last = now
        rate = (self.done_rows - self.already) / max(now - self.start, 1e-9)
        left = (self.total - self.done_rows) / rate if rate > 0 else None
        report = FillProgress(self.store, self.names, self.done_rows, self.total, rate, left)
        eta = "" if left is None else f", ETA {left / 60:.1f} min"
        log.info("%s %s: %d/%d rows, %.1f rows/s%s", self.store.name, "+".join(self.names), self.done_rows,
                 self.total, rate, eta, extra={"fill_progress": report})


class ShardedArray:
    """Row-wise concatenation of a store's shards; indexing reads only the rows it returns. Shards are
    mapped on first use and at most ``max_open`` stay mapped (least recently used unmapped first)."""

    def __init__(self, shards: Sequence[Shard], layouts: Sequence[_Layout], *, max_open: int = MAX_OPEN_SHARDS):
        self.shards, self.layouts = list(shards), list(layouts)
        self.starts = np.cumsum([0] + [layout.shape[0] for layout in layouts])
        self.shape = (int(self.starts[-1]), *layouts[0].shape[1:])
        self.dtype = layouts[0].dtype
        self.max_open = max_open
        self._mapped: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.shape[0]

    def part(self, index: int) -> np.ndarray:
        """Shard ``index`` memory-mapped (its checksum verified on this process's first use)."""
        if index in self._mapped:
            self._mapped.move_to_end(index)
            return self._mapped[index]
        shard, layout = self.shards[index], self.layouts[index]
        try:
            problem = checksum_problem(shard.path, layout.crc32)
        except FileNotFoundError:
            problem = "data file missing"
        if problem is not None:
            raise CorruptShardError({shard.path: problem})
        mapped = np.memmap(shard.path, layout.dtype, mode="r", offset=layout.offset, shape=layout.shape)
        self._mapped[index] = mapped
        while len(self._mapped) > self.max_open:
            self._mapped.popitem(last=False)
        return mapped

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi as one in-memory array."""
        lo, hi = max(0, lo), min(len(self), hi)
        out = np.empty((max(0, hi - lo), *self.shape[1:]), self.dtype)
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        at = lo
        while at < hi:
            start = self.starts[first]
            take = min(hi, self.starts[first + 1])
            # copied out, so no view keeps an unmapped shard's file open
            out[at - lo:take - lo] = self.part(first)[at - start:take - start]
            at, first = take, first + 1
        return out

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
            out[mine] = self.part(int(part))[flat[mine] - self.starts[part]]
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
