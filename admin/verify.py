"""`braze-subs verify FILE [--repair]`: does Braze hold what FILE says?

FILE is in import format; a row's state is the one expected in Braze. Two passes, each
streaming, so a file of 10 million rows needs bounded memory:

1. Validate every row (the import's own rules and messages, by line) into a spool on
   disk, an SQLite table keyed by (group, kind, identifier): a later row for the same
   identifier replaces an earlier one, as it would on import, and the table comes back
   sorted, so the identifiers of one group and kind are read in calls of 100. A bad row
   stops here: nothing is read and nothing enqueued. (SQLite rather than an in-memory
   dict: 10 million identifiers would need gigabytes; rather than an external sort of our
   own: it is in the standard library and does the "last row wins" for free.)
2. Read Braze (`/subscription/status/get`, through the read budget) 100 identifiers at a
   time and compare. An identifier with a pending or in-flight change here — before or
   after the read — is "changing": Braze is about to move, so it is neither drift nor
   repaired. With `repair`, every drifted or unknown row is enqueued again as a normal
   change (the producer path: coalescer, budget, ordering and dead letters all apply),
   after one more look that no change for it arrived meanwhile.

Mismatches are kept in the spool too and streamed out at the end.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from redis import Redis

from core.changes import Change, IdentifierKind, SubscriptionState
from delivery.braze_reads import MAX_READ_IDENTIFIERS, BrazeReader, ReadState
from stores.keys import Keys, buffer_field
from tasks.rows import RowError, iter_changes

# Row errors kept for the report; beyond it they are only counted.
MAX_ERRORS_KEPT = 1000
# Rows written to the spool per transaction.
SPOOL_BATCH = 10_000

# Called with (phase, done, total): phase "validating" (lines) or "reading" (identifiers).
Progress = Callable[[str, int, int], None]
Enqueue = Callable[[list[Change]], int]
# One chunk's read: for each identifier, whether a change for it is pending or in flight
# here; and what Braze holds.
Read = tuple[list[bool], dict[str, ReadState]]


def _noop(_phase: str, _done: int, _total: int) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Mismatch:
    line: int
    subscription_group_id: str
    kind: str
    value: str
    expected: str
    braze: str  # subscribed | unsubscribed | unknown

    def as_dict(self) -> dict[str, Any]:
        return {
            "subscription_group_id": self.subscription_group_id,
            "kind": self.kind,
            "value": self.value,
            "expected": self.expected,
            "braze": self.braze,
            "line": self.line,
        }


@dataclass(slots=True)
class GroupCounts:
    checked: int = 0
    matching: int = 0
    drift: int = 0  # Braze holds the other state
    unknown: int = 0  # Braze does not know the identifier in that group
    changing: int = 0  # a change for it is pending or in flight here

    def as_dict(self) -> dict[str, int]:
        return {
            "checked": self.checked,
            "matching": self.matching,
            "drift": self.drift,
            "unknown": self.unknown,
            "changing": self.changing,
        }


@dataclass(slots=True)
class VerifyReport:
    rows: int = 0  # rows in the file
    invalid: int = 0
    errors: list[RowError] = field(default_factory=list)
    totals: GroupCounts = field(default_factory=GroupCounts)
    groups: dict[str, GroupCounts] = field(default_factory=dict)
    repaired: int = 0
    read_calls: int = 0

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    @property
    def drifted(self) -> bool:
        """Braze does not hold what the file says for some identifier."""
        return self.totals.drift + self.totals.unknown > 0

    def count(self, group_id: str, outcome: str) -> None:
        counts = self.groups.setdefault(group_id, GroupCounts())
        for target in (counts, self.totals):
            target.checked += 1
            setattr(target, outcome, getattr(target, outcome) + 1)


class Verification:
    """One run of `verify`: the spool lives as long as this object (use it as a context
    manager); `mismatches()` streams what `check` found, in file order."""

    def __init__(
        self,
        reader: BrazeReader,
        redis: Redis,
        keys: Keys,
        *,
        enqueue: Enqueue | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.reader = reader
        self.redis = redis
        self.keys = keys
        self.enqueue = enqueue
        self._dir = tempfile.TemporaryDirectory(prefix="braze-subs-verify-", dir=spool_dir)
        self._db = sqlite3.connect(Path(self._dir.name) / "spool.sqlite3")
        # A throw-away spool: no journal, no fsync; a small page cache keeps memory flat.
        self._db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -16384;
            PRAGMA temp_store = FILE;
            CREATE TABLE expected (
                grp TEXT NOT NULL, kind TEXT NOT NULL, value TEXT NOT NULL,
                state TEXT NOT NULL, doi INTEGER NOT NULL, line INTEGER NOT NULL,
                PRIMARY KEY (grp, kind, value)
            ) WITHOUT ROWID;
            CREATE TABLE mismatch (
                line INTEGER PRIMARY KEY, grp TEXT, kind TEXT, value TEXT,
                expected TEXT, braze TEXT
            );
            """
        )
        self.report = VerifyReport()

    def __enter__(self) -> Verification:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    # --- pass 1 -------------------------------------------------------------------------

    def load(self, path: Path, progress: Progress = _noop, total_lines: int = 0) -> int:
        """Validate FILE into the spool; returns the distinct identifiers to check. Row
        errors land in `report` (check `report.ok`); nothing is read from Braze here."""
        report = self.report
        insert = (
            "INSERT INTO expected VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (grp, kind, value) "
            "DO UPDATE SET state = excluded.state, doi = excluded.doi, line = excluded.line"
        )
        batch: list[tuple[str, str, str, str, int, int]] = []
        for line, item in iter_changes(path):
            report.rows += 1
            if isinstance(item, RowError):
                report.invalid += 1
                if len(report.errors) < MAX_ERRORS_KEPT:
                    report.errors.append(item)
            elif report.ok:
                batch.append(
                    (item.group_id, item.kind, item.value, item.state, item.double_opt_in, line)
                )
                if len(batch) >= SPOOL_BATCH:
                    self._write(insert, batch)
                    progress("validating", line, total_lines)
            if report.rows % SPOOL_BATCH == 0:
                progress("validating", line, total_lines)
        if report.ok and batch:
            self._write(insert, batch)
        progress("validating", total_lines, total_lines)
        (distinct,) = self._db.execute("SELECT count(*) FROM expected").fetchone()
        return int(distinct)

    def _write(self, sql: str, batch: list[tuple[str, str, str, str, int, int]]) -> None:
        with self._db:
            self._db.executemany(sql, batch)
        batch.clear()

    # --- pass 2 -------------------------------------------------------------------------

    def check(
        self,
        *,
        repair: bool = False,
        progress: Progress = _noop,
        total: int = 0,
        concurrency: int = 1,
    ) -> None:
        """Read Braze for every spooled identifier and compare; raises `BrazeReadError`
        when Braze cannot be read (what was checked and repaired until then stands).

        `concurrency` reads are in the air at once (each waits for its own turn in the read
        budget): at Braze's ~0.1-0.3 s per answer, one at a time would use a tenth of the
        budget. Results are settled here, in order, on this thread (the spool is not shared
        between threads); at most 2 x `concurrency` chunks are read ahead.
        """
        rows = self._db.execute(
            "SELECT grp, kind, value, state, doi, line FROM expected ORDER BY grp, kind, value"
        )
        chunks = (
            (group_id, kind, chunk)
            for (group_id, kind), members in groupby(rows, key=lambda row: (row[0], row[1]))
            for chunk in _chunks(members, MAX_READ_IDENTIFIERS)
        )
        done = 0
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="verify")
        in_flight: deque[tuple[str, str, list[tuple[Any, ...]], Future[Read]]] = deque()
        try:
            for group_id, kind, chunk in chunks:
                future = pool.submit(self._read, group_id, kind, [row[2] for row in chunk])
                in_flight.append((group_id, kind, chunk, future))
                if len(in_flight) >= 2 * max(1, concurrency):
                    done += self._settle(*in_flight.popleft(), repair)
                    progress("reading", done, total)
            while in_flight:
                done += self._settle(*in_flight.popleft(), repair)
                progress("reading", done, total)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.report.read_calls = self.reader.calls

    def _read(self, group_id: str, kind: str, values: list[str]) -> Read:
        """One chunk's read (on a pool thread): Redis before, Braze, Redis after."""
        before = self._changing(group_id, kind, values)
        states = self.reader.statuses(group_id, kind, values)
        after = self._changing(group_id, kind, values)
        return [was or now for was, now in zip(before, after, strict=True)], states

    def _settle(
        self,
        group_id: str,
        kind: str,
        chunk: list[tuple[Any, ...]],
        future: Future[Read],
        repair: bool,
    ) -> int:
        changing, states = future.result()
        report = self.report
        wrong: list[tuple[Any, ...]] = []
        for row, busy in zip(chunk, changing, strict=True):
            value, expected, line = row[2], row[3], row[5]
            braze = states[value]
            if braze.value == expected:
                report.count(group_id, "matching")
            elif busy:
                report.count(group_id, "changing")
            else:
                report.count(group_id, "unknown" if braze is ReadState.UNKNOWN else "drift")
                wrong.append((line, group_id, kind, value, expected, braze.value))
        if wrong:
            with self._db:
                self._db.executemany("INSERT INTO mismatch VALUES (?, ?, ?, ?, ?, ?)", wrong)
            if repair and self.enqueue is not None:
                self._repair(group_id, kind, wrong, {row[2]: bool(row[4]) for row in chunk})
        return len(chunk)

    def _repair(
        self, group_id: str, kind: str, wrong: list[tuple[Any, ...]], doi: dict[str, bool]
    ) -> None:
        assert self.enqueue is not None
        # One more look just before enqueueing: a change that arrived since the read is newer
        # than this file's row, and must not be overwritten by it.
        quiet = self._changing(group_id, kind, [row[3] for row in wrong])
        changes = [
            Change(
                group_id=group_id,
                state=SubscriptionState(row[4]),
                kind=IdentifierKind(kind),
                value=row[3],
                double_opt_in=doi[row[3]],
            )
            for row, busy in zip(wrong, quiet, strict=True)
            if not busy
        ]
        if changes:
            self.report.repaired += self.enqueue(changes)

    def _changing(self, group_id: str, kind: str, values: list[str]) -> list[bool]:
        """For each identifier: does a change for it wait in the buffer or fly in a batch?"""
        fields = [buffer_field(group_id, kind, value) for value in values]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.pending, fields)
        pipe.hmget(self.keys.inflight, fields)
        pending, inflight = pipe.execute()
        return [p is not None or f is not None for p, f in zip(pending, inflight, strict=True)]

    # --- results ------------------------------------------------------------------------

    def mismatches(self) -> Iterator[Mismatch]:
        """Drifted and unknown rows, in file order, streamed from the spool."""
        cursor = self._db.execute(
            "SELECT line, grp, kind, value, expected, braze FROM mismatch ORDER BY line"
        )
        for row in cursor:
            yield Mismatch(*row)


def _chunks(rows: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_json(report: VerifyReport, mismatches: Iterable[Mismatch], out: Any) -> None:
    """The `--json` object (INTERFACE.md), mismatches streamed one by one, so a report of
    millions of mismatches is never held in memory."""
    totals = report.totals
    head = {
        "checked": totals.checked,
        "matching": totals.matching,
        "drift": totals.drift,
        "unknown": totals.unknown,
        "changing": totals.changing,
        "repaired": report.repaired,
        "read_calls": report.read_calls,
        "groups": {group: counts.as_dict() for group, counts in sorted(report.groups.items())},
    }
    out.write(json.dumps(head)[:-1] + ', "mismatches": [')
    for number, mismatch in enumerate(mismatches):
        out.write((",\n  " if number else "\n  ") + json.dumps(mismatch.as_dict()))
    out.write("\n]}\n")
