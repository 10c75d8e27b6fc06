"""benchmarks/README.md holds one ``## `` section per benchmark script. A script rewrites only its own section,
and keeps the hand-written reading of its numbers that follows the section's :data:`READING` marker, so a
rerun refreshes the table without losing what a person learnt from it."""

from __future__ import annotations

import shlex
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"
READING = "<!-- reading: written by hand, kept when the script rewrites this section -->"


def command_line(script: str, argv: list[str]) -> str:
    """How the run was started, for the notes."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def replace_section(heading: str, body: str) -> None:
    """Put ``heading`` + ``body`` in place of that section (or append it), keeping its reading."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start < 0:
        before, reading, after = text, "", ""
    else:
        end = text.find("\n## ", start + len(heading))
        end = len(text) if end < 0 else end + 1
        old, before, after = text[start:end], text[:start], text[end:]
        reading = old[old.index(READING):] if READING in old else ""
    section = "\n\n".join(part.strip("\n") for part in (f"{heading}\n\n{body}", reading) if part)
    parts = [p.strip("\n") for p in (before, section, after) if p.strip("\n")]
    README.write_text("\n\n".join(parts) + "\n")
