"""The one exception the data package raises for bad input, with where the problem is."""

from __future__ import annotations

from dpokit.errors import EXIT_DATA, EXIT_FILES, UserError


class DataError(UserError, ValueError):
    """Bad input data: names the source (file path or a description) and, when known, the row.

    ``row`` is the 1-based line number for JSON-lines files (``row_kind == "line"``) and the
    0-based row index for everything else (``row_kind == "row"``); ``None`` when the problem is not
    one row's. The CLI exits with code 3 (`dpokit.errors.EXIT_DATA`) on it.
    """

    exit_code = EXIT_DATA

    def __init__(
        self,
        message: str,
        source: str | None = None,
        row: int | None = None,
        row_kind: str = "row",
    ) -> None:
        self.message = message
        self.source = source
        self.row = row
        self.row_kind = row_kind
        super().__init__(self._render())

    def _render(self) -> str:
        where = [part for part in (self.source, self._row_text()) if part]
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def _row_text(self) -> str | None:
        return None if self.row is None else f"{self.row_kind} {self.row}"

    def __reduce__(self):
        # Errors raised in `datasets.map` worker processes are pickled back to the parent.
        return (DataError, (self.message, self.source, self.row, self.row_kind))


class MissingDataError(DataError):
    """A data path that does not exist: a file problem, so exit code 4 (`EXIT_FILES`), as for a
    model path that does not exist (the README's exit-code table), not 3 (bad rows)."""

    exit_code = EXIT_FILES

    def __reduce__(self):
        return (MissingDataError, (self.message, self.source, self.row, self.row_kind))


class InvalidRow(ValueError):
    """Raised by normalizers and the encoder for one row; the caller adds source and row."""
