"""`braze-subs verify FILE [--repair [--resubscribe]]`: does Braze hold what FILE says?

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
   repaired. For the others that differ, the row is weighed against what braze-subs has
   accepted since (`ConsentHistory.latest_accepted`: the watermark and its change's state):

   - `superseded`: a change accepted after the row's time set another state (or one whose
     state the history no longer holds): the row is out of date, never repaired;
   - `beyond_retention`: no watermark is retained and the row is older than
     WATERMARK_RETENTION_DAYS: whether a newer change was accepted cannot be known, so it
     is not repaired either;
   - `opted_out_in_braze`: the row says subscribed, Braze unsubscribed (a footer link, an
     SMS STOP): re-subscribed only with `resubscribe`, after the caller has said how many;
   - `drift` / `unknown`: repaired with `repair`.

   A row's time is its `occurred_at`; a row without one stands for the state when the file
   was last written, its modification time (never later than now). A repair is enqueued
   as a normal change (the producer path: coalescer, budget, ordering and dead letters all
   apply) carrying that time, or the watermark's when the latest accepted change set the
   row's state, so enqueue.lua drops it as stale, atomically, if a newer change was
   accepted between the read and the enqueue (then it counts as `superseded`); and after
   one more look that no change for it waits or flies.

Mismatches are kept in the spool too and streamed out at the end, each with its outcome.

Several workspaces (BRAZE_WORKSPACES_FILE, issue 23): each row is routed in pass 1 (its
`workspace`, else its group's in the file, else the command's `--workspace`, else the only
workspace); a row that fits none is a bad row, named by its line. Pass 2 reads each row
from its workspace's Braze through that workspace's read budget, weighs it against that
workspace's history, and repairs it into that workspace's buffer.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from redis import Redis

from core.changes import Change, IdentifierKind, InvalidChange, Lane, SubscriptionState
from core.routing import DEFAULT_WORKSPACE
from delivery.braze_reads import MAX_READ_IDENTIFIERS, BrazeReader, ReadState
from stores.buffer import Buffer
from stores.clock import server_time_ms
from stores.history import ConsentHistory, Retention
from stores.keys import Keys, buffer_field
from tasks.rows import RowError, iter_changes

# Row errors kept for the report; beyond it they are only counted.
MAX_ERRORS_KEPT = 1000
# Rows written to the spool per transaction.
SPOOL_BATCH = 10_000

# Called with (phase, done, total): phase "validating" (lines) or "reading" (identifiers).
Progress = Callable[[str, int, int], None]
# One chunk's read: for each identifier, whether a change for it is pending or in flight
# here; and what Braze holds.
Read = tuple[list[bool], dict[str, ReadState]]


def _noop(_phase: str, _done: int, _total: int) -> None:
    return None


# What became of a row whose identifier Braze holds in another state than the row says
# (or does not know), and no change for it is pending or in flight here.
DRIFT = "drift"  # Braze holds the other state: repaired
UNKNOWN = "unknown"  # Braze does not know the identifier in that group: repaired
SUPERSEDED = "superseded"  # a change accepted after the row set another state: left alone
BEYOND_RETENTION = "beyond_retention"  # older than any watermark kept: left alone
OPTED_OUT = "opted_out_in_braze"  # row subscribed, Braze unsubscribed: only --resubscribe
OUTCOMES = (DRIFT, UNKNOWN, SUPERSEDED, BEYOND_RETENTION, OPTED_OUT)


def weigh(
    expected: str,
    braze: ReadState,
    row_ms: int,
    accepted: tuple[int | None, str | None],
    horizon_ms: int,
) -> str:
    """The outcome of a row Braze does not match (pure): see the module's docstring."""
    mark, state = accepted
    if mark is not None and mark > row_ms and state != expected:
        return SUPERSEDED
    if mark is None and row_ms < horizon_ms:
        return BEYOND_RETENTION
    if expected == SubscriptionState.SUBSCRIBED and braze is ReadState.UNSUBSCRIBED:
        return OPTED_OUT
    return UNKNOWN if braze is ReadState.UNKNOWN else DRIFT


