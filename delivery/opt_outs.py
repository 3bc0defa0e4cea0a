"""Respecting opt-outs made in Braze: a `subscribed` change with `respect_opt_out` is not
sent for an identifier Braze holds as `unsubscribed` in that group (a footer link, a STOP
reply), so a backfill or a replay from an older snapshot cannot undo them.

Just before a batch is posted, `OptOutCheck.screen` reads the states of its identifiers
that ask for the check (`/subscription/status/get`, through the read budget) and leaves out
the unsubscribed ones; `unknown` and `subscribed` ones are posted as usual. One read takes
up to 100 identifiers, two batches of 50: the worker reads along the oldest other batch of
the same group and kind that also needs a check, and leaves that batch the result (fresh
for `OPT_OUT_READ_MAX_AGE_SECONDS`; `stores.opt_out_reads`), so a backfill costs one read
call per 100 identifiers, not per 50.

Ordering holds because the check happens inside the batch's claim: its identifiers stay
locked until the batch ends, and a newer change for one of them (a later `unsubscribed`)
waits in the buffer and is posted after it, as always. Leaving an identifier out ends its
change (the batch is delivered for it): nothing is retried, dead-lettered or re-sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from config.settings import Settings
from core.changes import SubscriptionState
from core.redaction import mask_identifier
from delivery.braze_reads import MAX_READ_IDENTIFIERS, BrazeReader, ReadDeferred, ReadState
from stores.batch_records import BatchRecord
from stores.clock import server_time_ms
from stores.opt_out_reads import CLAIM, OptOutRead, OptOutReads

logger = logging.getLogger("braze_subs.opt_outs")

# Batches looked at, oldest first, for one to read along.
COMPANIONS_SCANNED = 32
# Identifiers shown (masked) in one log line.
LOGGED_IDENTIFIERS = 20
POLL_SECONDS = 0.05


def to_check(record: BatchRecord) -> tuple[str, ...]:
    """The identifiers of the batch whose change must not override an opt-out in Braze."""
    if record.key.state is not SubscriptionState.SUBSCRIBED:
        return ()
    return tuple(value for value in record.values if value in record.respect_opt_out)


@dataclass(frozen=True, slots=True)
class Screened:
    send: list[BatchRecord]  # what to post: the records with opted-out identifiers left out
    emptied: list[BatchRecord]  # records left with nothing to post: end them as delivered
    skipped: dict[str, tuple[str, ...]]  # batch id -> identifiers left out


class OptOutCheck:
    def __init__(
        self,
        settings: Settings,
        reader: BrazeReader,
        reads: OptOutReads,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.reader = reader
        self.reads = reads
        self.sleep = sleep
        self.max_age_ms = round(settings.opt_out_read_max_age_seconds * 1000)
        # A reader holds a batch's check at most this long: a turn of the read budget plus
        # one exchange with Braze; then its claim expires and others read for themselves.
        self.lease_ms = round(
            (settings.token_wait_max_seconds + settings.http_timeout_seconds + 1) * 1000
        )

    def screen(self, records: list[BatchRecord]) -> Screened:
        """Leave out the identifiers Braze holds as unsubscribed. Raises `ReadDeferred`
        (no turn in the read budget soon) or `BrazeReadError` (Braze cannot be read): then
        nothing may be posted, since an opt-out could not be ruled out."""
        needs = {record.id: to_check(record) for record in records}
        needs = {batch_id: values for batch_id, values in needs.items() if values}
        if not needs:
            return Screened(records, [], {})
        results = self._results(records, needs)
        send: list[BatchRecord] = []
        emptied: list[BatchRecord] = []
        skipped: dict[str, tuple[str, ...]] = {}
        for record in records:
            checked = needs.get(record.id, ())
            left_out = tuple(v for v in checked if results[record.id].holds_unsubscribed(v))
            if not left_out:
                send.append(record)
                continue
            skipped[record.id] = left_out
            kept = tuple(value for value in record.values if value not in left_out)
            if kept:
                send.append(replace(record, values=kept))
            else:
                emptied.append(record)
            self._log(record, left_out)
        # Counted (`opt_out_skipped`) and recorded in the history by finish_batch.lua when
        # the batch ends: members it was not sent are the ones left out. Counting here would
        # count a retried batch twice.
        return Screened(send, emptied, skipped)

    def _log(self, record: BatchRecord, left_out: tuple[str, ...]) -> None:
        kind = record.key.kind.value
        shown = ", ".join(mask_identifier(kind, v) for v in left_out[:LOGGED_IDENTIFIERS])
        more = f" and {len(left_out) - LOGGED_IDENTIFIERS} more" if len(left_out) > 20 else ""
        logger.info(
            "batch %s group=%s kind=%s: %d left out, unsubscribed in Braze: %s%s",
            record.id,
            record.key.group_id,
            kind,
            len(left_out),
            shown,
            more,
        )

    # --- finding the results --------------------------------------------------------------

    def _results(
        self, records: list[BatchRecord], needs: dict[str, tuple[str, ...]]
    ) -> dict[str, OptOutRead]:
        by_id = {record.id: record for record in records}
        results: dict[str, OptOutRead] = {}
        deadline = time.monotonic() + self.lease_ms / 1000
        waiting = list(needs)
        while True:
            now_ms = server_time_ms(self.reads.client)
            mine: list[str] = []
            still: list[str] = []
            for batch_id, found in zip(waiting, self.reads.get(waiting), strict=True):
                if isinstance(found, OptOutRead) and found.covers(
                    needs[batch_id], now_ms, self.max_age_ms
                ):
                    results[batch_id] = found
                elif found == CLAIM:
                    still.append(batch_id)  # another worker is reading it right now
                elif found is None and not self.reads.claim(batch_id, self.lease_ms):
                    still.append(batch_id)
                else:
                    mine.append(batch_id)  # claimed, or a stale result: read it here
            if mine:
                results.update(self._read([by_id[i] for i in mine], needs))
            if not still:
                return results
            if time.monotonic() > deadline:
                raise ReadDeferred(POLL_SECONDS * 10, "an opt-out check elsewhere is late")
            waiting = still
            self.sleep(POLL_SECONDS)

    def _read(
        self, records: list[BatchRecord], needs: dict[str, tuple[str, ...]]
    ) -> dict[str, OptOutRead]:
        """Read Braze for these (claimed) batches, one call per group and kind, each filled
        up to 100 identifiers with other batches that will need the same check."""
        groups: dict[tuple[str, str], list[BatchRecord]] = {}
        for record in records:
            groups.setdefault((record.key.group_id, record.key.kind.value), []).append(record)
        results: dict[str, OptOutRead] = {}
        for (group_id, kind), members in groups.items():
            values = list(dict.fromkeys(v for r in members for v in needs[r.id]))
            companions = self._companions(group_id, kind, values, {r.id for r in records})
            for companion in companions:
                values += [v for v in to_check(companion) if v not in values]
            ids = [r.id for r in members] + [c.id for c in companions]
            # Which batch holds each value read: `forget` releases its lock, and the read
            # then sends nothing (checked right before its first byte).
            holders = {v: r.id for r in members for v in needs[r.id]}
            holders.update((v, c.id) for c in companions for v in to_check(c) if v not in holders)
            try:
                read_ms = server_time_ms(self.reads.client)
                states = self.reader.statuses(
                    group_id,
                    kind,
                    values,
                    fence=lambda g=group_id, k=kind, h=holders: self.reads.still_held(g, k, h),
                )
            except BaseException:
                self.reads.release(ids)
                raise
            result = OptOutRead.of(
                read_ms, values, (v for v, s in states.items() if s is ReadState.UNSUBSCRIBED)
            )
            found = dict.fromkeys(ids, result)
            self.reads.store(found, self.max_age_ms)
            results.update(found)
        return results

    def _companions(
        self, group_id: str, kind: str, values: list[str], exclude: set[str]
    ) -> list[BatchRecord]:
        room = MAX_READ_IDENTIFIERS - len(values)
        chosen: list[BatchRecord] = []
        if room <= 0:
            return chosen
        for candidate in self.reads.upcoming(COMPANIONS_SCANNED):
            if (
                candidate.id in exclude
                or candidate.key.group_id != group_id
                or candidate.key.kind.value != kind
            ):
                continue
            extra = [v for v in to_check(candidate) if v not in values]
            if not extra or len(extra) > room:
                continue
            if not self.reads.claim(candidate.id, self.lease_ms):
                continue  # read or being read already
            chosen.append(candidate)
            values = values + extra
            room -= len(extra)
            if room <= 0:
                break
        return chosen
