"""``slimtune cache ls | verify | clear``: what the cache folder (``slimtune.models.cache_dir()``, set by
``SLIMTUNE_CACHE``) holds, whether its feature stores are sound, and removing what is no longer wanted.

The cache holds models (``tiny-llama``, the converted embedded model), feature stores under ``features/``
(LESS gradient features, DELIFT kernel blocks; each with a ``key.json`` naming its kind) and LESS warm-up
runs under ``less-warmup/``. Benchmark grids keep their caches in their own ``--out`` folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

cache_app = typer.Typer(no_args_is_help=True, help="Show, check and clear slimtune's cache (models, feature "
                        "stores, LESS warm-ups); SLIMTUNE_CACHE sets its folder.")
console = Console(soft_wrap=True)  # paths stay whole, to copy and paste

#: What ``--kind`` accepts besides a feature store's own kind (e.g. ``less-adam``, ``delift-kernel``).
GROUPS = ("models", "features", "less-warmup", "other")


@dataclass(frozen=True)
class Entry:
    path: Path
    group: str
    kind: str  # the store's key kind for feature stores, else the group
    size: int
    detail: str


def folder_size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a temporary file renamed while we walked
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def human(size: float) -> str:
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


def _store_entry(path: Path) -> Entry:
    from slimtune.features.store import FeatureStore

    store = FeatureStore(path)
    kind = store.key.get("kind") or path.name.rsplit("-", 1)[0]
    arrays = [f"{array.name}: {len(store.shards(array.name))} shards" for array in sorted(path.iterdir())
              if array.is_dir()]
    return Entry(path, "features", kind, folder_size(path), ", ".join(arrays) or "empty")


def entries(root: Path) -> list[Entry]:
    """Every cached item under ``root``, one feature store or warm-up run or model per entry."""
    found = []
    for child in sorted(root.iterdir()):
        if child.name == "features" and child.is_dir():
            found += [_store_entry(store) for store in sorted(child.iterdir()) if store.is_dir()]
        elif child.name == "less-warmup" and child.is_dir():
            for run in sorted(child.iterdir()):
                done = "complete" if (run / "slimtune_train.json").exists() else "incomplete"
                found.append(Entry(run, "less-warmup", "less-warmup", folder_size(run), done))
        elif child.is_dir() and (child / "config.json").exists():
            found.append(Entry(child, "models", "models", folder_size(child), "model"))
        else:
            size = folder_size(child) if child.is_dir() else child.lstat().st_size
            found.append(Entry(child, "other", "other", size, ""))
    return found


def _root() -> Path:
    from slimtune.models import cache_dir

    return cache_dir()


@cache_app.command("ls")
def cache_ls() -> None:
    """List the cache's models, feature stores and warm-up runs with their sizes.

    Example: [bold]slimtune cache ls[/bold]
    """
    root = _root()
    found = entries(root)
    table = Table("kind", "size", "contents", title=str(root))
    table.add_column("folder", overflow="fold")  # a whole path, even on a narrow terminal
    for entry in found:
        table.add_row(entry.kind, human(entry.size), entry.detail, str(entry.path.relative_to(root)))
    console.print(table)
    console.print(f"{len(found)} item(s), {human(sum(e.size for e in found))} in all")


@cache_app.command("verify")
def cache_verify(
    fix: Annotated[bool, typer.Option("--fix", help="Delete the bad shards, so the next run recomputes "
                                      "them.")] = False,
) -> None:
    """Check every feature-store shard (size, header, checksum); exit 1 listing the bad ones.

    Example: [bold]slimtune cache verify --fix[/bold]
    """
    from slimtune.features.store import FeatureStore

    checked, unchecked, bad = 0, 0, []
    for entry in entries(_root()):
        if entry.group != "features":
            continue
        store = FeatureStore(entry.path)
        for array in sorted(p.name for p in entry.path.iterdir() if p.is_dir()):
            for shard in store.shards(array):
                problem = store.verify(shard.name, shard.lo, shard.hi)
                checked += 1
                unchecked += problem is None and "crc32" not in json.loads(shard.manifest.read_text())
                if problem is not None:
                    bad.append((store, shard, problem))
    for _, shard, problem in bad:
        console.print(f"[red]bad:[/red] {escape(str(shard.path))}: {escape(problem)}")
    old = f"; {unchecked} written before checksums (size and header checked only)" if unchecked else ""
    console.print(f"{checked} shard(s) checked, {len(bad)} bad{old}")
    if bad and fix:
        for store, shard, _ in bad:
            store.discard(shard.name, shard.lo, shard.hi)
        console.print(f"removed {len(bad)} bad shard(s); the next run recomputes them")
    elif bad:
        console.print("run [bold]slimtune cache verify --fix[/bold] to remove them (the next run recomputes "
                      "them)")
        raise typer.Exit(1)


@cache_app.command("clear")
def cache_clear(
    kind: Annotated[str | None, typer.Option("--kind", help=f"Only this kind: {', '.join(GROUPS)}, or a "
                                             "feature store's kind as `cache ls` shows it.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before removing.")] = False,
) -> None:
    """Remove the cache, or one kind of it; asks first unless --yes.

    Example: [bold]slimtune cache clear --kind features --yes[/bold]
    """
    found = entries(_root())
    known = sorted(set(GROUPS) | {e.kind for e in found})
    if kind is not None and kind not in known:
        console.print(f"[red]error:[/red] --kind {kind!r} is none of: {', '.join(known)}")
        raise typer.Exit(2)
    chosen = [e for e in found if kind is None or kind in (e.group, e.kind)]
    if not chosen:
        console.print("nothing to remove")
        return
    total = human(sum(e.size for e in chosen))
    if not yes:
        try:
            confirmed = typer.confirm(f"remove {len(chosen)} item(s), {total}?")
        except typer.Abort:  # no terminal to answer on
            confirmed = False
        if not confirmed:
            console.print("nothing removed (pass --yes to remove without asking)")
            raise typer.Exit(1)
    for entry in chosen:
        if entry.path.is_dir() and not entry.path.is_symlink():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink()
    console.print(f"removed {len(chosen)} item(s), {total}")
