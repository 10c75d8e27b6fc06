"""Small shared helpers: atomic writes, seeding, JSON for numpy values."""

from __future__ import annotations

import json
import os
import random
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def file_crc32(path: str | os.PathLike, block_size: int = 1 << 24) -> int:
    """CRC-32 of a whole file, read in blocks: the check for accidental damage of cached files."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(block_size):
            crc = zlib.crc32(block, crc)
    return crc


#: (size, mtime, inode) of every file whose checksum this process has verified: a file is read once.
_verified: dict[str, tuple[int, int, int]] = {}

#: The listing :func:`write_folder_checksums` leaves in a cached folder.
FOLDER_CHECKSUMS = "slimtune_checksums.json"


def remember_verified(path: str | os.PathLike) -> None:
    """Record ``path`` as verified as it is now (a file this process has just written)."""
    stat = os.stat(path)
    _verified[str(path)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def checksum_matches(path: str | os.PathLike, crc32: int) -> bool:
    """Whether ``path``'s CRC-32 is ``crc32``; a file verified once is not read again while its size, mtime
    and inode stay the same."""
    stat = os.stat(path)
    if _verified.get(str(path)) == (stat.st_size, stat.st_mtime_ns, stat.st_ino):
        return True
    if file_crc32(path) != crc32:
        return False
    remember_verified(path)
    return True


def write_folder_checksums(directory: str | os.PathLike) -> None:
    """Size and CRC-32 of every file in a finished cached folder (a model, a LESS warm-up run), for
    :func:`folder_damage` to check before the folder is used again."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != FOLDER_CHECKSUMS)
    write_json(directory / FOLDER_CHECKSUMS, {str(p.relative_to(directory)): {"bytes": p.stat().st_size,
                                                                              "crc32": file_crc32(p)}
                                              for p in files})


def folder_damage(directory: str | os.PathLike) -> str | None:
    """What is wrong with a cached folder (naming the file), or None when its files match their checksums. A
    folder finished before checksums were kept is adopted as it is now."""
    directory = Path(directory)
    listing = directory / FOLDER_CHECKSUMS
    if not listing.exists():
        write_folder_checksums(directory)
        return None
    try:
        files = json.loads(listing.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return f"{listing}: unreadable"
    for name, expected in files.items():
        problem = file_problem(directory / name, expected["bytes"], expected["crc32"])
        if problem is not None:
            return problem
    return None


def file_problem(path: Path, size: int, crc32: int) -> str | None:
    """What is wrong with ``path`` against the size and CRC-32 recorded when it was written, or None."""
    try:
        found = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    if found != size:
        return f"{path}: {found} bytes, {size} written"
    if not checksum_matches(path, crc32):
        return f"{path}: checksum mismatch (the bytes changed after they were written)"
    return None


def write_checked(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically with its size and CRC-32 beside it (``NAME.crc32.json``), for
    :func:`checked_problem` to verify before the file is trusted again (a pickle-free ``torch.load`` checks
    the structure, not the numbers)."""
    path = Path(path)
    atomic_write_bytes(path, data)
    write_json(path.with_name(f"{path.name}.crc32.json"), {"bytes": len(data), "crc32": zlib.crc32(data)})


def checked_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a file written by :func:`write_checked` (naming it), or None; a file written before
    checksums were kept (no record beside it) is trusted."""
    path = Path(path)
    record = path.with_name(f"{path.name}.crc32.json")
    if not record.exists():
        return None
    try:
        expected = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        return f"{record}: unreadable ({err})"
    return file_problem(path, expected["bytes"], expected["crc32"])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, default=json_default))


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_registered(registry: dict[str, str], name: str, kind: str, base: type | None = None) -> Any:
    """The object a ``name -> "module:attr"`` registry names, imported only now (heavy imports stay lazy).

    A name that is not registered but reads ``pkg.module:Class`` loads a method that lives outside slimtune;
    with ``base``, whatever loads must be a dataclass subclass of it (the registries' methods all are).
    """
    import dataclasses
    import importlib

    target = registry.get(name) or (name if ":" in name else None)
    if target is None:
        raise ValueError(f"unknown {kind} '{name}'; known: {', '.join(sorted(registry))}, or "
                         "'pkg.module:Class' for one of your own")
    module, _, attr = target.partition(":")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{kind} '{name}': cannot load {attr!r} from module {module!r}: {err}") from None
    if base is not None and not (isinstance(found, type) and issubclass(found, base)
                                 and dataclasses.is_dataclass(found)):
        raise ValueError(f"{kind} '{name}' is not a dataclass subclass of {base.__module__}.{base.__name__}")
    return found


