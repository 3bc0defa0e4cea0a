"""`braze-subs import`: validate a whole file, then enqueue it in chunks, streaming both passes.

The file is read in chunks of a few thousand lines (`tasks.rows.read_chunks`), which are
validated by a pool of worker processes (`jobs`, one per CPU by default; small files and
`jobs=1` stay in this process). Results come back in file order, with at most a few chunks
in flight, so memory stays bounded whatever the file's size, and later lines still win.

Pass 1 validates every row and spools the valid changes, already in the form the enqueue
script takes, to a temporary file; pass 2 enqueues from the spool, so nothing is parsed
twice and a file changed meanwhile cannot slip unvalidated rows in.

By default nothing is enqueued unless every row is valid. With `skip_invalid`, valid rows
are enqueued as their chunks come back and the bad ones are written, with their reasons, to
a rejects file. Memory stays bounded by the chunk size, the chunks in flight and the number
of errors kept, whatever the file's size.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import IO

from redis.exceptions import OutOfMemoryError, RedisError

from core.changes import Lane
from core.errors import BrazeSubsError
from core.redaction import scrub
from core.routing import Routes
from stores.buffer import Buffer, PackedChanges, PipelinedEnqueue
from tasks.parallel import cpu_count, ordered_map
from tasks.rows import (
    CHUNK_LINES,
    Chunk,
    ChunkResult,
    RowError,
    check_chunk,
    pieces_by_workspace,
    read_chunks,
)

# Errors kept in memory for the report; beyond it they are only counted.
MAX_ERRORS_KEPT = 10_000
# Files smaller than this are validated in this process whatever `jobs` says: starting
# worker processes costs ~0.1-0.3 s, more than they save on ~10,000 rows.
PARALLEL_MIN_BYTES = 1 << 20
# Chunks submitted to the pool and not yet consumed, per worker process: one being
# validated and one waiting, so no worker idles while the consumer handles a result.
IN_FLIGHT_PER_JOB = 2

# Called with (phase, rows done so far): phase is "validating" or "enqueuing".
Progress = Callable[[str, int], None]


@dataclass(slots=True)
class ImportResult:
    rows: int = 0
    enqueued: int = 0
    rejected: int = 0
    stale: int = 0  # of those enqueued, dropped: a change that occurred later was accepted
    errors: list[RowError] = field(default_factory=list)
    jobs: int = 1  # processes that validated the file (1: this one)
    # Changes enqueued per workspace (confirmed by Redis), in order of first appearance.
    by_workspace: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rejected == 0


class ImportInterrupted(BrazeSubsError):
    """Redis failed mid-import (full, gone): says how far the import got and where to go
    on from. The changes Redis confirmed are in the buffer; the rest are not."""


@dataclass(slots=True)
class _Resume:
    """Where to resume: the chunks handed to the enqueuers, as (changes of each workspace
    up to the chunk's end, the chunk's last line). One entry per chunk, so it stays small.
    Each workspace's enqueuer confirms a prefix of its own changes; a line is behind us
    once every workspace has confirmed its changes up to it."""

    ends: list[tuple[dict[str, int], int]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    def add(self, changes: dict[str, int], last_line: int) -> None:
        for workspace, count in changes.items():
            self.totals[workspace] = self.totals.get(workspace, 0) + count
        self.ends.append((dict(self.totals), last_line))

    def line_after(self, confirmed: dict[str, int]) -> int:
        """The first line not known to be enqueued whole: every row before it is in."""
        line = 0
        for ends, last_line in self.ends:
            if any(end > confirmed.get(workspace, 0) for workspace, end in ends.items()):
                break
            line = last_line
        return line + 1


class _Enqueuers:
    """One pipelined enqueue per workspace, opened as its first change comes: each keeps
    its workspace's changes in file order (two workspaces never share an identifier)."""

    def __init__(self, buffers: Callable[[str], Buffer], lane: Lane) -> None:
        self._buffers = buffers
        self._lane = lane
        self._stack = contextlib.ExitStack()
        self.each: dict[str, PipelinedEnqueue] = {}

    def __enter__(self) -> _Enqueuers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)  # type: ignore[arg-type]

    def add(self, split: dict[str, list[PackedChanges]]) -> None:
        for workspace, pieces in split.items():
            enqueuer = self.each.get(workspace)
            if enqueuer is None:
                enqueuer = self.each[workspace] = self._stack.enter_context(
                    self._buffers(workspace).pipelined(self._lane)
                )
            enqueuer.add_packed(pieces)

    def finish(self) -> None:
        for enqueuer in self.each.values():
            enqueuer.finish()

    def settle(self) -> None:
        """One of them failed: read what Redis answered to every call in flight, so the
        changes reported are all that is in (`count`) and the line to resume from rests
        on what each holds without a gap (`prefixes`)."""
        for enqueuer in self.each.values():
            enqueuer.settle()

    @property
    def prefixes(self) -> dict[str, int]:
        return {workspace: enqueuer.prefix for workspace, enqueuer in self.each.items()}

    @property
    def count(self) -> int:
        return sum(enqueuer.count for enqueuer in self.each.values())

    @property
    def stale(self) -> int:
        return sum(enqueuer.stale for enqueuer in self.each.values())

    @property
    def counts(self) -> dict[str, int]:
        return {workspace: enqueuer.count for workspace, enqueuer in self.each.items()}


