"""Batch records in Redis and the claim protocol that posts each exactly as often as needed.

A batch record is written by `take_batch.lua` when its changes leave the buffer, and it
stays until Braze has acknowledged it or it has been dead-lettered. The Celery message that
posts it carries only the id; everything else is read here. At any moment a batch is in
one of three places:

- **messaged**: its message is in the queue or with a worker;
- **claimed**: one worker holds it (`claims`, `claim_tokens`; `fences` once its request
  is sent). The holder's heartbeat extends the lease; take_back.lua ends a claim whose
  holder's heartbeat is gone;
- **waiting** in the schedule (`schedule`, `schedule_reasons`) until it is due; the
  coalescer's tick sends it a message then (dispatch_due.lua).

Only a messaged batch can be claimed, so a duplicate message never posts it again.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from core.changes import IdentifierKind, Lane, SubscriptionState
from core.planning import BatchKey, batch_lane, lane_prefix
from core.redaction import confine
from core.waiting import WaitReason
from stores.base import ScriptedStore
from stores.counters import NO_TALLY_ARGS, Tally
from stores.limiter import Grant, TurnAsk, grant_of
from stores.refusals import Refusal
from stores.scripts import encoded


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    key: BatchKey
    values: tuple[str, ...]
    attempts: int
    created_ms: int
    last_error: str | None = None
    pack: tuple[str, ...] = ()  # ids of the batches planned to share one v2 request
    # The members whose change asked to respect an opt-out Braze holds (`respect_opt_out`):
    # a `subscribed` change is not to be sent for them if Braze has them unsubscribed.
    respect_opt_out: frozenset[str] = frozenset()
    sibling: str | None = None  # the other half, when split without Braze naming anyone

    @classmethod
    def from_json(cls, raw: bytes | str) -> BatchRecord:
        data = json.loads(raw)
        return cls(
            id=data["id"],
            key=BatchKey(
                group_id=data["group"],
                state=SubscriptionState(data["state"]),
                kind=IdentifierKind(data["kind"]),
                double_opt_in=bool(data["doi"]),
            ),
            values=tuple(member[0] for member in data["members"]),
            attempts=int(data["attempts"]),
            created_ms=int(data["created"]),
            last_error=data.get("error"),
            # Lua's cjson writes an empty list as {}.
            pack=tuple(data.get("pack") or ()),
            respect_opt_out=frozenset(
                member[0] for member in data["members"] if len(member) > 2 and member[2]
            ),
            sibling=data.get("sibling") or None,
        )

    @property
    def size(self) -> int:
        return len(self.values)


class ClaimStatus(StrEnum):
    CLAIMED = "claimed"  # this worker may post it now
    GONE = "gone"  # already finished: nothing to do
    BUSY = "busy"  # another worker holds it
    WAITING = "waiting"  # it waits in the schedule: this message is a duplicate
    EMPTY = "empty"  # every member was superseded by a newer change; finished (the record
    # is returned as it was, for its pack)


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    record: BatchRecord | None = None
    topped_up: int = 0  # members the claim's top-up took into the batch (claim_batch.lua)
    # Read by the claim at its instant (claim_batch.lua; issue 26: the poster's own reads
    # right after it cost two round trips a post): the refusal of the batch's group +
    # state + kind while it stands (stores/refusals.py), and, for a half of a split,
    # Braze's message while the half awaits its sibling (`Refusals.half_refused`).
    refusal: Refusal | None = None
    half_refused: str | None = None
    # The batch's turn of the rate budget, when the claim was told to take it and took it
    # (or a renewal found the one its token took): None when it was not told to, or the
    # claim found a refusal above (no request goes out then).
    grant: Grant | None = None
    # The claim fenced the batch too (claim_batch.lua, told to by `fence_ms`; issue 26):
    # its "sent at" mark is written, and the request goes without `fence`, its exchange's
    # deadline counted from before the claim was sent.
    fenced: bool = False


# Most due entries a top-up looks at (claim_batch.lua ARGV[7]; top_up_batch.lua and
# take_batch.lua the same), oldest due first,
# for changes of its batch's group, state, kind and double opt-in. A bound on the script's
# time (Redis runs nothing else meanwhile): ~1,000 entries are read and compared as
# strings in well under a millisecond, and only those of the batch's group and kind are
# decoded. With a dozen (group, state, kind) keys mixed in the due set, 1,000 entries hold
# ~80 of the batch's key: enough to refill what a flip takes out.
TOP_UP_LOOK_AT = 1000

# How long dispatch_due.lua and sweep_batches.lua keep a call's answer for the same call
# sent again (redis-py resends a command whose connection dropped before its reply: a
# master killed after running it). Far beyond redis-py's retries of one command (a few
# seconds); the key is one short list, written only by a call that handed out ids.
HANDED_KEEP_MS = 60_000


def new_call_id() -> str:
    """A new name for one dispatch_due or sweep call (`Keys.handed`): the same name sends
    the same call again."""
    return uuid.uuid4().hex


class Ended(StrEnum):
    """What `delivered`, `delivered_except` and `dead_letter` did."""

    ENDED = "ended"  # the batch ended here
    LOST = "lost"  # the caller no longer holds its claim (taken back; perhaps ended since
    # by its next holder): it did nothing, and must not report the batch as ended
    GONE = "gone"  # the caller's claim on a batch that is gone (only the holder ends one)


@dataclass(frozen=True, slots=True)
class Finish:
    status: Ended
    members: int = 0  # members ended
    # Redis's error when the request the finish was told could not be counted (the
    # outcome stands: finish_batch.lua counts after it and lets no count fail it).
    count_error: str | None = None


class Deferred(StrEnum):
    DEFERRED = "deferred"  # waits in the schedule
    LOST = "lost"  # not the caller's claim any more (perhaps ended since)
    GONE = "gone"  # the caller's claim on a batch that is gone (only the holder ends one)


@dataclass(frozen=True, slots=True)
class Deferral:
    status: Deferred
    attempts: int = 0  # attempts so far (deferred only)


@dataclass(frozen=True, slots=True)
class TakeBack:
    batch_ids: tuple[str, ...]  # taken back, due now
    sent_before: int  # of those, how many had been sent (outcome unknown)
    alive: int  # suspects whose heartbeat was found after all


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class _RequestTexts:
    """Which identifiers each claim token of this process holds, batch by batch, so that an
    error text (Braze's message about the whole request, a v2 pack's included) is stored
    in a batch's record and dead letter with only that batch's identifiers left whole,
    and in each member's history with none (`core.redaction.confine`).

    A token belongs to one post of one thread; a process runs WORKER_CONCURRENCY posts at
    once, so the most recent tokens are plenty (the oldest are dropped first)."""

    LIMIT = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: OrderedDict[str, dict[str, tuple[str, tuple[str, ...]]]] = OrderedDict()

    def claimed(self, token: str, record: BatchRecord) -> None:
        with self._lock:
            batches = self._tokens.setdefault(token, {})
            self._tokens.move_to_end(token)
            batches[record.id] = (record.key.kind.value, record.values)
            while len(self._tokens) > self.LIMIT:
                self._tokens.popitem(last=False)

    def texts(self, token: str, batch_id: str, error: str) -> tuple[str, str]:
        """(for the batch's record and dead letter, for its members' histories)."""
        if not error:
            return error, error
        with self._lock:
            batches = dict(self._tokens.get(token, {}))
        everyone = [(kind, value) for kind, values in batches.values() for value in values]
        own = batches.get(batch_id, ("", ()))[1]
        return confine(error, everyone, keep=own), confine(error, everyone)


class BatchStore(ScriptedStore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._texts = _RequestTexts()
        # The keys and arguments of the claim and the finish that are the same for every
        # call of this store (all but the batch's own key, its id and token, the outcome's
        # texts), encoded once (`stores.scripts.encoded`; issue 26: a post's claim and
        # finish carry ~50 of them).
        k, r = self.keys, self.retention
        self._claim_keys_tail = encoded(
            [
                k.batches,
                k.claims,
                k.claim_tokens,
                k.fences,
                k.schedule,
                k.schedule_reasons,
                k.pending,
                k.due,
                k.inflight,
                k.coalesce_nudge,
                k.due_live,
                k.stats,
                k.short_batches,
            ]
        )
        self._history_args = encoded(r.history_args)
        self._look_at_and_subject = encoded([TOP_UP_LOOK_AT, r.subject_ms])
        self._finish_keys_tail = encoded(
            [
                k.batches,
                k.claims,
                k.claim_tokens,
                k.fences,
                k.pending,
                k.due,
                k.inflight,
                k.dead_letters,
                k.dead_letter_index,
                k.dead_letter_identifiers,
                k.stats,
                k.dead_letter_fields,
            ]
        )
        self._request_totals = encoded([k.request_totals])[0]
        self._retention_args = [*self._history_args, encoded([r.subject_ms])[0]]

    def _claim_keys(self, batch_id: str) -> list[str]:
        """KEYS[1..5] of every script that touches a claim: the record, the sweep's deadline,
        the lease, the holder's token, the "sent" mark."""
        k = self.keys
        return [k.batch(batch_id), k.batches, k.claims, k.claim_tokens, k.fences]

    # --- the claim ---------------------------------------------------------------------

    def claim(
        self,
        batch_id: str,
        token: str,
        lease_ms: int,
        *,
        top_up_to: int = 0,
        turn: TurnAsk | None = None,
        fence_ms: int | None = None,
        opt_out_reads: bool = False,
    ) -> Claim:
        """Claim a batch for `token` (claim_batch.lua). Members superseded by a newer
        change leave it; if it holds fewer than `top_up_to` members then (it lost some, or was
        cut short), it is topped up with due
        changes of its group, state, kind and double opt-in up to that many members (a
        v2 pack: that many distinct identifiers). With `turn` (`RateLimiter.turn_ask` of
        the batch's lane), a claim made that finds no refusal takes the batch's turn of the
        rate budget in the same call (`Claim.grant`; a renewal by `token` answers the turn
        it took again, and takes none). With `fence_ms` too (the lease that must remain,
        as `fence` asks), a claim whose turn is granted for now, with no top-up before the
        send to make and no opt-out to read first (`opt_out_reads`: the poster reads them
        for members that ask) fences the batch in the same call (`Claim.fenced`; a renewal
        by `token` after a fenced first try answers fenced again)."""
        keys = [self.keys.batch(batch_id), *self._claim_keys_tail]
        args = [batch_id, token, lease_ms, *self._history_args, top_up_to]
        args += self._look_at_and_subject
        if turn is not None:
            keys += turn.keys
            args.append(b"1")
            args += turn.args
            if fence_ms is not None:
                args += (fence_ms, b"1" if opt_out_reads else b"0")
        reply = self.scripts.claim_batch(keys=keys, args=args)
        status = ClaimStatus(_text(reply[0]))
        record = BatchRecord.from_json(reply[1]) if len(reply) > 1 else None
        if status is not ClaimStatus.CLAIMED or record is None:
            return Claim(status, record)
        self._texts.claimed(token, record)
        raw_refusal, raw_half = reply[3], reply[4]
        return Claim(
            status,
            record,
            int(reply[2]),
            refusal=None if raw_refusal is None else Refusal.from_json(raw_refusal),
            half_refused=None if raw_half is None else _text(raw_half),
            grant=grant_of(reply[5:10]) if len(reply) > 5 else None,
            fenced=len(reply) > 10 and int(reply[10]) == 1,
        )

    def top_up_before_send(
        self, batch_id: str, token: str, need_ms: int, *, top_up_to: int
    ) -> BatchRecord | None:
        """Right before the request is built: top a short claimed batch up again with the
        due changes of its kind that came while it waited for its turn (top_up_batch.lua,
        the claim's rules), while `token` holds its claim with more than `need_ms` left.
        The record to build the request from (as it was if nothing was taken), or None if
        the claim is not `token`'s any more (then the fence refuses the send as well)."""
        k = self.keys
        reply = self.scripts.top_up_batch(
            keys=[
                k.batch(batch_id),
                k.claims,
                k.claim_tokens,
                k.fences,
                k.pending,
                k.due,
                k.inflight,
                k.due_live,
                k.stats,
                k.short_batches,
                k.schedule,
                k.batches,
            ],
            args=[
                batch_id,
                token,
                need_ms,
                *self.retention.history_args,
                top_up_to,
                TOP_UP_LOOK_AT,
                self.retention.subject_ms,
            ],
        )
        if _text(reply[0]) == "lost":
            return None
        record = BatchRecord.from_json(reply[1])
        if _text(reply[0]) == "topped":
            self._texts.claimed(token, record)
        return record

    def fence(self, batch_ids: list[str], token: str, need_ms: int) -> bool:
        """True if `token` still holds every batch's claim with more than `need_ms` left;
        then they count as sent (fence_batch.lua). Checked right before the request."""
        k = self.keys
        return bool(
            self.scripts.fence_batch(
                keys=[k.claims, k.claim_tokens, k.fences], args=[token, need_ms, *batch_ids]
            )
        )

    # --- ending a batch ------------------------------------------------------------------

    def _finish(
        self,
        batch_id: str,
        token: str,
        outcome: str,
        error: str,
        http_status: int | None,
        latency_ms: float | None,
        sent: Iterable[str] | None = None,
        named: list[str] | None = None,
        tally: Tally | None = None,
    ) -> Finish:
        keys = [
            self.keys.batch(batch_id),
            *self._finish_keys_tail,
            self._request_totals if tally is None else tally.totals_key,
        ]
        stored, told = self._texts.texts(token, batch_id, error)
        args: list[str | int | float | bytes] = [
            batch_id,
            token,
            outcome,
            stored,
            json.dumps(named) if named else b"[]",
            "" if http_status is None else http_status,
            "" if latency_ms is None else round(latency_ms, 1),
            *self._retention_args,
            told,
            "all" if sent is None else "listed",
            *(NO_TALLY_ARGS if tally is None else tally.finish_args()),
        ]
        if sent is not None:
            args += sent
        reply = self.scripts.finish_batch(keys=keys, args=args)
        count_error = None
        if isinstance(reply, list):  # {members, the count's error}
            reply, count_error = reply[0], _text(reply[1])
        members = int(reply)
        if members == -1:
            return Finish(Ended.LOST, count_error=count_error)
        if members < 0:
            return Finish(Ended.GONE, count_error=count_error)
        return Finish(Ended.ENDED, members, count_error=count_error)

    def delivered(
        self,
        batch_id: str,
        token: str,
        *,
        http_status: int | None = None,
        latency_ms: float | None = None,
        sent: Iterable[str] | None = None,
        tally: Tally | None = None,
    ) -> Finish:
        """Braze accepted the batch: end it and let waiting newer changes become due.

        For the history: Braze's status and answer time; `sent`, the members actually in
        the request when some were left out (an opt-out Braze holds; None: all were).
        `tally`: the request, counted in the same call after the outcome (stores/counters.py;
        in any case, as the request was sent: also when the claim was lost)."""
        return self._finish(
            batch_id, token, "delivered", "", http_status, latency_ms, sent, tally=tally
        )

    def delivered_except(
        self,
        batch_id: str,
        token: str,
        named: list[str],
        error: str,
        *,
        http_status: int | None = None,
        latency_ms: float | None = None,
        sent: Iterable[str] | None = None,
    ) -> Finish:
        """Braze accepted the batch but its `errors` named some identifiers: those alone
        are dead-lettered (with `error`), the rest delivered, in one step."""
        return self._finish(
            batch_id, token, "delivered", error, http_status, latency_ms, sent, named
        )

    def dead_letter(
        self,
        batch_id: str,
        token: str,
        error: str,
        *,
        http_status: int | None = None,
        latency_ms: float | None = None,
    ) -> Finish:
        """Give up on the batch after a failed attempt: move it whole to the dead-letter
        store with its error and the attempts made (this one included)."""
        return self._finish(batch_id, token, "dead", error, http_status, latency_ms)

    # --- waiting -------------------------------------------------------------------------

    def defer(
        self,
        batch_id: str,
        token: str,
        *,
        error: str,
        count_attempt: bool,
        due_in_ms: int,
        reason: WaitReason,
        grace_ms: int,
        solo: bool = False,
        http_status: int | None = None,
    ) -> Deferral:
        """Release the claim and let the batch wait in the schedule, due in `due_in_ms`,
        for `reason`. `solo` takes it out of its v2 pack. After a post (`http_status`, or
        an attempt counted) the members' history records the retry."""
        k = self.keys
        stored, told = self._texts.texts(token, batch_id, error)
        status, attempts = self.scripts.defer_batch(
            keys=[
                *self._claim_keys(batch_id),
                k.schedule,
                k.schedule_reasons,
                k.coalesce_nudge,
            ],
            args=[
                batch_id,
                token,
                int(count_attempt),
                stored,
                max(due_in_ms, 0),
                "solo" if solo else "",
                reason.value,
                grace_ms,
                "" if http_status is None else http_status,
                *self.retention.history_args,
                told,
            ],
        )
        return Deferral(Deferred(_text(status)), int(attempts))

    def split(
        self, batch_id: str, token: str, *, isolate: str | None, grace_ms: int
    ) -> tuple[str, str] | None:
        """Replace a refused batch by two halves (the first is `isolate` alone when it is a
        member), due now in the schedule; returns their ids, or None if the batch cannot be
        split (one member, gone, or no longer the caller's)."""
        k = self.keys
        prefix = lane_prefix(batch_lane(batch_id))  # the halves stay in the batch's lane
        first, second = prefix + uuid.uuid4().hex, prefix + uuid.uuid4().hex
        size = int(
            self.scripts.split_batch(
                keys=[
                    *self._claim_keys(batch_id),
                    k.inflight,
                    k.batch(first),
                    k.batch(second),
                    k.schedule,
                    k.schedule_reasons,
                    k.coalesce_nudge,
                ],
                args=[batch_id, token, first, second, grace_ms, isolate or ""],
            )
        )
        return (first, second) if size > 0 else None

    def expedite(self, batch_id: str) -> bool:
        """Make a batch waiting in the schedule due now (a held half whose sibling was
        answered); True if it was waiting."""
        k = self.keys
        pipe = self.client.pipeline(transaction=True)
        # XX LT CH: only an entry still there, only earlier (due at 0 is due now, first).
        pipe.zadd(k.schedule, {batch_id: 0}, xx=True, lt=True, ch=True)
        pipe.lpush(k.coalesce_nudge, 1)
        pipe.ltrim(k.coalesce_nudge, 0, 0)
        changed, _, _ = pipe.execute()
        return bool(changed)

    def release_waiting(self, reason: WaitReason) -> int:
        """Every batch waiting for `reason` becomes due now; returns how many."""
        k = self.keys
        return int(
            self.scripts.release_waiting(
                keys=[k.schedule, k.schedule_reasons, k.coalesce_nudge], args=[reason.value]
            )
        )

    # --- the tick's side -----------------------------------------------------------------

    def take_back(self, suspects: list[str], *, on_wire_ms: int, grace_ms: int) -> TakeBack:
        """Take back the claims of workers whose heartbeat is gone and claims whose lease
        ran out, and, on a worker's death, every batch between message and claim (its
        message may have died with the worker); they become due now (take_back.lua)."""
        k = self.keys
        taken, unknown, alive = self.scripts.take_back(
            keys=[
                k.claims,
                k.claim_tokens,
                k.fences,
                k.schedule,
                k.schedule_reasons,
                k.batches,
                k.workers,
                k.coalesce_nudge,
                *(k.heartbeat(worker_id) for worker_id in suspects),
            ],
            args=[on_wire_ms, grace_ms, *suspects],
        )
        return TakeBack(tuple(_text(raw) for raw in taken), int(unknown), int(alive))

    def recover_orphans(
        self, batch_ids: Iterable[str], grace_ms: int, *, ended_by: Iterable[tuple[str, str]] = ()
    ) -> list[str]:
        """Batches their holder let go of that nobody will send again become due now
        (recover_orphans.lua): `batch_ids` a poster found it did not hold (a claim lost with
        a failed-over master, unless a take-over has it), `ended_by` (batch id, token) pairs
        a holder ended that are still claimed in that token's name (an end lost so)."""
        k = self.keys
        args: list[str | int] = [grace_ms]
        for batch_id in batch_ids:
            args += [batch_id, ""]
        for batch_id, token in ended_by:
            args += [batch_id, token]
        ids = self.scripts.recover_orphans(
            keys=[
                k.batches,
                k.claims,
                k.claim_tokens,
                k.fences,
                k.schedule,
                k.schedule_reasons,
                k.coalesce_nudge,
            ],
            args=args,
        )
        return [_text(raw) for raw in ids]

    def dispatch_due(self, limit: int, grace_ms: int, *, call_id: str | None = None) -> list[str]:
        """Take the due batches out of the schedule: the caller sends each a message. The
        call is named (`Keys.handed`; `call_id`, None: a new name): sent again after its
        reply was lost (by redis-py, or by the coalescer with the same `call_id`), it
        answers the same ids (dispatch_due.lua)."""
        k = self.keys
        ids = self.scripts.dispatch_due(
            keys=[k.schedule, k.schedule_reasons, k.batches, k.handed(call_id or new_call_id())],
            args=[limit, grace_ms, HANDED_KEEP_MS],
        )
        return [_text(raw) for raw in ids]

    def sweep(self, limit: int, grace_ms: int, *, call_id: str | None = None) -> list[str]:
        """Batches between message and claim past their deadline: the message was lost.
        Named like `dispatch_due`'s call, for the same reason (sweep_batches.lua)."""
        k = self.keys
        ids = self.scripts.sweep_batches(
            keys=[k.batches, k.claims, k.schedule, k.handed(call_id or new_call_id())],
            args=[limit, grace_ms, HANDED_KEEP_MS],
        )
        return [_text(raw) for raw in ids]

    def next_due_ms(self) -> int | None:
        """When the soonest schedule entry is due (Redis time, ms), if any."""
        first = self.client.zrange(self.keys.schedule, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    def count(self) -> int:
        """Batches cut and not yet finished."""
        return int(self.client.zcard(self.keys.batches))

    def count_live(self) -> int:
        """Of those, the live lane's (their ids say it). Reads every id: called once a full
        tick, on a set bounded by MAX_BATCHES_IN_FLIGHT."""
        return sum(
            1
            for raw in self.client.zrange(self.keys.batches, 0, -1)
            if batch_lane(_text(raw)) is Lane.LIVE
        )
