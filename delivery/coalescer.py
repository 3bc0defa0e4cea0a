"""One coalescer tick: sweep lost batches, then cut due changes into batches and send them.

Runs as the beat task `subscriptions.coalesce`. Two beats by mistake are harmless: a Redis
lock makes their ticks take turns, and even without it `take_batch.lua` lets each change
enter one batch only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from config.settings import Settings
from core.linger import BudgetRate, Load, linger_ms, pressure
from core.planning import PendingChange, PlannedBatch, pack_batches, plan_batches
from stores import counters
from stores.batch_records import BatchStore
from stores.buffer import Buffer, server_time_ms
from stores.dead_letters import DeadLetters
from stores.limiter import RateLimiter

# Seconds of our own requests that count as "recent use" of the budget.
RECENT_SECONDS = 5

logger = logging.getLogger("braze_subs.coalescer")


@dataclass(frozen=True, slots=True)
class TickReport:
    redispatched: int = 0
    batches: int = 0
    identifiers: int = 0
    skipped: bool = False  # another tick held the lock
    ticks: int = 1  # ticks run by one `run` (1 for `tick`)
    pressure: float = 0.0  # on the shared budget, in [0, 1] (see core/linger.py)
    linger_ms: int = 0  # what this tick let partial batches wait
    backlog: bool = False  # more changes were due than one tick reads
    next_check_ms: int | None = None  # Redis time a held partial batch becomes ready
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
        dispatch: Callable[[str], object],
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.store = store
        self.limiter = limiter
        self.dispatch = dispatch

    def run(self, seconds: float) -> TickReport:
        """Tick, then keep ticking for up to `seconds` while the pipeline is light: at once
        when a producer nudges, or when a lingering partial batch becomes ready. Under a
        backlog one tick per call, as beat sends them. Returns the last tick's report with
        the totals of all."""
        deadline = time.monotonic() + seconds
        report = self.tick()
        ticks, batches, identifiers = 1, report.batches, report.identifiers
        redispatched = report.redispatched
        # A tick skipped because another holds the lock (the previous beat's run, still
        # awake) keeps waiting: two runs overlap by design, so no gap opens between them;
        # each nudge wakes one of them (BLPOP), never both.
        while not report.backlog:
            remaining = deadline - time.monotonic()
            if report.next_check_ms is not None:
                # A partial batch lingers for company: tick again when it becomes ready
                # (a nudge would not make it readier, so this is a plain timed wait).
                wait = max(0.01, (report.next_check_ms - report.now_ms) / 1000)
                if wait >= remaining:
                    break
                time.sleep(wait)
            elif remaining <= 0.01 or not self.buffer.wait_for_nudge(remaining):
                break
            report = self.tick()
            ticks += 1
            batches += report.batches
            identifiers += report.identifiers
            redispatched += report.redispatched
        return _totals(report, ticks, batches, identifiers, redispatched)

    def tick(self) -> TickReport:
        settings = self.settings
        lock = self.buffer.client.lock(
            self.buffer.keys.coalesce_lock,
            # Short: a worker killed mid-tick must not stop coalescing for long. A tick that
            # outlives it only lets another run beside it, which take_batch.lua makes safe.
            timeout=max(3.0, settings.coalesce_interval_seconds * 3),
            blocking=False,
        )
        if not lock.acquire():
            return TickReport(skipped=True)
        try:
            report = self._tick()
        finally:
            lock.release()
        # When the coalescer last made progress: the exporter's "no coalescer tick" alert.
        self.buffer.client.set(self.buffer.keys.coalesce_last_tick, report.now_ms)
        return report

    def _tick(self) -> TickReport:
        settings = self.settings
        now_ms = server_time_ms(self.buffer.client)
        redispatch_ms = round(settings.batch_redispatch_seconds * 1000)

        # Batches whose task should long have finished: the message or its worker was lost.
        overdue = self.store.overdue(now_ms)
        for batch_id in overdue:
            self.dispatch(batch_id)
        self.store.postpone(overdue, now_ms + redispatch_ms)
        if overdue:
            logger.warning("re-dispatched %d batches whose task was lost", len(overdue))

        retention_ms = settings.dead_letter_retention_days * 86_400_000
        dead_letters = DeadLetters(
            self.buffer.client, self.buffer.keys, self.buffer.scripts, self.buffer.retention
        )
        for entry in dead_letters.expire(now_ms - retention_ms):
            logger.warning(
                "dead-letter entry %s expired after %g days: group=%s state=%s identifiers=%d "
                "error=%r",
                entry.id,
                settings.dead_letter_retention_days,
                entry.subscription_group_id,
                entry.subscription_state,
                len(entry.identifiers),
                entry.error,
            )

        budget = settings.max_batches_in_flight - self.store.count()
        if budget <= 0:
            return TickReport(redispatched=len(overdue), backlog=True, now_ms=now_ms)
        # Read a full tick's worth even under back-pressure: the more of each key is seen,
        # the fuller its batches.
        changes, more = self.buffer.read_due(now_ms, settings.coalesce_max_changes_per_tick)
        load_now = pressure(
            self._load(now_ms, len(changes), more),
            BudgetRate(self.limiter.requests_per_second),
            max_linger_ms=settings.batch_linger_seconds * 1000,
            max_identifiers=settings.batch_max_identifiers,
        )
        linger = linger_ms(
            load_now,
            max_linger_ms=settings.batch_linger_seconds * 1000,
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
            max_hold_ms=round(settings.batch_max_hold_seconds * 1000),
        )
        packs = pack_batches(plan, max_identifiers=settings.batch_max_identifiers)
        taken = self.buffer.take(packs, redispatch_ms)
        # One message per pack, for its first batch: a v2 worker claims the rest of the pack
        # and sends it in one request; a v1 worker sends the others messages of their own.
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
        return TickReport(
            redispatched=len(overdue),
            batches=batches,
            identifiers=identifiers,
            pressure=round(load_now, 3),
            linger_ms=linger,
            backlog=more,
            next_check_ms=_held_until(changes, plan, linger, now_ms),
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


def _totals(
    last: TickReport, ticks: int, batches: int, identifiers: int, redispatched: int
) -> TickReport:
    return TickReport(
        redispatched=redispatched,
        batches=batches,
        identifiers=identifiers,
        skipped=last.skipped and ticks == 1,
        ticks=ticks,
        pressure=last.pressure,
        linger_ms=last.linger_ms,
        backlog=last.backlog,
        next_check_ms=last.next_check_ms,
        now_ms=last.now_ms,
    )