def _interrupted(
    path: Path, exc: RedisError, enqueuer: _Enqueuers, resume: _Resume, planned: int
) -> ImportInterrupted:
    if isinstance(exc, OutOfMemoryError):
        why = "OOM: Redis is full (used memory > maxmemory) and refuses writes"
    else:
        detail = scrub(" ".join(str(exc).split()))[:200]
        why = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    line = resume.line_after(enqueuer.prefixes)
    return ImportInterrupted(
        f"{path}: Redis failed mid-import ({why}); "
        f"{enqueuer.count:,} changes enqueued (of {planned:,} sent), every row before line "
        f"{line:,} among them; resume with: braze-subs import {path} --from-line {line}"
    )


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


def parallel_jobs(path: Path, jobs: int | None, min_bytes: int = PARALLEL_MIN_BYTES) -> int:
    """Processes to validate `path` with: `jobs` (None: one per CPU), but 1 for a file
    smaller than `min_bytes`, where starting a pool would cost more than it saves."""
    wanted = cpu_count() if jobs is None else jobs
    if wanted < 1:
        raise ValueError("jobs must be at least 1")
    if wanted == 1:
        return 1
    try:
        size = Path(path).stat().st_size
    except OSError:
        return 1  # the reader reports it
    return wanted if size >= min_bytes else 1


def checked_chunks(
    path: Path,
    jobs: int = 1,
    chunk_lines: int = CHUNK_LINES,
    respect_opt_outs: bool = False,
    from_line: int = 1,
    routes: Routes | None = None,
    workspace: str | None = None,
) -> Iterator[ChunkResult]:
    """Every chunk of the file validated, in file order: in this process when `jobs` is 1,
    else by `jobs` worker processes with at most `IN_FLIGHT_PER_JOB * jobs` chunks in flight.

    Raises `ImportFileError` (bad suffix, unreadable file, bad CSV header) before any
    worker starts. Close the iterator to stop early: queued chunks are dropped.
    """
    chunks: Iterator[Chunk] = read_chunks(path, chunk_lines)
    if from_line > 1:  # resuming: chunks wholly before the line are read, not validated
        chunks = (chunk for chunk in chunks if chunk.last_line >= from_line)
    check = functools.partial(
        check_chunk,
        respect_opt_outs=respect_opt_outs,
        from_line=from_line,
        routes=routes,
        workspace=workspace,
    )
    if jobs <= 1:
        yield from map(check, chunks)
        return
    first = next(chunks, None)  # problems with the file as a whole surface here
    if first is None:
        return
    results = ordered_map(
        check, chain((first,), chunks), jobs=jobs, in_flight=IN_FLIGHT_PER_JOB * jobs
    )
    with contextlib.closing(results):
        yield from results


def _tally(result: ImportResult, chunk: ChunkResult) -> None:
    result.rows += chunk.rows
    if chunk.errors:
        result.rejected += len(chunk.errors)
        room = MAX_ERRORS_KEPT - len(result.errors)
        if room > 0:
            result.errors += chunk.errors[:room]


# The spool keeps pass 1's valid changes on disk as the chunks' pieces of enqueue calls,
# packed for the wire (`PackedChanges`), back to back: pass 2 writes them to Redis without parsing,
# validating or even packing anything again (phonenumbers alone costs ~30-50 µs a row).
def _unspooled(spool: IO[bytes]) -> Iterator[dict[str, list[PackedChanges]]]:
    while True:
        try:
            pieces = pickle.load(spool)
        except EOFError:
            return
        yield pieces_by_workspace(pieces)


@contextlib.contextmanager
def _rejects_writer(path: Path | None) -> Iterator[IO[str] | None]:
    if path is None:
        yield None
        return
    with open(path, "w", encoding="utf-8") as handle:
        yield handle


