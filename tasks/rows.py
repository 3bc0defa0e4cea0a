"""Streaming readers for import files (JSON Lines and CSV).

Rows carry the v1 field names of `core.changes.parse_change`. Everything here streams:
one physical line (or one chunk of lines) at a time, O(1) memory in the size of the file,
so a file can be validated in full and then enqueued without holding it in memory.

Line numbers are 1-based physical lines of the file. In CSV the header is line 1, and a
record whose quoted field spans several lines is reported at the line where it starts.
Files are read as UTF-8 (a leading BOM is ignored); a line that is not valid UTF-8 is a
bad row, not a crash. Problems with the file as a whole (unknown suffix, unreadable file,
missing CSV column) raise `ImportFileError`.

`iter_changes` goes row by row (`braze-subs verify`). For bulk work (`braze-subs
import`) the file is read in chunks instead (`read_chunks`): a few thousand lines, with
their line numbers, that `check_chunk` validates on its own, in this process or in a worker
process (`tasks.parallel`). A chunk's result carries its errors and its valid changes as
pieces of enqueue calls packed for the wire, not `Change` objects, so it is cheap to send
between processes and to write to Redis. Both ways share the row readers below, so they
agree on every row and message.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import json
import sys
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from core.changes import (
    IDENTIFIER_FIELDS,
    Change,
    ChangeFields,
    InvalidChange,
    parse_change,
    parse_fields,
)
from core.errors import InputRefused
from core.routing import Routes
from stores.buffer import (
    ARGS_PER_CHANGE,
    PackedChanges,
    encode_fields,
    pack_changes,
    unpack_changes,
)

JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
CSV_SUFFIXES = frozenset({".csv"})
REQUIRED_COLUMNS: tuple[str, ...] = ("subscription_group_id", "subscription_state")
# Physical lines per chunk of `read_chunks`: big enough that sending a chunk to a worker
# process costs little beside validating it (2,000 rows are 10-100 ms of work), small
# enough that the chunks in flight hold little memory.
CHUNK_LINES = 2000
# ... and at most this many bytes, so a file of long lines does not make huge chunks.
CHUNK_BYTES = 1 << 20
# Longest line read as a row. A row is a few hundred bytes (three short fields and one
# identifier of at most a few hundred characters); a longer line is reported as a bad row
# without being held in memory whole, so a stray 100 MB line costs 64 KiB, not 400 MB.
MAX_LINE_BYTES = 64 * 1024
# Read size while skipping the rest of a line that is too long.
_SKIP_BLOCK = 1 << 20


def too_long_message(max_bytes: int = MAX_LINE_BYTES) -> str:
    return f"line longer than {max_bytes:,} bytes (a row takes a few hundred); not read"


def record_too_long_message(max_bytes: int = MAX_LINE_BYTES) -> str:
    return (
        f"record longer than {max_bytes:,} bytes (a row takes a few hundred; "
        "a quote left open?); not read"
    )


def bounded_lines(handle: IO[bytes], max_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """The physical lines of a binary file, each at most `max_bytes` long; a longer line
    is skipped to its end in blocks and yields None. Memory stays O(max_bytes)."""
    while True:
        line = handle.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or (line.endswith(b"\n") and len(line) == max_bytes + 1):
            yield line
            continue
        while not line.endswith(b"\n"):  # skip the rest of it
            line = handle.readline(_SKIP_BLOCK)
            if not line:
                break
        yield None


Row = dict[str, Any]


class ImportFileError(InputRefused):
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


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def iter_changes(path: Path) -> Iterator[tuple[int, Change | RowError]]:
    """Yield (line number, `Change` or `RowError`) for every row, in file order.

    An unsupported suffix raises `ImportFileError` at once; an unreadable file or (CSV) a
    missing header column raises it on the first `next()`, before any row. Stateless:
    each call reopens and streams the file, so it is cheap to call twice.
    """
    path = Path(path)
    rows = _read_jsonl(path) if _is_jsonl(path) else _read_csv(path)
    return _changes(rows)


@dataclass(frozen=True, slots=True)
class JsonlChunk:
    """Consecutive physical lines of a JSON Lines file, the first of them at `first_line`."""

    first_line: int
    lines: list[bytes | None]  # None: a line longer than MAX_LINE_BYTES, not read

    @property
    def last_line(self) -> int:
        return self.first_line + len(self.lines) - 1


@dataclass(frozen=True, slots=True)
class CsvChunk:
    """Consecutive CSV records (start line, cells or why it is no row); ends at `last_line`."""

    columns: list[str]
    records: list[tuple[int, list[str] | InvalidRow]]
    last_line: int


Chunk = JsonlChunk | CsvChunk


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """What one chunk holds: rows, errors in line order, and its valid changes.

    The changes are packed for the wire (`stores.buffer.PackedChanges`: pieces of at most
    `ENQUEUE_CHUNK` changes, already in the Redis protocol), each piece with its workspace,
    in file order: they cross from a worker process as a few bytes objects, are spooled
    to disk as they are, and are written to Redis as they are.
    """

    last_line: int
    rows: int
    valid: int
    errors: list[RowError]
    pieces: tuple[tuple[str, PackedChanges], ...] = ()

    @property
    def routed(self) -> dict[str, int]:
        """Changes per workspace."""
        counts: dict[str, int] = {}
        for workspace, piece in self.pieces:
            counts[workspace] = counts.get(workspace, 0) + piece.changes
        return counts

    def by_workspace(self) -> dict[str, list[PackedChanges]]:
        """Each workspace's pieces, in file order."""
        return pieces_by_workspace(self.pieces)

    @property
    def args(self) -> list[bytes]:
        """The encoded changes of every piece, in order (`encode_change`'s arguments)."""
        return [arg for _, piece in self.pieces for arg in unpack_changes(piece)]


