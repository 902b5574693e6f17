"""Errors that map onto the step contract's exit codes.

``BadInput`` (exit 2) is a problem no retry can fix: a malformed file, an invalid config
value, too many bad rows.  Everything else is a fault (exit 1, Airflow retries).
"""

from __future__ import annotations


class BadInput(Exception):
    """Bad input or config. The message names the file, line and field where known."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field = file, line, field
        where = ", ".join(
            part for part in (
                file and f"file {file}",
                line is not None and f"line {line}",
                field and f"field '{field}'",
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message)
