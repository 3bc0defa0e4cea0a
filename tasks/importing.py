"""Streaming readers for import files (JSON Lines and CSV).

Rows carry the v1 field names of `worker.changes.parse_change`. Everything here streams:
one physical line at a time, O(1) memory in the size of the file, so an import can be
validated in full (`validate_file`) and then read again to enqueue (`iter_changes`)
without holding either pass in memory.

Line numbers are 1-based physical lines of the file. In CSV the header is line 1, and a
record whose quoted field spans several lines is reported at the line where it starts.
Files are read as UTF-8 (a leading BOM is ignored); a line that is not valid UTF-8 is a
bad row, not a crash. Problems with the file as a whole (unknown suffix, unreadable file,
missing CSV column) raise `ImportFileError`.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.changes import (
    IDENTIFIER_FIELDS,
    Change,
    InvalidChange,
    parse_change,
)

JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
CSV_SUFFIXES = frozenset({".csv"})
REQUIRED_COLUMNS: tuple[str, ...] = ("subscription_group_id", "subscription_state")
# Rows between two calls of a progress callback.
PROGRESS_EVERY = 1000

Row = dict[str, Any]


class ImportFileError(Exception):
    """The file as a whole cannot be imported; the message is one line naming the file."""


@dataclass(frozen=True, slots=True)
class InvalidRow:
    """A line that does not even yield a row (bad JSON, bad UTF-8, malformed CSV)."""

    message: str


@dataclass(frozen=True, slots=True)
class RowError:
    """Why the row at `line` is not a valid change; `field` is "" for whole-line problems."""

    line: int
    field: str
    message: str

    def __post_init__(self) -> None:
        # One line, whatever the library messages contain.
        object.__setattr__(self, "message", " ".join(self.message.split()))

    def __str__(self) -> str:
        if self.field:
            return f"line {self.line}: {self.field}: {self.message}"
        return f"line {self.line}: {self.message}"


@dataclass(slots=True)
class ValidationReport:
    """Counts for a whole file, and its row errors (possibly capped by `max_errors`)."""

    rows: int = 0
    valid: int = 0
    invalid: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    @property
    def errors_truncated(self) -> bool:
        """True when more rows were invalid than `errors` holds."""
        return self.invalid > len(self.errors)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def read_rows(path: Path) -> Iterator[tuple[int, Row | InvalidRow]]:
    """Yield (line number, row) lazily; a line that is not a row yields `InvalidRow`.

    An unsupported suffix raises `ImportFileError` at once; an unreadable file or (CSV) a
    missing header column raises it on the first `next()`, before any row.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix in CSV_SUFFIXES:
        return _read_csv(path)
    raise ImportFileError(
        f"{path}: unsupported file type {suffix or '(no suffix)'}; use .jsonl, .ndjson or .csv"
    )


def iter_changes(path: Path) -> Iterator[tuple[int, Change | RowError]]:
    """Yield (line number, `Change` or `RowError`) for every row, in file order.

    Stateless: each call reopens and streams the file, so it is cheap to call twice.
    """
    return _changes(read_rows(path))


def validate_file(
    path: Path,
    max_errors: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_change: Callable[[Change], None] | None = None,
) -> ValidationReport:
    """Stream the whole file and count rows; keep the first `max_errors` errors (all if None).

    Only errors are stored, never rows. `progress`, if given, is called with the current
    line number every `PROGRESS_EVERY` rows; `on_change`, if given, with every valid change.
    """
    report = ValidationReport()
    for line, item in iter_changes(path):
        report.rows += 1
        if progress is not None and report.rows % PROGRESS_EVERY == 0:
            progress(line)
        if isinstance(item, RowError):
            report.invalid += 1
            if max_errors is None or len(report.errors) < max_errors:
                report.errors.append(item)
        else:
            report.valid += 1
            if on_change is not None:
                on_change(item)
    return report


# --------------------------------------------------------------------------------------
# Rows to changes
# --------------------------------------------------------------------------------------


def _changes(
    rows: Iterable[tuple[int, Row | InvalidRow]],
) -> Iterator[tuple[int, Change | RowError]]:
    for line, row in rows:
        yield line, _to_change(line, row)


