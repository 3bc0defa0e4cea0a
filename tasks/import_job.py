"""`braze-subs import`: validate a whole file, then enqueue it in chunks, streaming both passes.

By default nothing is enqueued unless every row is valid. With `skip_invalid`, valid rows
are enqueued and the bad ones are written, with their reasons, to a rejects file. Memory
stays bounded by the chunk size and the number of errors kept, whatever the file's size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tasks.importing import ImportFileError, RowError, iter_changes, validate_file
from worker.buffer import Buffer
from worker.changes import Change

# Rows per enqueue call: one Redis round trip each.
IMPORT_CHUNK = 1000
# Errors kept in memory for the report; beyond it they are only counted.
MAX_ERRORS_KEPT = 10_000

# Called with (phase, rows done so far): phase is "validating" or "enqueuing".
Progress = Callable[[str, int], None]


@dataclass(slots=True)
class ImportResult:
    rows: int = 0
    enqueued: int = 0
    rejected: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rejected == 0


def count_lines(path: Path) -> int:
    """Physical lines in the file, counted in 1 MiB blocks (fast: no decoding)."""
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _noop(_phase: str, _done: int) -> None:
    return None


def validate(path: Path, progress: Progress = _noop) -> ImportResult:
    """First pass: every row is parsed, only errors are kept."""
    report = validate_file(
        path, max_errors=MAX_ERRORS_KEPT, progress=lambda line: progress("validating", line)
    )
    return ImportResult(rows=report.rows, rejected=report.invalid, errors=report.errors)


@contextmanager
def _rejects_writer(path: Path | None) -> Iterator[IO[str] | None]:
    if path is None:
        yield None
        return
    with open(path, "w", encoding="utf-8") as handle:
        yield handle


def enqueue_file(
    path: Path,
    buffer: Buffer,
    *,
    skip_invalid: bool = False,
    rejects: Path | None = None,
    progress: Progress = _noop,
) -> ImportResult:
    """Import a file: validate it all first (unless `skip_invalid`), then enqueue in order."""
    if not skip_invalid:
        checked = validate(path, progress)
        if not checked.ok:
            return checked
    before = path.stat()

    result = ImportResult()
    chunk: list[Change] = []
    with _rejects_writer(rejects) as rejects_file:
        for line, item in iter_changes(path):
            result.rows += 1
            if isinstance(item, RowError):
                if not skip_invalid:  # valid a moment ago: the file changed under us
                    raise ImportFileError(f"{path}: changed during import (line {line})")
                result.rejected += 1
                if len(result.errors) < MAX_ERRORS_KEPT:
                    result.errors.append(item)
                if rejects_file is not None:
                    record = {"line": item.line, "field": item.field, "error": item.message}
                    rejects_file.write(json.dumps(record) + "\n")
                continue
            chunk.append(item)
            if len(chunk) >= IMPORT_CHUNK:
                result.enqueued += buffer.enqueue(chunk)
                chunk.clear()
                progress("enqueuing", line)
        if chunk:
            result.enqueued += buffer.enqueue(chunk)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise ImportFileError(f"{path}: changed during import")
    return result
