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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import LockNotOwnedError
from redis.retry import Retry

from config.settings import Settings
from core.changes import Lane
from core.linger import BudgetRate, Load, linger_ms, pressure
from core.planning import message_groups, pack_batches, plan_cut
from stores import counters
from stores.batch_records import BatchStore, new_call_id
from stores.buffer import Buffer
from stores.clock import server_time_ms
from stores.heartbeats import Heartbeats
from stores.limiter import RateLimiter

# Seconds of our own requests that count as "recent use" of the budget.
RECENT_SECONDS = 5

logger = logging.getLogger("braze_subs.coalescer")


# Most schedule entries one tick sends messages for (the rest go on the next tick).
DISPATCH_LIMIT = 1000


# A tick reads up to this many times the changes its room in flight can take (at least
# MIN_READ), so batches come out full without reading a whole tick's worth for a few.
# It reads the room's worth plus at most MIN_READ first, and the rest of that only when
# what it read did not fill the room (see `Coalescer._read`).
READ_AHEAD = 2
MIN_READ = 2000

# A cut sends several batches in one message only while it is at most this fraction of the
# budget's requests in a beat (see `Coalescer._send_cut`).
MESSAGES_BUDGET_HEADROOM = 4

# Under a backlog, how often at most a run ticks (live-only) for the schedule's due batches.
BACKLOG_DISPATCH_SECONDS = 0.1

# How soon a run whose tick found the lock held ticks again.
SKIPPED_RETRY_SECONDS = 0.05

# A take, dispatch_due or sweep whose call raised a ConnectionError or a timeout may have
# run on Redis with its reply lost (a connection cut, a master killed after running it
# whose replica had the writes): its batches hold their locks, or left the schedule, with
# no message until the sweep (BATCH_REDISPATCH_SECONDS, 120 s). The tick sends the same
# call again (the same batch ids, the same handed key), which answers what the first run
# did (take_batch.lua, dispatch_due.lua, sweep_batches.lua): at most LOST_REPLY_TRIES
# tries, from 50 ms doubling to 0.5 s apart, none begun LOST_REPLY_SECONDS after the first
# (well inside the tick lock's lease, at least 3 s: a retry that outlived it would only
# let another tick run beside this one, which the scripts make safe). redis-py's own
# `Retry` runs it; RedisCluster's resends (10 by default) come first, a plain redis://
# client has none. Then the error goes up as before and the sweep is the backstop.
LOST_REPLY_TRIES = 5
LOST_REPLY_SECONDS = 1.5

_T = TypeVar("_T")


def _sent_again_after_lost_reply(call: Callable[[], _T], what: str) -> _T:
    """`call()`, sent again while it raises a ConnectionError or a timeout (see
    LOST_REPLY_TRIES). `call` must be the same call each time (same ids)."""
    deadline = time.monotonic() + LOST_REPLY_SECONDS

    def failed(error: Exception) -> None:
        if time.monotonic() >= deadline:
            raise error
        # The error's type only: its text names the Redis host, not for every log line.
        logger.warning(
            "the %s's reply was lost (%s): sending the same call again",
            what,
            type(error).__name__,
        )

    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=LOST_REPLY_TRIES - 1)
    return retry.call_with_retry(call, failed)


# Share of MAX_BATCHES_IN_FLIGHT that bulk leaves to live: a backfill that fills the rest
# keeps no live change waiting in the buffer for a batch of its to end.
LIVE_RESERVED_SHARE = 0.1


@dataclass(frozen=True, slots=True)
class _Cut:
    """What one lane's cut in a tick did."""

    batches: int = 0
    requests: int = 0  # messages sent (v2: one per pack)
    identifiers: int = 0
    pressure: float = 0.0
    linger_ms: int = 0
    more: bool = False  # more due than read, or the in-flight cap left no room
    held_until: int | None = None


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