def _to_change(line: int, row: Row | InvalidRow) -> Change | RowError:
    if isinstance(row, InvalidRow):
        return RowError(line, "", row.message)
    try:
        return parse_change(row)
    except InvalidChange as exc:
        return RowError(line, exc.field, exc.message)


# --------------------------------------------------------------------------------------
# Physical lines
# --------------------------------------------------------------------------------------


def _physical_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for each line, a leading UTF-8 BOM removed."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            yield number, raw


def _utf8_problem(exc: UnicodeDecodeError) -> str:
    byte = exc.object[exc.start]
    return f"line is not valid UTF-8 (byte 0x{byte:02x} at byte {exc.start + 1})"


# --------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[int, Row | InvalidRow]]:
    lines = _physical_lines(path)
    with contextlib.closing(lines):
        for number, raw in lines:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, InvalidRow(_utf8_problem(exc))
                continue
            if text.isspace() or not text:
                continue
            yield number, _json_object(text)


def _json_object(text: str) -> Row | InvalidRow:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return InvalidRow(f"line is not a JSON object: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return InvalidRow("line is not a JSON object: nested too deeply")
    if not isinstance(value, dict):
        return InvalidRow(f"line is not a JSON object: found {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


class _DecodedLines:
    """Feeds `csv.reader` decoded lines and remembers the first undecodable one.

    A bad line is decoded with replacement characters so the CSV parser stays in step;
    the record that contains it is then reported instead of parsed.
    """

    def __init__(self, lines: Iterator[tuple[int, bytes]]) -> None:
        self._lines = lines
        self.problem: tuple[int, str] | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        number, raw = next(self._lines)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.problem is None:
                self.problem = (number, _utf8_problem(exc))
            return raw.decode("utf-8", "replace")

    def take_problem(self, start: int) -> str | None:
        """The decoding problem of the record starting at `start`, if any; then reset."""
        problem, self.problem = self.problem, None
        if problem is None:
            return None
        number, message = problem
        return message if number == start else f"{message} on line {number}"


def _read_csv(path: Path) -> Iterator[tuple[int, Row | InvalidRow]]:
    lines = _physical_lines(path)
    with contextlib.closing(lines):
        source = _DecodedLines(lines)
        reader = csv.reader(source)
        columns = _csv_header(path, reader, source)
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                source.take_problem(start)
                yield start, InvalidRow(f"malformed CSV: {exc}")
                continue
            problem = source.take_problem(start)
            if problem is not None:
                yield start, InvalidRow(problem)
            elif any(cell and not cell.isspace() for cell in cells):
                yield start, _csv_row(columns, cells)


def _csv_header(path: Path, reader: Iterator[list[str]], source: _DecodedLines) -> list[str]:
    """Read and check the header line; name blank columns "column N"."""
    try:
        cells = next(reader)
    except StopIteration:
        raise ImportFileError(f"{path}: empty file; expected a header line") from None
    except csv.Error as exc:
        raise ImportFileError(f"{path}: malformed CSV header: {exc}") from None
    problem = source.take_problem(1)
    if problem is not None:
        raise ImportFileError(f"{path}: header {problem}")
    columns = [cell.strip() or f"column {index}" for index, cell in enumerate(cells, 1)]
    _check_columns(path, columns)
    return columns


def _check_columns(path: Path, columns: list[str]) -> None:
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise ImportFileError(f"{path}: duplicate column {name}")
        seen.add(name)
    missing = [name for name in REQUIRED_COLUMNS if name not in seen]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise ImportFileError(f"{path}: missing column{plural} {', '.join(missing)}")
    if seen.isdisjoint(IDENTIFIER_FIELDS):
        raise ImportFileError(
            f"{path}: missing identifier column: one of {', '.join(IDENTIFIER_FIELDS)}"
        )


def _csv_row(columns: list[str], cells: list[str]) -> Row | InvalidRow:
    """A row of the non-blank cells; blank cells are absent fields."""
    if len(cells) > len(columns) and any(
        cell and not cell.isspace() for cell in cells[len(columns) :]
    ):
        return InvalidRow(f"row has {len(cells)} cells but the header has {len(columns)} columns")
    return {
        name: cell
        for name, cell in zip(columns, cells, strict=False)
        if cell and not cell.isspace()
    }
