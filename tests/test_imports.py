"""The package's layering, as README's "Layout" states it: lower floors never import higher ones, and no module
imports itself back through others. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import slimtune

PACKAGE = Path(slimtune.__file__).parent

#: Top-level part of a module's name -> its floor. ``select/`` and ``online/`` share a floor and do not import
#: each other; the CLI's helpers (``config``: --config files, ``cachecli``: the cache commands) sit just below it.
FLOORS = {"utils": 0, "progress": 0.5, "data": 1, "models": 2, "features": 3, "train": 4, "select": 5, "online": 5,
          "evaluate": 6, "bench": 7, "config": 8, "cachecli": 8, "cli": 9, "__main__": 10}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, int]]:
    """``(imported slimtune module, line)`` for every import in the module, at any depth."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from a import b` names the submodule a.b when there is one
                found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, node.lineno))
    return sorted((target, line) for target, line in found if target == "slimtune" or target.startswith("slimtune."))


def floor(name: str) -> int | None:
    """The module's floor; None for the package root, whose re-exports load lazily by name."""
    if name == "slimtune":
        return None
    return FLOORS[name.split(".")[1]]


def test_every_module_has_a_floor():
    unplaced = sorted({name.split(".")[1] for name in MODULES if name != "slimtune"} - set(FLOORS))
    assert not unplaced, f"place these in FLOORS (and README's Layout): {unplaced}"


def test_no_module_imports_a_higher_floor_or_its_sibling_floor():
    upward = []
    for name in MODULES:
        for target, line in imports(name):
            here, there = floor(name), floor(target)
            if here is None or there is None:
                continue
            sibling = here == there and name.split(".")[1] != target.split(".")[1]
            if there > here or sibling:
                upward.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {name: {target for target, _ in imports(name) if target in MODULES and target != name}
             for name in MODULES}
    # A package's __init__ importing its own submodules is how packages re-export; only loops through a
    # module's own imports back to itself count.
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, route = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*route, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*route, nxt]))
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    source = "def f():\n    from slimtune.bench import runner\n\nfrom . import shapes\n"
    monkeypatch.setitem(MODULES, "slimtune.data.readers", tmp_path / "readers.py")
    (tmp_path / "readers.py").write_text(source)
    assert imports("slimtune.data.readers") == [("slimtune.bench.runner", 2), ("slimtune.data.shapes", 4)]