class Coalescer:
    def __init__(
        self,
        settings: Settings,
        buffer: Buffer,
        store: BatchStore,
        limiter: RateLimiter,
        heartbeats: Heartbeats,
        dispatch: Callable[[str], object],
        dispatch_many: Callable[[list[str]], object] | None = None,
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.store = store
        self.limiter = limiter
        self.heartbeats = heartbeats
        self.dispatch = dispatch  # sends one "post this batch now" message
        # Sends one "post these batches now, one after the other" message (None: one
        # message a batch). See `_send_cut`.
        self.dispatch_many = dispatch_many

    def run(self, seconds: float) -> TickReport:
        """Tick, then keep ticking for up to `seconds` while the pipeline is light: at once
        when a producer (or a worker scheduling a batch due now) nudges, or when a lingering
        partial batch or a waiting batch becomes due. Under a backlog bulk is cut once per
        call, as beat sends them, but a live change's nudge still wakes it at once for a
        tick that cuts live alone. Returns the last tick's report with the totals of all."""
        deadline = time.monotonic() + seconds
        report = self.tick()
        totals = report
        # A tick skipped because another holds the lock (the previous beat's run, still
        # awake) keeps waiting: two runs overlap by design, so no gap opens between them;
        # each nudge wakes one of them (BLPOP), never both.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0.01:
                break
            backlog = report.backlog
            wait = remaining
            if report.skipped:
                # Another run held the lock (its tick may have started before the change
                # that nudged this one): look again shortly rather than lose the nudge.
                wait = min(remaining, SKIPPED_RETRY_SECONDS)
            elif report.next_check_ms is not None:
                # A partial batch lingers for company, or a batch waits in the schedule:
                # tick again when it is due, or sooner on a nudge. Under a backlog that
                # tick is live-only (it sends the schedule's due batches too), at most
                # every BACKLOG_DISPATCH_SECONDS: bulk reserves turns only
                # BULK_TOKEN_WAIT_MAX_SECONDS ahead, and the batches waiting for theirs must
                # not wait for the beat's next full tick, or the budget goes unspent.
                soonest = 0.01 if not backlog else BACKLOG_DISPATCH_SECONDS
                due_in = (report.next_check_ms - report.now_ms) / 1000
                wait = min(remaining, max(soonest, due_in))
            nudged = self.buffer.wait_for_nudge(wait, live_only=backlog)
            if not nudged and wait >= remaining:
                break
            report = self.tick(live_only=backlog)
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

    def tick(self, live_only: bool = False) -> TickReport:
        """One tick; `live_only`: cut the live lane and send the schedule's due batches
        their messages, nothing else (a backlog's bulk and the recovery wait for the
        beat's next full tick). A live-only tick has a lock
        of its own, so it runs beside a full tick rather than wait for it: two cuts side by
        side are safe (take_batch.lua), and a full tick cutting a backfill's batches may
        hold its lock for a good part of a second."""
        settings = self.settings
        # Short: a worker killed mid-tick must not stop coalescing for long. A tick that
        # outlives it only lets another run beside it, which the scripts make safe.
        lock = self.buffer.tick_lock(
            max(3.0, settings.coalesce_interval_seconds * 3), live_only=live_only
        )
        if not lock.acquire():
            # A live-only tick skipped keeps the backlog state it was asked in: the run
            # retries live-only, not a full tick.
            return TickReport(skipped=True, backlog=live_only)
        try:
            report = self._tick(live_only)
        finally:
            try:
                lock.release()
            except LockNotOwnedError:
                # The tick outlived its lease (a slow Redis, resends after lost replies):
                # another tick may have run beside it, which the scripts make safe. Its
                # messages are sent; not worth failing the beat's task for.
                logger.warning("a coalescer tick outlived its lock's lease")
        # When the coalescer last made progress: the exporter's "no coalescer tick" alert
        # (a full tick: recovery and bulk ran too).
        if not live_only:
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
        due = self._dispatch_due()
        for batch_id in due:
            self.dispatch(batch_id)
        lost = self._sweep()
        for batch_id in lost:
            self.dispatch(batch_id)
        if lost:
            logger.warning("re-dispatched %d batches whose message was lost", len(lost))
        return len(taken.batch_ids), len(due), len(lost)

    def _dispatch_due(self) -> list[str]:
        """The schedule's due batches (`BatchStore.dispatch_due`), the call sent again
        under its name after a lost reply: the caller sends each a message."""
        grace_ms = self.settings.redispatch_grace_ms
        call = partial(self.store.dispatch_due, DISPATCH_LIMIT, grace_ms, call_id=new_call_id())
        return _sent_again_after_lost_reply(call, "dispatch")

    def _sweep(self) -> list[str]:
        """The batches whose message was lost (`BatchStore.sweep`), the call sent again
        under its name after a lost reply: the caller sends each a message."""
        grace_ms = self.settings.redispatch_grace_ms
        call = partial(self.store.sweep, DISPATCH_LIMIT, grace_ms, call_id=new_call_id())
        return _sent_again_after_lost_reply(call, "sweep")

    def _tick(self, live_only: bool = False) -> TickReport:
        settings = self.settings
        now_ms = server_time_ms(self.buffer.client, near=self.buffer.keys.pending)
        if live_only:
            # Live first, then the schedule's due batches (one script; two ticks split its
            # entries): cheap, and what keeps bulk's turns taken between full ticks.
            in_flight = self.store.count()
            room = (
                settings.max_batches_in_flight - in_flight - self._owed_to_bulk(now_ms, in_flight)
            )
            live = self._cut(Lane.LIVE, now_ms, room)
            due = self._dispatch_due()
            for batch_id in due:
                self.dispatch(batch_id)
            # It saw no bulk: it keeps the backlog state it was woken in.
            return self._report(now_ms, {"dispatched": len(due)}, [live], backlog=True)
        recovered, dispatched, swept = self._recover(now_ms)
        moved = {"redispatched": swept, "recovered": recovered, "dispatched": dispatched}

        # Live first: its changes are cut before bulk's, with the whole in-flight cap; bulk
        # leaves a share of the cap to live (LIVE_RESERVED_SHARE), so a backfill that fills
        # it never keeps a live change in the buffer.
        # The same the other way for bulk's floor share (BULK_FLOOR_SHARE): while bulk has
        # due changes, live leaves that share of the cap to bulk's batches, or a live flood
        # that keeps the cap full would leave the floor nothing to post. Each reserve counts
        # only what its lane has in flight below it.
        # Live-only ticks (every BACKLOG_DISPATCH_SECONDS under a backlog) leave it too.
        cap = settings.max_batches_in_flight
        in_flight = self.store.count()
        owed = self._owed_to_bulk(now_ms, in_flight)
        live = self._cut(Lane.LIVE, now_ms, cap - in_flight - owed)
        reserve = max(1, math.ceil(cap * LIVE_RESERVED_SHARE))
        room = max(
            cap - reserve - in_flight - live.batches, min(owed, cap - in_flight - live.batches)
        )
        # At most two beats' worth of the budget a tick: the pipeline stays fed, and a
        # tick never holds the lock (which a live change's tick waits for) for long.
        per_tick = math.ceil(
            2 * self.limiter.requests_per_second * settings.coalesce_interval_seconds
        )
        bulk = self._cut(Lane.BULK, now_ms, min(room, max(1, per_tick)))
        return self._report(now_ms, moved, [live, bulk], backlog=live.more or bulk.more)

    def _owed_to_bulk(self, now_ms: int, in_flight: int) -> int:
        """Batches of its floor share of MAX_BATCHES_IN_FLIGHT that bulk lacks while it has
        due changes (0 when it has none, or its share in flight already). Two ZCOUNTs; the
        batch ids are read only while both lanes have due changes."""
        settings = self.settings
        bulk_floor = math.ceil(settings.max_batches_in_flight * settings.bulk_floor_share)
        if not bulk_floor or not self.buffer.has_due(Lane.BULK, now_ms):
            return 0
        if not self.buffer.has_due(Lane.LIVE, now_ms):
            return 0  # no live change to hold back
        return max(0, bulk_floor - (in_flight - self.store.count_live()))

    def _report(
        self, now_ms: int, moved: dict[str, int], cuts: list[_Cut], *, backlog: bool
    ) -> TickReport:
        live = cuts[0]
        batches = sum(cut.batches for cut in cuts)
        identifiers = sum(cut.identifiers for cut in cuts)
        if batches:
            logger.info(
                "cut %d batches (%d requests for v2; %d live) holding %d identifiers",
                batches,
                sum(cut.requests for cut in cuts),
                live.batches,
                identifiers,
            )
        next_due = self.store.next_due_ms()
        checks = [t for t in (*(cut.held_until for cut in cuts), next_due) if t is not None]
        return TickReport(
            **moved,
            batches=batches,
            identifiers=identifiers,
            pressure=max(cut.pressure for cut in cuts),
            linger_ms=max(cut.linger_ms for cut in cuts),
            backlog=backlog,
            next_check_ms=max(now_ms, min(checks)) if checks else None,
            now_ms=now_ms,
        )

    def _cut(self, lane: Lane, now_ms: int, budget: int) -> _Cut:
        """Cut one lane's due changes into at most `budget` batches and send their
        messages. Bulk's linger follows the pressure on the whole budget; live's only the
        pressure of live's own changes (what live sends goes first, whatever bulk does)."""
        settings = self.settings
        if budget <= 0:
            return _Cut(more=True)
        # Read more than the room left needs: the more of each key is seen, the fuller its
        # batches. But not a full tick's worth for a few batches' room: while a backfill
        # drains, each tick has room for about a second of requests, and reading 20,000
        # changes for that held the tick's lock (and a core) for most of the second, which
        # a live change's tick then waited for.
        room = budget * settings.batch_max_identifiers
        limit = min(settings.coalesce_max_changes_per_tick, max(READ_AHEAD * room, MIN_READ))
        # The room's worth and at most MIN_READ more first: under a backlog the rest of
        # READ_AHEAD's read was read again by the next tick (1.3-1.9 reads a change).
        first = min(limit, max(MIN_READ, room + min(room, MIN_READ)))
        changes, more = self.buffer.read_due(now_ms, first, lane)
        if not changes:
            return _Cut()
        if lane is Lane.LIVE:
            # Live's own pressure only: its due changes. Not the recent use, the arrivals
            # or the budget promised ahead: a backfill fills all three, and live goes
            # ahead of it anyway. A live flood shows as its own due work piling up.
            load = Load(0, 1.0, 0.0, due_changes=len(changes), more_due=more)
        else:
            load = self._load(now_ms, len(changes), more)
        load_now = pressure(
            load,
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
        plan_read = partial(
            plan_cut,
            now_ms=now_ms,
            max_identifiers=settings.batch_max_identifiers,
            linger_ms=linger,
            max_batches=budget,
            max_hold_ms=settings.batch_max_hold_ms,
        )
        plan, held_due_ms = plan_read(changes, backlog=more)
        if more and len(plan) < budget and first < limit:
            # Its keys' remainders (held while more is due) left room: the rest of the
            # read, and the plan again over both, as if read at once.
            rest, more = self.buffer.read_due(now_ms, limit - first, lane, offset=first)
            changes += rest
            plan, held_due_ms = plan_read(changes, backlog=more)
        if settings.braze_api_version == "v2":
            packs = pack_batches(plan, max_identifiers=settings.batch_max_identifiers)
        else:
            packs = [[batch] for batch in plan]
        # A batch that travels alone and comes out short (a remainder, or planned members
        # replaced since the read) takes the due changes of its kind that came since.
        # The batch ids chosen here, so that a take whose reply was lost is sent again
        # as the same take: it answers what its first run took.
        take = partial(
            self.buffer.take,
            packs,
            settings.redispatch_grace_ms,
            lane,
            top_up_to=settings.batch_max_identifiers,
            ids=self.buffer.new_batch_ids(sum(len(pack) for pack in packs), lane),
        )
        taken = _sent_again_after_lost_reply(take, "take")
        # One message per pack, for its first batch: a v2 worker claims the rest of the pack
        # and sends it in one request (v1 packs hold one batch each).
        self._send_cut([pack[0][0] for pack in taken])
        return _Cut(
            batches=sum(len(pack) for pack in taken),
            requests=len(taken),
            identifiers=sum(size for pack in taken for _batch_id, size in pack),
            pressure=round(load_now, 3),
            linger_ms=linger,
            more=more,
            # The oldest due change left out (a partial batch lingering) is ready then.
            held_until=None if held_due_ms is None else max(now_ms, held_due_ms + linger),
        )

    def _send_cut(self, leads: list[str]) -> None:
        """The messages for a cut's packs (their first batches' ids). While the cut is small
        next to the budget (at most 1 / MESSAGES_BUDGET_HEADROOM of the requests it allows
        in a beat) the budget is far from binding and the fleet's own CPU is the ceiling:
        a cut of many batches goes in fewer messages of several batches each
        (`core.planning.message_groups`). Near the budget each batch keeps a message of its
        own, so that as many threads as there are batches can hold their turns in it.
        (Not the linger's pressure: any backlog is full pressure there, whatever the
        budget.) A batch's claim, fence and end do not depend on its message: a message of
        several is as safe as one each."""
        beat = self.limiter.requests_per_second * self.settings.coalesce_interval_seconds
        if self.dispatch_many is None or len(leads) * MESSAGES_BUDGET_HEADROOM > beat:
            groups = [[lead] for lead in leads]
        else:
            groups = message_groups(leads)
        for group in groups:
            if len(group) == 1:
                self.dispatch(group[0])
            else:
                self.dispatch_many(group)

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
