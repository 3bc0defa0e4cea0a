"""One coalescer tick: sweep lost batches, then cut due changes into batches and send them.

Runs as the beat task `subscriptions.coalesce`. Two beats by mistake are harmless: a Redis
lock makes their ticks take turns, and even without it `take_batch.lua` lets each change
enter one batch only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from config.settings import Settings
from core.planning import pack_batches, plan_batches
from stores.batch_records import BatchStore
from stores.buffer import Buffer, server_time_ms
from stores.dead_letters import DeadLetters

logger = logging.getLogger("braze_subs.coalescer")


@dataclass(frozen=True, slots=True)
class TickReport:
    redispatched: int = 0
    batches: int = 0
    identifiers: int = 0
    skipped: bool = False  # another tick held the lock


class Coalescer:
    def __init__(
        self,
        settings: Settings,
        buffer: Buffer,
        store: BatchStore,
        dispatch: Callable[[str], object],
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.store = store
        self.dispatch = dispatch

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
        client = self.buffer.client
        client.set(self.buffer.keys.coalesce_last_tick, server_time_ms(client))
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
        for entry in DeadLetters(self.buffer.client, self.buffer.keys).expire(
            now_ms - retention_ms
        ):
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
            return TickReport(redispatched=len(overdue))
        # Read a full tick's worth even under back-pressure: the more of each key is seen,
        # the fuller its batches.
        changes, more = self.buffer.read_due(now_ms, settings.coalesce_max_changes_per_tick)
        plan = plan_batches(
            changes,
            now_ms=now_ms,
            max_identifiers=settings.batch_max_identifiers,
            linger_ms=round(settings.batch_linger_seconds * 1000),
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
        return TickReport(redispatched=len(overdue), batches=batches, identifiers=identifiers)
