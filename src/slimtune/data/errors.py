"""Errors for bad input that name the file, the line and the field, so a user can fix the record."""

from __future__ import annotations


class DataError(ValueError):
    """A record that cannot become an Example. ``str()`` reads ``file:line: field 'f': problem``."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field, self.problem = file, line, field, message
        where = f"{file}:{line}" if line is not None else (file or "<input>")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")