class UnknownParameters(TypeError):
    """Keys a dataclass has no field for; ``keys`` are dotted from the outermost dataclass
    (``training.lora.rr``) and ``scope`` is the dotted field they were given under ("" at the top)."""

    def __init__(self, cls: type, scope: str, keys: list[str], known: list[str]):
        self.scope, self.keys, self.known = scope, keys, known
        super().__init__(f"{cls.__name__}{f' ({scope})' if scope else ''} has no parameter {', '.join(keys)}; "
                         f"it takes: {', '.join(known) or 'none'}")


def build_dataclass(cls: type, params: Mapping[str, Any],
                    check: Callable[[str, Any, Any], Any] | None = None) -> Any:
    """``cls(**params)``, where a mapping given for a field that holds a dataclass (typed ``X`` or ``X | None``)
    becomes that dataclass, recursively, on top of the field's default: ``{"training": {"lora": {"r": 16}}}``
    changes one number of a nested settings object and keeps the rest, and the plain dicts of a manifest, a
    YAML file or ``--param training.lora.r=16`` come back as the objects they describe. ``check(dotted_key,
    value, type_hint)`` returns every other value as the field takes it (or raises). Unknown keys raise
    :class:`UnknownParameters`."""
    return _build_dataclass(cls, params, None, check, "")


def _build_dataclass(cls: type, params: Mapping[str, Any], base: Any, check, scope: str) -> Any:
    import dataclasses
    import typing

    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise UnknownParameters(cls, scope, [f"{scope}.{key}" if scope else key for key in unknown], sorted(fields))
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation only a type checker can resolve: leave values as given
        hints = {}
    values = {}
    for key, value in params.items():
        hint, dotted = hints.get(key, Any), f"{scope}.{key}" if scope else key
        nested = _dataclass_held(hint)
        if nested is not None and isinstance(value, Mapping):
            start = getattr(base, key) if base is not None else _field_default(fields[key])
            values[key] = _build_dataclass(nested, value, start if isinstance(start, nested) else None, check,
                                           dotted)
        else:
            values[key] = check(dotted, value, hint) if check else value
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _dataclass_held(hint: Any) -> type | None:
    """The dataclass a field typed ``hint`` holds: ``X`` or ``X | None`` with ``X`` a dataclass, else None."""
    import dataclasses
    import types
    import typing

    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    return options[0] if len(options) == 1 and isinstance(options[0], type) and \
        dataclasses.is_dataclass(options[0]) else None


def _field_default(field: Any) -> Any:
    import dataclasses

    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def cache_dir() -> Path:
    """slimtune's cache folder: ``$SLIMTUNE_CACHE``, else ``slimtune`` under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    configured = os.environ.get("SLIMTUNE_CACHE")
    path = Path(configured) if configured else \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimtune"
    path.mkdir(parents=True, exist_ok=True)
    return path


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when initialised, else the launcher's env."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def runs_on_cpu() -> bool:
    """Whether this process computes on the CPU: no GPU, or accelerate told to use the CPU."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return torch.cuda.device_count() == 0 or parse_flag_from_env("ACCELERATE_USE_CPU")


def process_state():
    """accelerate's ``PartialState``: this process's place in an ``accelerate launch`` / ``torchrun`` launch (or
    the one process). Without ``cpu=True`` accelerate leaves a GPU-less process out of its torchrun launch (no
    gloo group); the state is a singleton, so every part of slimtune must create it the same way: here."""
    from accelerate import PartialState

    return PartialState(cpu=runs_on_cpu())