def pieces_by_workspace(
    pieces: Iterable[tuple[str, PackedChanges]],
) -> dict[str, list[PackedChanges]]:
    """Pieces of several workspaces, each workspace's in order."""
    split: dict[str, list[PackedChanges]] = {}
    for workspace, piece in pieces:
        split.setdefault(workspace, []).append(piece)
    return split


def read_chunks(path: Path, lines: int = CHUNK_LINES) -> Iterator[Chunk]:
    """Yield the file lazily as chunks of about `lines` physical lines each, in order.

    Raises `ImportFileError` like `iter_changes`. A JSON Lines chunk is raw lines, so the
    reading process only splits the file; CSV is parsed here (records may span lines) and
    its chunks hold cells. Either way a chunk is validated by `check_chunk` alone.
    """
    if lines < 1:
        raise ValueError("lines must be at least 1")
    path = Path(path)
    return _jsonl_chunks(path, lines) if _is_jsonl(path) else _csv_chunks(path, lines)


def check_chunk(
    chunk: Chunk,
    respect_opt_outs: bool = False,
    from_line: int = 1,
    routes: Routes | None = None,
    workspace: str | None = None,
) -> ChunkResult:
    """Validate one chunk: what `iter_changes` says of its rows, in compact form.

    A plain function of its arguments, so it runs the same in a worker process.
    `respect_opt_outs` sets `respect_opt_out` on every valid row (`import --respect-opt-outs`);
    rows before `from_line` are left out (`import --from-line`). Every valid row is routed
    (`routes`, default: the one workspace `default`): its `workspace` column, else its
    group's, else `workspace` (`import --workspace`), else the only one; a row that fits
    no workspace is a bad row like any other.
    """
    routes = routes or Routes()
    if isinstance(chunk, JsonlChunk):
        rows = _jsonl_rows(enumerate(chunk.lines, chunk.first_line))
    else:
        rows = _csv_rows(chunk.columns, chunk.records)
    count = 0
    errors: list[RowError] = []
    args: list[bytes] = []
    runs: list[list[Any]] = []  # [workspace, changes] of consecutive valid rows
    for line, row in rows:
        if line < from_line:  # resuming after an interrupted import: already enqueued
            continue
        count += 1
        # The change as a tuple (`ChangeFields`), never a `Change`: nothing here needs one.
        if isinstance(row, InvalidRow):
            errors.append(RowError(line, "", row.message))
            continue
        try:
            item = parse_fields(row)
        except InvalidChange as exc:
            errors.append(RowError(line, exc.field, exc.message))
            continue
        try:
            target = routes.route(item[0], item[10], workspace)
        except InvalidChange as exc:
            errors.append(RowError(line, exc.field, exc.message))
            continue
        try:
            args += encode_fields(item, respect_opt_out=respect_opt_outs)
        except UnicodeEncodeError:
            errors.append(_unencodable(line, item))
            continue
        if runs and runs[-1][0] == target:
            runs[-1][1] += 1
        else:
            runs.append([target, 1])
    pieces: list[tuple[str, PackedChanges]] = []
    start = 0
    for target, changes in runs:
        end = start + changes * ARGS_PER_CHANGE
        pieces += [(target, piece) for piece in pack_changes(args[start:end])]
        start = end
    return ChunkResult(chunk.last_line, count, len(args) // ARGS_PER_CHANGE, errors, tuple(pieces))


def _unencodable(line: int, change: ChangeFields) -> RowError:
    """The error of a change whose text UTF-8 cannot carry: a lone surrogate, which a JSON
    escape can produce. Redis could not store it, so the row is refused like any bad row."""
    name, value = "subscription_group_id", change[0]
    found = _lone_surrogate(value)
    if found is None:
        name, value = change[2].value, change[3]
        found = _lone_surrogate(value) or 0
    return RowError(
        line, name, f"must not contain lone surrogates, found {value[found]!r} at position {found}"
    )


def _lone_surrogate(text: str) -> int | None:
    for position, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            return position
    return None


def _is_jsonl(path: Path) -> bool:
    """True for JSON Lines, False for CSV; raises `ImportFileError` for anything else."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return True
    if suffix in CSV_SUFFIXES:
        return False
    raise ImportFileError(
        f"{path}: unsupported file type {suffix or '(no suffix)'}; use .jsonl, .ndjson or .csv"
    )


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


def _physical_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) for each line, a leading UTF-8 BOM removed; None for a
    line longer than MAX_LINE_BYTES (not read)."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with handle:
        for number, raw in enumerate(bounded_lines(handle), 1):
            if number == 1 and raw is not None and raw.startswith(codecs.BOM_UTF8):
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
        yield from _jsonl_rows(lines)


def _jsonl_rows(
    lines: Iterable[tuple[int, bytes | None]],
) -> Iterator[tuple[int, Row | InvalidRow]]:
    """Rows of numbered raw lines (BOM already removed); blank lines yield nothing."""
    for number, raw in lines:
        if raw is None:
            yield number, InvalidRow(too_long_message())
            continue
        # A line msgspec reads as a JSON object is that object (json.loads' answer: held
        # to it by tests/unit/test_occurred_at.py); anything else (not an object, blank,
        # bad UTF-8 or JSON, NaN, a float beyond range, a lone surrogate, nested too
        # deeply) goes the json module's way below, for its verdict and its message.
        # ~3 times faster than decoding the UTF-8 and json.loads (issue 26).
        try:
            value = _FAST_DECODE(raw)
        except (msgspec.MsgspecError, RecursionError):
            value = None
        if type(value) is dict:
            yield number, value
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, InvalidRow(_utf8_problem(exc))
            continue
        if text.isspace() or not text:
            continue
        yield number, _json_object(text)


def _jsonl_chunks(path: Path, size: int) -> Iterator[JsonlChunk]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with handle:
        source = bounded_lines(handle)
        first_line = 1
        while True:
            # Cut after `size` lines or CHUNK_BYTES, whichever comes first.
            lines: list[bytes | None] = []
            taken = 0
            for line in source:
                lines.append(line)
                taken += len(line) if line is not None else 0
                if len(lines) >= size or taken >= CHUNK_BYTES:
                    break
            if not lines:
                return
            head = lines[0]
            if first_line == 1 and head is not None and head.startswith(codecs.BOM_UTF8):
                lines[0] = head[len(codecs.BOM_UTF8) :]
            yield JsonlChunk(first_line, lines)
            first_line += len(lines)


_FAST_DECODE = msgspec.json.Decoder().decode

# json.loads without its own checks, which a str without a leading BOM passes: what it
# calls for such a text (one Python call a row less, ~0.15 us).
_JSON_DECODE = json.JSONDecoder().decode


def _json_object(text: str) -> Row | InvalidRow:
    try:
        value = json.loads(text) if text.startswith("\ufeff") else _JSON_DECODE(text)
    except json.JSONDecodeError as exc:
        return InvalidRow(f"line is not a JSON object: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return InvalidRow("line is not a JSON object: nested too deeply")
    except ValueError:
        # The only other ValueError of the JSON reader: an integer longer than Python's
        # int/str conversion limit (sys.get_int_max_str_digits(), 4,300 digits).
        return InvalidRow(
            "line is not a JSON object: a number with more than "
            f"{sys.get_int_max_str_digits():,} digits"
        )
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


class _RecordTooLong(Exception):
    """Raised through `csv.reader` when a record's lines pass `MAX_LINE_BYTES` together."""


class _DecodedLines:
    """Feeds `csv.reader` decoded lines and remembers the first undecodable one.

    A bad line is decoded with replacement characters so the CSV parser stays in step;
    the record that contains it is then reported instead of parsed.

    A record (`start_record` marks where one begins) is capped in bytes as a line is: a
    quoted field may span lines, and a quote left open would otherwise make the parser
    hold the rest of the file as one record (its field size limit bounds one field, not
    the number of fields). Past the cap, the record's remaining lines are skipped unread
    up to the line that closes its quote, and `_RecordTooLong` is raised through the
    parser, which starts afresh at its next call. Where the quote closes is found by the
    parity of the quote characters since the record began: in a CSV quoted field a
    literal quote is doubled, so the count is odd exactly while a field is open.
    """

    def __init__(self, lines: Iterator[tuple[int, bytes | None]]) -> None:
        self._lines = lines
        self.problem: tuple[int, str] | None = None
        self.bytes_read = 0
        self.line = 0  # the last physical line handed out (or skipped)
        self._record_bytes = 0
        self._quotes = 0

    def start_record(self) -> None:
        self._record_bytes = 0
        self._quotes = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        number, raw = next(self._lines)
        self.line = number
        if raw is None:  # too long: the parser sees an empty line, the record is bad
            if self.problem is None:
                self.problem = (number, too_long_message())
            return "\n"
        self.bytes_read += len(raw)
        self._record_bytes += len(raw)
        self._quotes += raw.count(b'"')
        if self._record_bytes > MAX_LINE_BYTES:
            self._skip_rest_of_record()
            raise _RecordTooLong
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.problem is None:
                self.problem = (number, _utf8_problem(exc))
            return raw.decode("utf-8", "replace")

    def _skip_rest_of_record(self) -> None:
        while self._quotes % 2:
            try:
                number, raw = next(self._lines)
            except StopIteration:
                return
            self.line = number
            if raw is not None:  # a line too long to read: its quotes are not counted
                self.bytes_read += len(raw)
                self._quotes += raw.count(b'"')

    def take_problem(self, start: int) -> str | None:
        """The decoding problem of the record starting at `start`, if any; then reset."""
        problem, self.problem = self.problem, None
        if problem is None:
            return None
        number, message = problem
        return message if number == start else f"{message} on line {number}"


class _CsvRecords:
    """The records of a CSV file after its header: (start line, cells or `InvalidRow`).

    Opening the file and checking the header happen on the first `next()`, which then
    raises `ImportFileError` if the file as a whole cannot be imported. `columns` and
    `line_num` (the last physical line read so far) are valid after that.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._records: Generator[tuple[int, list[str] | InvalidRow], None, None] | None = None
        self.columns: list[str] = []
        self.line_num = 0
        self._source: _DecodedLines | None = None

    @property
    def bytes_read(self) -> int:
        return self._source.bytes_read if self._source is not None else 0

    def __iter__(self) -> Iterator[tuple[int, list[str] | InvalidRow]]:
        return self

    def __next__(self) -> tuple[int, list[str] | InvalidRow]:
        if self._records is None:
            self._records = self._read()
        return next(self._records)

    def close(self) -> None:
        if self._records is not None:
            self._records.close()

    def _read(self) -> Generator[tuple[int, list[str] | InvalidRow], None, None]:
        lines = _physical_lines(self._path)
        with contextlib.closing(lines):
            source = self._source = _DecodedLines(lines)
            reader = csv.reader(source)
            self.columns = _csv_header(self._path, reader, source)
            while True:
                source.start_record()
                start = source.line + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except _RecordTooLong:
                    self.line_num = source.line
                    source.take_problem(start)
                    yield start, InvalidRow(record_too_long_message())
                    continue
                except csv.Error as exc:
                    self.line_num = source.line
                    source.take_problem(start)
                    yield start, InvalidRow(f"malformed CSV: {exc}")
                    continue
                self.line_num = source.line
                problem = source.take_problem(start)
                yield start, cells if problem is None else InvalidRow(problem)


def _read_csv(path: Path) -> Iterator[tuple[int, Row | InvalidRow]]:
    records = _CsvRecords(path)
    with contextlib.closing(records):
        try:
            first = next(records)
        except StopIteration:
            return
        yield from _csv_rows(records.columns, itertools.chain((first,), records))


def _csv_rows(
    columns: list[str], records: Iterable[tuple[int, list[str] | InvalidRow]]
) -> Iterator[tuple[int, Row | InvalidRow]]:
    """Rows of records; records whose cells are all blank yield nothing."""
    for start, cells in records:
        if isinstance(cells, InvalidRow):
            yield start, cells
        elif any(cell and not cell.isspace() for cell in cells):
            yield start, _csv_row(columns, cells)


def _csv_chunks(path: Path, size: int) -> Iterator[CsvChunk]:
    records = _CsvRecords(path)
    with contextlib.closing(records):
        while True:
            # Cut at a record boundary once the chunk spans `size` physical lines.
            chunk: list[tuple[int, list[str] | InvalidRow]] = []
            first = records.line_num + 1
            start_bytes = records.bytes_read
            for record in records:
                chunk.append(record)
                if records.line_num - first + 1 >= size:
                    break
                if records.bytes_read - start_bytes >= CHUNK_BYTES:
                    break
            if not chunk:
                return
            yield CsvChunk(records.columns, chunk, records.line_num)


def _csv_header(path: Path, reader: Iterator[list[str]], source: _DecodedLines) -> list[str]:
    """Read and check the header line; name blank columns "column N"."""
    try:
        cells = next(reader)
    except StopIteration:
        raise ImportFileError(f"{path}: empty file; expected a header line") from None
    except csv.Error as exc:
        raise ImportFileError(f"{path}: malformed CSV header: {exc}") from None
    except _RecordTooLong:
        raise ImportFileError(f"{path}: header {record_too_long_message()}") from None
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
