"""One coalescer tick: recover, dispatch what is due, then cut due changes into batches.

Runs as the beat task `subscriptions.coalesce`. Each tick, in this order:

1. takes back the batches of workers whose heartbeat is gone (and claims whose lease ran
   out): they become due now (`BatchStore.take_back`);
2. sends a message for every batch due in the schedule: retries, 429 pauses, turns in the
   budget, batches taken back or handed back (`BatchStore.dispatch_due`);
3. sends another message for a batch whose message was lost (the sweep, a backstop);
4. cuts due changes into new batches and sends their messages.

Two beats by mistake are harmless: a Redis lock makes their ticks take turns, and even
without it each step is one atomic script (a change enters one batch, a schedule entry
gets one message).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from config.settings import Settings
from core.linger import BudgetRate, Load, linger_ms, pressure
from core.planning import PendingChange, PlannedBatch, pack_batches, plan_batches
from stores import counters
from stores.batch_records import BatchStore
from stores.buffer import Buffer
from stores.clock import server_time_ms
from stores.heartbeats import Heartbeats
from stores.limiter import RateLimiter

# Seconds of our own requests that count as "recent use" of the budget.
RECENT_SECONDS = 5

logger = logging.getLogger("braze_subs.coalescer")


# Most schedule entries one tick sends messages for (the rest go on the next tick).
DISPATCH_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class TickReport:
    redispatched: int = 0  # messages sent again by the sweep (lost messages)
    recovered: int = 0  # batches taken back from dead workers or ended leases
    dispatched: int = 0  # messages for batches due in the schedule
    batches: int = 0
    identifiers: int = 0
    skipped: bool = False  # another tick held the lock
    ticks: int = 1  # ticks run by one `run` (1 for `tick`)
    pressure: float = 0.0  # on the shared budget, in [0, 1] (see core/linger.py)
    linger_ms: int = 0  # what this tick let partial batches wait
    backlog: bool = False  # more changes were due than one tick reads
    next_check_ms: int | None = None  # Redis time a partial batch or a waiting one is due
    now_ms: int = 0  # Redis time of the tick


def _held_until(
    changes: list[PendingChange], plan: list[PlannedBatch], linger: int, now_ms: int
) -> int | None:
    """When the oldest due change left out of `plan` (a partial batch lingering) is ready."""
    planned = {(m.group_id, m.kind, m.value) for batch in plan for m in batch.members}
    held = [c.due_ms for c in changes if (c.group_id, c.kind, c.value) not in planned]
    return max(now_ms, min(held) + linger) if held else None


class Coalescer:
    def __init__(
        self,
        settings: Settings,
        buffer: Buffer,
        store: BatchStore,
        limiter: RateLimiter,
        heartbeats: Heartbeats,
        dispatch: Callable[[str], object],
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.store = store
        self.limiter = limiter
        self.heartbeats = heartbeats
        self.dispatch = dispatch  # sends one "post this batch now" message

    def run(self, seconds: float) -> TickReport:
        """Tick, then keep ticking for up to `seconds` while the pipeline is light: at once
        when a producer (or a worker scheduling a batch due now) nudges, or when a lingering
        partial batch or a waiting batch becomes due. Under a
        backlog one tick per call, as beat sends them. Returns the last tick's report with
        the totals of all."""
        deadline = time.monotonic() + seconds
        report = self.tick()
        totals = report
        # A tick skipped because another holds the lock (the previous beat's run, still
        # awake) keeps waiting: two runs overlap by design, so no gap opens between them;
        # each nudge wakes one of them (BLPOP), never both.
        while not report.backlog:
            remaining = deadline - time.monotonic()
            if remaining <= 0.01:
                break
            wait = remaining
            if report.next_check_ms is not None:
                # A partial batch lingers for company, or a batch waits in the schedule:
                # tick again when it is due, or sooner on a nudge.
                wait = min(remaining, max(0.01, (report.next_check_ms - report.now_ms) / 1000))
            if not self.buffer.wait_for_nudge(wait) and wait >= remaining:
                break
            report = self.tick()
            totals = _added(totals, report)
        return replace(
            report,
            ticks=totals.ticks,
            batches=totals.batches,
            identifiers=totals.identifiers,
            redispatched=totals.redispatched,
            recovered=totals.recovered,
            dispatched=totals.dispatched,
            skipped=report.skipped and totals.ticks == 1,
        )

    def tick(self) -> TickReport:
        settings = self.settings
        # Short: a worker killed mid-tick must not stop coalescing for long. A tick that
        # outlives it only lets another run beside it, which the scripts make safe.
        lock = self.buffer.tick_lock(max(3.0, settings.coalesce_interval_seconds * 3))
        if not lock.acquire():
            return TickReport(skipped=True)
        try:
            report = self._tick()
        finally:
            lock.release()
        # When the coalescer last made progress: the exporter's "no coalescer tick" alert.
        self.buffer.mark_tick(report.now_ms)
        return report

    def _recover(self, now_ms: int) -> tuple[int, int, int]:
        """Steps 1-3 of a tick; returns (taken back, dispatched from the schedule, swept)."""
        settings = self.settings
        grace_ms = settings.redispatch_grace_ms
        suspects = self.heartbeats.suspects(now_ms, settings.heartbeat_ttl_ms)
        taken = self.store.take_back(
            suspects, on_wire_ms=settings.http_timeout_ms, grace_ms=grace_ms
        )
        if taken.batch_ids:
            logger.warning(
                "took back %d batches from stopped workers or ended leases (%d had been sent: "
                "their outcome is unknown, they are posted again)",
                len(taken.batch_ids),
                taken.sent_before,
            )
        due = self.store.dispatch_due(DISPATCH_LIMIT, grace_ms)
        for batch_id in due:
            self.dispatch(batch_id)
        lost = self.store.sweep(DISPATCH_LIMIT, grace_ms)
        for batch_id in lost:
            self.dispatch(batch_id)
        if lost:
            logger.warning("re-dispatched %d batches whose message was lost", len(lost))
        return len(taken.batch_ids), len(due), len(lost)

    def _tick(self) -> TickReport:
        settings = self.settings
        now_ms = server_time_ms(self.buffer.client)
        recovered, dispatched, swept = self._recover(now_ms)
        moved = {"redispatched": swept, "recovered": recovered, "dispatched": dispatched}

        budget = settings.max_batches_in_flight - self.store.count()
        if budget <= 0:
            return TickReport(**moved, backlog=True, now_ms=now_ms)
        # Read a full tick's worth even under back-pressure: the more of each key is seen,
        # the fuller its batches.
        changes, more = self.buffer.read_due(now_ms, settings.coalesce_max_changes_per_tick)
        load_now = pressure(
            self._load(now_ms, len(changes), more),
            BudgetRate(self.limiter.requests_per_second),
            max_linger_ms=settings.batch_linger_ms,
            max_identifiers=settings.batch_max_identifiers,
        )
        linger = linger_ms(
            load_now,
            max_linger_ms=settings.batch_linger_ms,
            low=settings.batch_linger_pressure_low,
            high=settings.batch_linger_pressure_high,
        )
        plan = plan_batches(
            changes,
            now_ms=now_ms,
            max_identifiers=settings.batch_max_identifiers,
            linger_ms=linger,
            max_batches=budget,
            backlog=more,
            max_hold_ms=settings.batch_max_hold_ms,
        )
        if settings.braze_api_version == "v2":
            packs = pack_batches(plan, max_identifiers=settings.batch_max_identifiers)
        else:
            packs = [[batch] for batch in plan]
        taken = self.buffer.take(packs, settings.redispatch_grace_ms)
        # One message per pack, for its first batch: a v2 worker claims the rest of the pack
        # and sends it in one request (v1 packs hold one batch each).
        for pack in taken:
            self.dispatch(pack[0][0])
        batches = sum(len(pack) for pack in taken)
        identifiers = sum(size for pack in taken for _batch_id, size in pack)
        if taken:
            logger.info(
                "cut %d batches (%d requests for v2) holding %d identifiers",
                batches,
                len(taken),
                identifiers,
            )
        held_until = _held_until(changes, plan, linger, now_ms)
        next_due = self.store.next_due_ms()
        checks = [t for t in (held_until, next_due) if t is not None]
        return TickReport(
            **moved,
            batches=batches,
            identifiers=identifiers,
            pressure=round(load_now, 3),
            linger_ms=linger,
            backlog=more,
            next_check_ms=max(now_ms, min(checks)) if checks else None,
            now_ms=now_ms,
        )

    def _load(self, now_ms: int, due: int, more: bool) -> Load:
        recent = counters.recent(self.buffer.client, self.buffer.keys, now_ms, RECENT_SECONDS)
        return Load(
            recent_requests=recent.requests,
            recent_seconds=RECENT_SECONDS - 1 + (now_ms % 1000) / 1000,
            committed_ahead_ms=self.limiter.committed_ahead_ms(now_ms),
            due_changes=due,
            more_due=more,
            arrivals_per_second=counters.arrival_rate(
                self.buffer.client, self.buffer.keys, now_ms, RECENT_SECONDS * 1000
            ),
        )


def _added(totals: TickReport, tick: TickReport) -> TickReport:
    return replace(
        totals,
        ticks=totals.ticks + 1,
        batches=totals.batches + tick.batches,
        identifiers=totals.identifiers + tick.identifiers,
        redispatched=totals.redispatched + tick.redispatched,
        recovered=totals.recovered + tick.recovered,
        dispatched=totals.dispatched + tick.dispatched,
    )