def repair_time(row_ms: int, accepted: tuple[int | None, str | None]) -> int:
    """When a repair occurred: the row's time, or the watermark's when the latest accepted
    change (later than the row) set the row's state — the repair re-applies that change, so
    it must not lose to it, and still loses to anything newer."""
    mark, _state = accepted
    return row_ms if mark is None else max(row_ms, mark)


@dataclass(frozen=True, slots=True)
class Mismatch:
    line: int
    subscription_group_id: str
    kind: str
    value: str
    expected: str
    braze: str  # subscribed | unsubscribed | unknown
    outcome: str = DRIFT  # one of OUTCOMES
    workspace: str = DEFAULT_WORKSPACE  # whose Braze was read

    def as_dict(self) -> dict[str, Any]:
        return {
            "subscription_group_id": self.subscription_group_id,
            "kind": self.kind,
            "value": self.value,
            "expected": self.expected,
            "braze": self.braze,
            "line": self.line,
            "outcome": self.outcome,
            "workspace": self.workspace,
        }


@dataclass(slots=True)
class GroupCounts:
    checked: int = 0
    matching: int = 0
    drift: int = 0  # Braze holds the other state
    unknown: int = 0  # Braze does not know the identifier in that group
    changing: int = 0  # a change for it is pending or in flight here
    superseded: int = 0  # a change accepted since the row set another state
    beyond_retention: int = 0  # older than the watermarks kept, none held
    opted_out_in_braze: int = 0  # row subscribed, Braze unsubscribed

    def as_dict(self) -> dict[str, int]:
        return {
            "checked": self.checked,
            "matching": self.matching,
            "drift": self.drift,
            "unknown": self.unknown,
            "changing": self.changing,
            "superseded": self.superseded,
            "beyond_retention": self.beyond_retention,
            "opted_out_in_braze": self.opted_out_in_braze,
        }


@dataclass(slots=True)
class VerifyReport:
    rows: int = 0  # rows in the file
    invalid: int = 0
    errors: list[RowError] = field(default_factory=list)
    totals: GroupCounts = field(default_factory=GroupCounts)
    groups: dict[str, GroupCounts] = field(default_factory=dict)
    workspaces: dict[str, GroupCounts] = field(default_factory=dict)  # the same, by workspace
    repaired: int = 0  # repairs enqueued and accepted (re-subscriptions included)
    resubscribed: int = 0  # of those, opted out in Braze and re-subscribed (--resubscribe)
    read_calls: int = 0

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    @property
    def drifted(self) -> bool:
        """Braze does not hold what the file says for some identifier, and nothing here
        explains it: drift, unknown, or too old to tell (superseded rows and Braze's own
        opt-outs are accounted for)."""
        totals = self.totals
        return totals.drift + totals.unknown + totals.beyond_retention > 0

    def count(self, group_id: str, outcome: str, workspace: str = DEFAULT_WORKSPACE) -> None:
        counts = self.groups.setdefault(group_id, GroupCounts())
        mine = self.workspaces.setdefault(workspace, GroupCounts())
        for target in (counts, mine, self.totals):
            target.checked += 1
            setattr(target, outcome, getattr(target, outcome) + 1)

    def recount(
        self, group_id: str, was: str, now: str, workspace: str = DEFAULT_WORKSPACE
    ) -> None:
        """A row's outcome changed (its repair lost to a change accepted meanwhile)."""
        for target in (self.groups[group_id], self.workspaces[workspace], self.totals):
            setattr(target, was, getattr(target, was) - 1)
            setattr(target, now, getattr(target, now) + 1)