def _validate_then_enqueue(
    path: Path,
    results: Iterable[ChunkResult],
    buffers: Callable[[str], Buffer],
    progress: Progress,
    result: ImportResult,
    lane: Lane,
) -> None:
    resume = _Resume()
    with tempfile.TemporaryFile("w+b") as spool:
        for chunk in results:
            _tally(result, chunk)
            if result.ok and chunk.valid:  # after a bad row, nothing will be enqueued
                pickle.dump(chunk.pieces, spool, pickle.HIGHEST_PROTOCOL)
                resume.add(chunk.routed, chunk.last_line)
            progress("validating", chunk.last_line)
        if not result.ok:
            return
        spool.seek(0)
        with _Enqueuers(buffers, lane) as enqueuer:
            try:
                for split in _unspooled(spool):
                    done = enqueuer.count
                    enqueuer.add(split)
                    if enqueuer.count != done:
                        progress("enqueuing", enqueuer.count)
                enqueuer.finish()
            except RedisError as exc:
                enqueuer.settle()
                raise _interrupted(path, exc, enqueuer, resume, resume.total) from None
            progress("enqueuing", enqueuer.count)
            result.enqueued = enqueuer.count
            result.stale = enqueuer.stale
            result.by_workspace = enqueuer.counts


def _enqueue_valid_rows(
    path: Path,
    results: Iterable[ChunkResult],
    buffers: Callable[[str], Buffer],
    progress: Progress,
    result: ImportResult,
    rejects_file: IO[str] | None,
    lane: Lane,
) -> None:
    resume = _Resume()
    with _Enqueuers(buffers, lane) as enqueuer:
        try:
            for chunk in results:
                _tally(result, chunk)
                if rejects_file is not None:
                    for error in chunk.errors:
                        record = {"line": error.line, "field": error.field, "error": error.message}
                        rejects_file.write(json.dumps(record) + "\n")
                resume.add(chunk.routed, chunk.last_line)
                if chunk.valid:
                    enqueuer.add(chunk.by_workspace())
                progress("enqueuing", chunk.last_line)
            enqueuer.finish()
        except RedisError as exc:
            enqueuer.settle()
            raise _interrupted(path, exc, enqueuer, resume, resume.total) from None
        result.enqueued = enqueuer.count
        result.stale = enqueuer.stale
        result.by_workspace = enqueuer.counts


def enqueue_file(
    path: Path,
    buffer: Buffer | Callable[[str], Buffer],
    *,
    skip_invalid: bool = False,
    rejects: Path | None = None,
    progress: Progress = _noop,
    jobs: int | None = None,
    chunk_lines: int = CHUNK_LINES,
    parallel_min_bytes: int = PARALLEL_MIN_BYTES,
    respect_opt_outs: bool = False,
    from_line: int = 1,
    lane: Lane = Lane.BULK,
    routes: Routes | None = None,
    workspace: str | None = None,
) -> ImportResult:
    """Import a file: validate it all first (unless `skip_invalid`), then enqueue in order.

    `jobs` processes validate it (None: one per CPU; 1: this process); files under
    `parallel_min_bytes` are validated here. `result.jobs` says how many did.
    `respect_opt_outs` sets `respect_opt_out` on every row. `from_line` skips the rows
    before that line (resuming an import Redis interrupted: `ImportInterrupted` says where).
    `lane` is the lane of the rows that name none (bulk: an import uses what live leaves).

    Every row is routed to a workspace (`routes`; `workspace`: of rows that name none) and
    enqueued into that workspace's buffer (`buffer`: a function of the workspace's name,
    or one `Buffer`, which is then the only workspace).
    """
    path = Path(path)
    if isinstance(buffer, Buffer):
        only = buffer
        routes = routes or Routes((only.keys.workspace,))
        buffers: Callable[[str], Buffer] = lambda _workspace: only  # noqa: E731
    else:
        buffers = buffer
    result = ImportResult(jobs=parallel_jobs(path, jobs, parallel_min_bytes))
    checked = functools.partial(
        checked_chunks,
        path,
        result.jobs,
        chunk_lines,
        respect_opt_outs,
        from_line,
        routes,
        workspace,
    )
    if not skip_invalid:
        results = checked()
        with contextlib.closing(results):
            _validate_then_enqueue(path, results, buffers, progress, result, lane)
        return result

    # --skip-invalid: one pass; bad rows go to the rejects file as they come.
    with _rejects_writer(rejects) as rejects_file:
        results = checked()
        with contextlib.closing(results):
            _enqueue_valid_rows(path, results, buffers, progress, result, rejects_file, lane)
    return result