class Side:
    """One workspace as `verify` uses it: its Braze (through its read budget: `reader`, or
    `make_reader` called the first time a row of the workspace is read, so a workspace no
    row goes to needs no key), its keys, and its buffer for repairs (None: no repairs)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        buffer: Buffer | None = None,
        *,
        reader: BrazeReader | None = None,
        make_reader: Callable[[], BrazeReader] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.buffer = buffer
        self._reader = reader
        self._make_reader = make_reader
        self.history = ConsentHistory(redis, keys, buffer.scripts if buffer else None)

    @property
    def reader(self) -> BrazeReader:
        if self._reader is None:
            assert self._make_reader is not None, "a Side needs a reader or make_reader"
            self._reader = self._make_reader()
        return self._reader

    @property
    def calls(self) -> int:
        return self._reader.calls if self._reader is not None else 0


# Which workspace a valid row goes to; raises `InvalidChange` for a row that fits none.
Route = Callable[[Change], str]


class Verification:
    """One run of `verify`: the spool lives as long as this object (use it as a context
    manager); `mismatches()` streams what `check` found, in file order. Repairs go into
    `buffer` (None: nothing is repaired). Several workspaces: `Verification.across`."""

    def __init__(
        self,
        reader: BrazeReader,
        redis: Redis,
        keys: Keys,
        *,
        buffer: Buffer | None = None,
        spool_dir: Path | None = None,
        sides: dict[str, Side] | None = None,
        route: Route | None = None,
    ) -> None:
        self.sides = sides or {DEFAULT_WORKSPACE: Side(redis, keys, buffer, reader=reader)}
        only = next(iter(self.sides))
        self.route: Route = route or (lambda _change: only)
        first = self.sides[only]
        self.redis = first.redis  # one Redis: its clock (the horizon) is every workspace's
        self.buffer = first.buffer
        # Rows without occurred_at stand for the state when the file was written (`load`).
        self.written_ms = 0
        # Older than this (Redis's clock less the watermark retention), a row without a
        # watermark may be older than a change whose watermark has expired (`check`).
        self.horizon_ms = 0
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
                ws TEXT NOT NULL, grp TEXT NOT NULL, kind TEXT NOT NULL, value TEXT NOT NULL,
                state TEXT NOT NULL, doi INTEGER NOT NULL, line INTEGER NOT NULL,
                occurred INTEGER,
                PRIMARY KEY (ws, grp, kind, value)
            ) WITHOUT ROWID;
            CREATE TABLE mismatch (
                line INTEGER PRIMARY KEY, grp TEXT, kind TEXT, value TEXT,
                expected TEXT, braze TEXT, outcome TEXT, doi INTEGER, repair_ms INTEGER,
                ws TEXT
            );
            """
        )
        self.report = VerifyReport()
        self._used: set[str] = set()  # the workspaces rows go to (`load`)

    @classmethod
    def across(
        cls, sides: dict[str, Side], route: Route, *, spool_dir: Path | None = None
    ) -> Verification:
        """A run over several workspaces: each row goes where `route` says."""
        first = next(iter(sides.values()))
        return cls(
            None,  # type: ignore[arg-type]  # the sides' readers
            first.redis,
            first.keys,
            buffer=first.buffer,
            spool_dir=spool_dir,
            sides=sides,
            route=route,
        )

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
        # Read before the rows: a file rewritten meanwhile is only taken as newer.
        self.written_ms = min(round(os.stat(path).st_mtime * 1000), round(time.time() * 1000))
        insert = (
            "INSERT INTO expected VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (ws, grp, kind, value) "
            "DO UPDATE SET state = excluded.state, doi = excluded.doi, line = excluded.line, "
            "occurred = excluded.occurred"
        )
        batch: list[tuple[str, str, str, str, str, int, int, int | None]] = []
        for line, item in iter_changes(path):
            report.rows += 1
            if not isinstance(item, RowError):
                try:
                    workspace = self.route(item)
                except InvalidChange as refused:  # fits no workspace: a bad row
                    item = RowError(line, refused.field, refused.message)
            if isinstance(item, RowError):
                report.invalid += 1
                if len(report.errors) < MAX_ERRORS_KEPT:
                    report.errors.append(item)
            elif report.ok:
                self._used.add(workspace)
                batch.append(
                    (
                        workspace,
                        item.group_id,
                        item.kind,
                        item.value,
                        item.state,
                        item.double_opt_in,
                        line,
                        item.occurred_ms,
                    )
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

    def workspaces(self) -> list[str]:
        """The workspaces the valid rows go to (after `load`), in the deployment's order."""
        return [name for name in self.sides if name in self._used]

    def _write(self, sql: str, batch: list[tuple[Any, ...]]) -> None:
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
        """Read Braze for every spooled identifier and compare; with `repair`, enqueue the
        drift and unknown rows again as they are found. Raises `BrazeReadError` when Braze
        cannot be read (what was checked and repaired until then stands). Rows opted out in
        Braze are left for `resubscribe`.

        `concurrency` reads are in the air at once (each waits for its own turn in the read
        budget): at Braze's ~0.1-0.3 s per answer, one at a time would use a tenth of the
        budget. Results are settled here, in order, on this thread (the spool is not shared
        between threads); at most 2 x `concurrency` chunks are read ahead.
        """
        retention = self.buffer.retention if self.buffer is not None else Retention()
        self.horizon_ms = server_time_ms(self.redis) - retention.watermark_ms
        rows = self._db.execute(
            "SELECT grp, kind, value, state, doi, line, occurred, ws FROM expected "
            "ORDER BY ws, grp, kind, value"
        )
        chunks = (
            (workspace, group_id, kind, chunk)
            for (workspace, group_id, kind), members in groupby(
                rows, key=lambda row: (row[7], row[0], row[1])
            )
            for chunk in _chunks(members, MAX_READ_IDENTIFIERS)
        )
        for workspace in self.workspaces():
            self.sides[workspace].reader  # noqa: B018  # made here, not on a pool thread
        done = 0
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="verify")
        in_flight: deque[tuple[str, str, str, list[tuple[Any, ...]], Future[Read]]] = deque()
        try:
            for workspace, group_id, kind, chunk in chunks:
                values = [row[2] for row in chunk]
                future = pool.submit(self._read, workspace, group_id, kind, values)
                in_flight.append((workspace, group_id, kind, chunk, future))
                if len(in_flight) >= 2 * max(1, concurrency):
                    done += self._settle(*in_flight.popleft(), repair)
                    progress("reading", done, total)
            while in_flight:
                done += self._settle(*in_flight.popleft(), repair)
                progress("reading", done, total)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.report.read_calls = sum(side.calls for side in self.sides.values())

    def _read(self, workspace: str, group_id: str, kind: str, values: list[str]) -> Read:
        """One chunk's read (on a pool thread): Redis before, Braze, Redis after."""
        before = self._changing(workspace, group_id, kind, values)
        states = self.sides[workspace].reader.statuses(group_id, kind, values)
        after = self._changing(workspace, group_id, kind, values)
        return [was or now for was, now in zip(before, after, strict=True)], states

    def _settle(
        self,
        workspace: str,
        group_id: str,
        kind: str,
        chunk: list[tuple[Any, ...]],
        future: Future[Read],
        repair: bool,
    ) -> int:
        changing, states = future.result()
        report = self.report
        differing: list[tuple[tuple[Any, ...], ReadState]] = []
        for row, busy in zip(chunk, changing, strict=True):
            braze = states[row[2]]
            if braze.value == row[3]:
                report.count(group_id, "matching", workspace)
            elif busy:
                report.count(group_id, "changing", workspace)
            else:
                differing.append((row, braze))
        if not differing:
            return len(chunk)
        accepted = self.sides[workspace].history.latest_accepted(
            group_id, kind, [row[2] for row, _braze in differing]
        )
        wrong: list[tuple[Any, ...]] = []
        for (row, braze), latest in zip(differing, accepted, strict=True):
            value, expected, doi, line, occurred = row[2], row[3], row[4], row[5], row[6]
            row_ms = self.written_ms if occurred is None else occurred
            outcome = weigh(expected, braze, row_ms, latest, self.horizon_ms)
            report.count(group_id, outcome, workspace)
            wrong.append(
                (line, group_id, kind, value, expected, braze.value, outcome, doi,
                 repair_time(row_ms, latest), workspace)
            )  # fmt: skip
        with self._db:
            self._db.executemany(
                "INSERT INTO mismatch VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", wrong
            )
        if repair and self.buffer is not None:
            drifted = [m for m in wrong if m[6] in (DRIFT, UNKNOWN)]
            self._repair(workspace, group_id, kind, drifted)
        return len(chunk)

    def resubscribe(self) -> int:
        """Re-subscribe the rows Braze holds as opted out (`--resubscribe`, after the caller
        has said how many: `report.totals.opted_out_in_braze`); returns how many were
        enqueued. The same path and checks as any repair."""
        if self.buffer is None:
            return 0
        rows = self._db.execute(
            "SELECT line, grp, kind, value, expected, braze, outcome, doi, repair_ms, ws "
            "FROM mismatch WHERE outcome = ? ORDER BY ws, grp, kind, value",
            (OPTED_OUT,),
        ).fetchall()  # a list: the spool is updated while the rows are repaired
        before = self.report.repaired
        for (workspace, group_id, kind), members in groupby(
            rows, key=lambda row: (row[9], row[1], row[2])
        ):
            for chunk in _chunks(members, MAX_READ_IDENTIFIERS):
                self._repair(workspace, group_id, kind, chunk)
        self.report.resubscribed = self.report.repaired - before
        return self.report.resubscribed

    def _repair(
        self, workspace: str, group_id: str, kind: str, wrong: list[tuple[Any, ...]]
    ) -> None:
        """Enqueue each row again into its workspace's buffer, one change per script call so
        that each one's fate is known: enqueue.lua drops it as stale if a change that
        occurred later was accepted since the read (the row is then superseded after all)."""
        buffer = self.sides[workspace].buffer
        assert buffer is not None
        if not wrong:
            return
        # One more look just before enqueueing: a change that arrived since the read waits
        # or flies, and Braze is about to move; leave that identifier alone.
        quiet = self._changing(workspace, group_id, kind, [row[3] for row in wrong])
        for row, busy in zip(wrong, quiet, strict=True):
            if busy:
                continue
            line, value, expected, outcome, doi, repair_ms = (
                row[0], row[3], row[4], row[6], row[7], row[8]
            )  # fmt: skip
            change = Change(
                group_id=group_id,
                state=SubscriptionState(expected),
                kind=IdentifierKind(kind),
                value=value,
                double_opt_in=bool(doi),
                occurred_ms=repair_ms,
                source="braze-subs verify --repair",
                lane=Lane.BULK,  # a repair uses what live changes leave of the budget
                workspace=workspace,
            )
            stale = buffer.stale
            buffer.enqueue([change])
            if buffer.stale == stale:
                self.report.repaired += 1
            else:
                self.report.recount(group_id, outcome, SUPERSEDED, workspace)
                with self._db:
                    self._db.execute(
                        "UPDATE mismatch SET outcome = ? WHERE line = ?", (SUPERSEDED, line)
                    )

    def _changing(self, workspace: str, group_id: str, kind: str, values: list[str]) -> list[bool]:
        """For each identifier: does a change for it wait in its workspace's buffer or fly
        in a batch?"""
        side = self.sides[workspace]
        fields = [buffer_field(group_id, kind, value) for value in values]
        pipe = side.redis.pipeline(transaction=False)
        pipe.hmget(side.keys.pending, fields)
        pipe.hmget(side.keys.inflight, fields)
        pending, inflight = pipe.execute()
        return [p is not None or f is not None for p, f in zip(pending, inflight, strict=True)]

    # --- results ------------------------------------------------------------------------

    def mismatches(self) -> Iterator[Mismatch]:
        """The rows Braze does not match and that are not changing, in file order, each
        with its outcome, streamed from the spool."""
        cursor = self._db.execute(
            "SELECT line, grp, kind, value, expected, braze, outcome, ws FROM mismatch "
            "ORDER BY line"
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
        "superseded": totals.superseded,
        "beyond_retention": totals.beyond_retention,
        "opted_out_in_braze": totals.opted_out_in_braze,
        "repaired": report.repaired,
        "resubscribed": report.resubscribed,
        "read_calls": report.read_calls,
        "groups": {group: counts.as_dict() for group, counts in sorted(report.groups.items())},
        "workspaces": {name: counts.as_dict() for name, counts in report.workspaces.items()},
    }
    out.write(json.dumps(head)[:-1] + ', "mismatches": [')
    for number, mismatch in enumerate(mismatches):
        out.write((",\n  " if number else "\n  ") + json.dumps(mismatch.as_dict()))
    out.write("\n]}\n")
