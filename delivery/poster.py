"""Posting one batch (v1), or one batch and its pack (v2): claim, wait for a turn in the
shared rate budget, send, and act on Braze's answer.

- delivered: the batches end and their identifiers unlock;
- 429: every worker pauses until Braze's reset; the batches go again after it, no attempt
  spent;
- credentials (401/403/404): every worker stops posting (a circuit in the shared budget),
  one probe per interval tries again, no attempt is spent and nothing is dead-lettered;
- 400: split (halves, or the identifier Braze names) until only the identifiers Braze
  refuses remain; those are dead-lettered with Braze's message. A batch refused as a whole
  (the message names the group, or both halves of a split are refused) is dead-lettered at
  once and its group + state + kind refused for a while: further batches of it are
  dead-lettered unsent (`core.refusal`, `stores.refusals`);
- 2xx with `errors`: delivered; the identifiers the errors name are dead-lettered, and the
  errors are logged (masked) and counted;
- anything else: retried with exponential backoff and full jitter, and dead-lettered after
  `max_attempts`.
Waiting for a turn is not a failed attempt either.

Whatever has to wait (a retry's backoff, a 429 pause, the key's next probe, a turn too far
off in the budget, a thread while its workspace holds its share of them:
delivery/thread_share.py) waits in the schedule in Redis, never in this process: the coalescer's
tick sends it a message when due (stores/batch_records.py). The claim is checked right
before the request (`fence`), and every end of a batch checks it again: a worker that lost
its claim while it waited or froze sends nothing and reports nothing as delivered.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from redis.backoff import FullJitterBackoff

from config.settings import Settings
from core.outcome import (
    Classified,
    Outcome,
    PostStatus,
    RateLimit,
    backoff_seconds,
    parse_rate_limit,
)
from core.planning import batch_lane
from core.redaction import mask_identifier
from core.refusal import (
    Decision,
    Verdict,
    decide_bad_request,
    delivery_errors,
    named_identifiers,
)
from core.waiting import WaitReason
from delivery.braze_client import V1_PATH, V2_PATH, BrazeClient, Reply, v1_body, v2_body
from delivery.braze_reads import BrazeReadError, ReadDeferred
from delivery.liveness import Liveness
from delivery.opt_outs import OptOutCheck
from delivery.thread_share import Seat, ThreadShare
from stores.batch_records import BatchRecord, BatchStore, Claim, ClaimStatus, Deferred, Ended
from stores.connection import REDIS_UNAVAILABLE
from stores.counters import Counters, Tally
from stores.limiter import Grant, RateLimiter
from stores.refusals import Refusals

logger = logging.getLogger("braze_subs.poster")

T = TypeVar("T")

# While Redis does not answer (a failover: the master of the workspace's slot is gone until
# its replica is promoted), a claim and a give-back are tried again after these waits:
# full jitter, doubling from 0.05 s up to 1 s (redis-py's own backoff), so they go through
# within about a second of the new master, for at most a lease (see `_until_answered`).
UNAVAILABLE_BACKOFF = FullJitterBackoff(cap=1.0, base=0.05)


@dataclass(frozen=True, slots=True)
class PostReport:
    """What happened to one batch in one task run (also the task's Flower-visible result)."""

    batch_id: str
    status: PostStatus
    size: int = 0  # identifiers in the request (all entries of a v2 pack)
    entries: int = 0  # batches in the request
    http_status: int | None = None
    latency_ms: float | None = None
    attempt: int = 0
    retry_in: float | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The report as the post tasks' result: `dataclasses.asdict`'s dict, the status as
        its plain string (equal to the member). Written out: `asdict` deep-copies every
        field, ~70 us a report against ~5 (issue 26: ten reports a message)."""
        return {
            "batch_id": self.batch_id,
            "status": self.status.value,
            "size": self.size,
            "entries": self.entries,
            "http_status": self.http_status,
            "latency_ms": self.latency_ms,
            "attempt": self.attempt,
            "retry_in": self.retry_in,
            "detail": self.detail,
        }


@dataclass(slots=True)
class _Sent:
    """Whether this post's request passed its fence (its bytes may have reached Braze: a
    request its claim fenced, claim_batch.lua, counts from its first byte), and its count
    once answered: told to the first finish that records the outcome, which counts it in
    the same call (finish_batch.lua; issue 26), else counted on its own afterwards."""

    sent: bool = False
    tally: Tally | None = None
    counted: bool = False

    def count_once(self) -> Tally | None:
        """The request's tally for the finish that will count it; None after the first."""
        if self.counted:
            return None
        self.counted = self.tally is not None
        return self.tally


# The least a batch waits in the schedule for a thread of its workspace's share (plus as
# much jitter): about a beat, so it comes back with the next tick or the one after.
SEAT_WAIT_MIN_SECONDS = 0.5

# How often a refused half of a split looks again whether its sibling was answered.
HOLD_SECONDS = 1.0

# What the task reports when its message finds no batch to post.
CLAIM_REPORTS = {
    ClaimStatus.GONE: PostStatus.GONE,
    ClaimStatus.BUSY: PostStatus.BUSY,
    ClaimStatus.WAITING: PostStatus.QUEUED,
    ClaimStatus.EMPTY: PostStatus.EMPTY,
}
PAUSE_429 = "429 from Braze"
WARN_STATUSES = (PostStatus.RETRY, PostStatus.DEAD_LETTERED, PostStatus.LOST)


def masked_detail(detail: str, records: list[BatchRecord]) -> str:
    """`detail` (Braze's message) with every identifier of the batches it quotes masked,
    for log lines; a batch record and a dead letter keep their own identifiers whole
    (the stores confine the rest: stores/batch_records.py)."""
    for record in records:
        kind = record.key.kind.value
        for value in named_identifiers(detail, record.values) if detail else ():
            detail = detail.replace(value, mask_identifier(kind, value))
    return detail


def sent_members(record: BatchRecord) -> tuple[str, ...] | None:
    """The members a delivered batch's end is told were sent (`BatchStore.delivered`'s
    `sent`): None (all of them) when none of its members asked to respect an opt-out, since
    only those can be left out of a request (delivery/opt_outs.py `to_check`); otherwise the
    ones the request held. Listing all 50 cost the end ~50 arguments to encode and a table
    to build in Lua for nothing (issue 26)."""
    return record.values if record.respect_opt_out else None


class Poster:
    def __init__(
        self,
        settings: Settings,
        store: BatchStore,
        braze: BrazeClient,
        limiter: RateLimiter,
        liveness: Liveness,
        counters: Counters,
        refusals: Refusals,
        *,
        rng: random.Random | None = None,
        opt_outs: OptOutCheck | None = None,
        share: ThreadShare | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.braze = braze
        self.limiter = limiter
        self.liveness = liveness  # this process's heartbeat, held claims and stop signal
        self.counters = counters
        self.refusals = refusals  # groups Braze refuses as a whole; halves of a split
        self.rng = rng or random.Random()
        self.opt_outs = opt_outs  # respect_opt_out: leave out who opted out in Braze
        # Several workspaces served: this one's share of the process's threads.
        self.share = share
        self.workspace = settings.workspace_name
        self.grace_ms = settings.redispatch_grace_ms
        # A claim that finds members superseded refills the batch up to this many with due
        # changes of its kind (claim_batch.lua), so the request goes out full (issue 26).
        self.top_up_to = settings.batch_max_identifiers

    @property
    def v2(self) -> bool:
        """A request is a pack of batches (Braze's v2 endpoint), not one batch."""
        return self.settings.braze_api_version == "v2"

    # --- the steps ------------------------------------------------------------------------

    def post(self, batch_id: str) -> PostReport:
        live = self.liveness
        live.ensure_started()  # the heartbeat exists before the claim names its holder
        token = f"{live.worker_id}/{uuid.uuid4().hex}"
        lease_ms = self.settings.claim_lease_ms
        # The workspace's seat first (delivery/thread_share.py): it is held through the
        # claim's and the give-back's tries while Redis does not answer too, so a failover
        # of one workspace's master holds at most that workspace's share of the threads.
        seat = self.share.take(self.workspace) if self.share is not None else None
        seated = self.share is None or seat is not None
        try:
            # Tried again while Redis does not answer: the message is taken, and a claim
            # that raised may or may not have been made; the same token claims again either
            # way (a renewal if it was made), rather than leave the batch for the sweep or
            # the lease. Without a seat, once: this thread is not the workspace's to hold
            # (a claim that fails then leaves the batch to the sweep).
            # A v1 request is this one batch: its claim takes the batch's turn of the rate
            # budget in the same call (claim_batch.lua; issue 26: one round trip a post less),
            # and a claim tried again answers the turn its first try took. Not for v2 (the
            # request is the pack, whose other batches are claimed after), nor without a seat
            # (the batch goes back to wait for a thread) or once the worker stops (it hands
            # the batch back): no turn is spent on a request that is not sent then.
            # Told the turn, the claim also fences the batch (issue 26: one round trip a
            # post less) when nothing can come between it and the request: the turn
            # granted for now, no top-up left to make, no opt-out to read first, no pack
            # to hand off (claim_batch.lua decides). Then the request goes without another
            # fence, its exchange's deadline counted from before the claim's call that
            # answered was sent, so it ends within the lease and the "sent at" mark's HTTP
            # timeout (take_back.lua) as a request fenced right before its first byte does.
            turn = None
            if seated and not self.v2 and not live.stopping.is_set():
                turn = self.limiter.turn_ask(batch_lane(batch_id))
            since = [0.0]

            def claim_it() -> Claim:
                since[0] = time.monotonic()
                return self.store.claim(
                    batch_id,
                    token,
                    lease_ms,
                    top_up_to=self.top_up_to,
                    turn=turn,
                    fence_ms=self.settings.http_timeout_ms if turn is not None else None,
                    opt_out_reads=self.opt_outs is not None,
                )

            claim = self._until_answered(claim_it, lease_ms) if seated else claim_it()
            if claim.status is not ClaimStatus.CLAIMED or claim.record is None:
                return PostReport(batch_id, CLAIM_REPORTS[claim.status])
            live.hold(batch_id, token)
            sent = _Sent()
            try:
                if claim.fenced:
                    return self._post_fenced(claim.record, claim, token, sent, since[0], seat)
                return self._post_claimed(claim.record, claim, token, lease_ms, sent, seat, seated)
            except Exception as exc:
                held = [b for b, by in live.held().items() if by == token]
                given_back = self._give_back_after_error(token, sent.sent)
                if isinstance(exc, REDIS_UNAVAILABLE) and given_back == {Deferred.LOST}:
                    # The claim had been lost already (this worker froze past its lease
                    # and the tick took its batch back): the post is over like any other
                    # whose claim was lost, and Redis's error (a connection it closed
                    # meanwhile) changes nothing about the batch, which is its new
                    # holder's or waits in the schedule.
                    logger.warning(
                        "batch %s: claim lost (%s after it was taken back): ended",
                        batch_id,
                        type(exc).__name__,
                    )
                    self._recover_orphans(held)
                    return PostReport(batch_id, PostStatus.LOST, detail="claim lost")
                raise
            finally:
                live.release_token(token)
        finally:
            if seat is not None:
                seat.release()

    def _give_back_after_error(self, token: str, sent: bool) -> set[Deferred | None]:
        """An error of this process mid-post (Redis unreachable, a bug): put what it holds
        back into the schedule at once rather than let it wait for the lease to run out.
        If the request had been sent its outcome is unknown: a retry is what that calls
        for, and it counts as an attempt, so that a post whose answer keeps failing this
        process is dead-lettered after MAX_ATTEMPTS instead of re-sent for ever (a double
        opt-in SMS each time). A batch whose outcome was recorded already is not held any
        more (its claim ended): this finds nothing to do for it.

        If Redis does not answer (the error was a failover's, and so is the give-back's),
        the give-back is tried again with backoff until it goes through, for at most a
        lease, so the batch waits seconds after the new master is up, not the lease or
        the sweep. It stays fenced: `defer` ends the claim only if this token still holds
        it, so a give-back that comes late, after the tick took the batch back (this
        worker frozen, or its heartbeat expired during the failover), finds it not its
        own and changes nothing; and a process that dies or freezes while it tries again
        stops beating, so the tick takes the batch back as from any dead worker.

        Returns what the give-backs found: `Deferred` statuses, None for one that failed
        (an empty set: this token held nothing any more)."""
        held = [b for b, held_by in self.liveness.held().items() if held_by == token]
        found: set[Deferred | None] = set()
        for batch_id in held:
            try:
                deferral = self._until_answered(
                    lambda batch_id=batch_id: self.store.defer(
                        batch_id,
                        token,
                        error="error in the worker after sending: outcome unknown"
                        if sent
                        else "error in the worker while posting",
                        count_attempt=sent,
                        due_in_ms=round(self.settings.retry_backoff_base_seconds * 1000),
                        reason=WaitReason.RETRY,
                        grace_ms=self.grace_ms,
                    ),
                    self.settings.claim_lease_ms,
                )
            except Exception as exc:  # the original error is the one that matters
                logger.warning("batch %s: could not be given back: %s", batch_id, exc)
                found.add(None)
            else:
                found.add(deferral.status)
        return found

    def _until_answered(self, call: Callable[[], T], within_ms: int) -> T:
        """`call()`, tried again after each error of a Redis that does not answer for now
        (stores.connection.REDIS_UNAVAILABLE: a failover) after UNAVAILABLE_BACKOFF's
        wait, until it answers; the last error is raised once the next try would come
        more than `within_ms` after the first error, or the worker begins to stop (its
        heartbeat goes with it, and the tick takes back what it holds). Any other error is
        raised at once. Safe for the steps it wraps because each checks the claim itself:
        a claim by its token (a renewal if the first try was made), a give-back only while
        the token holds it, a read.

        The bound counts from the first error, not from the call: a worker frozen in the
        middle of a call (a paused container) for longer than the bound finds its
        connection closed by Redis (its idle `timeout`) when thawed, and that first error
        is a stale socket, not an outage: it is tried again like any other."""
        deadline: float | None = None
        failures = 0
        while True:
            try:
                return call()
            except REDIS_UNAVAILABLE:
                failures += 1
                if deadline is None:
                    deadline = time.monotonic() + within_ms / 1000
                delay = UNAVAILABLE_BACKOFF.compute(failures)
                if time.monotonic() + delay > deadline or not self.liveness.wait(delay):
                    raise

    def _post_fenced(
        self,
        record: BatchRecord,
        claim: Claim,
        token: str,
        sent: _Sent,
        since: float,
        seat: Seat | None,
    ) -> PostReport:
        """A v1 post whose claim took its turn, granted for now, and fenced the batch
        (claim_batch.lua): nothing is left to do before the request (no wait, no top-up, no
        opt-out read, no pack to hand off, no refusal), and it goes out now, without
        `fence`, its exchange's deadline counted from `since` (before the claim was sent)."""
        grant = claim.grant
        assert grant is not None  # a claim fences only with its turn granted
        if seat is not None:
            seat.expect_release_in(grant.wait_seconds)
        report = PostReport(
            record.id,
            PostStatus.RETRY,
            size=len(set(record.values)),
            entries=1,
            attempt=record.attempts + 1,
        )
        return self._send_and_settle(record, [record], token, report, sent, grant, since)

    def _post_claimed(
        self,
        lead: BatchRecord,
        claim: Claim,
        token: str,
        lease_ms: int,
        sent: _Sent,
        seat: Seat | None,
        seated: bool,
    ) -> PostReport:
        records = [lead]
        claims = {lead.id: claim}
        if self.v2:
            for record, sibling in self._claim_siblings(lead, token, lease_ms):
                records.append(record)
                claims[record.id] = sibling
        elif len(lead.pack) > 1:
            # A v2 worker's tick packed this message; a v1 worker posts one batch a request:
            # the others of the pack go out alone, each with a message of its own.
            self._hand_off_pack(lead, token, lease_ms)
        report = PostReport(
            lead.id,
            PostStatus.RETRY,
            size=len({value for record in records for value in record.values}),
            entries=len(records),
            attempt=lead.attempts + 1,
        )
        unsent = self._refused_unsent(records, claims, token, report)
        if unsent is not None:
            unsent = replace(unsent, detail=masked_detail(unsent.detail, records))
            self._log(records, unsent)
            return unsent

        if not seated and self.share is not None:
            # This workspace holds its share of the process's threads: its batches go back
            # into the schedule until a seat is likely free, and this thread takes the
            # next message (another workspace's, perhaps) at once (delivery/thread_share.py).
            wait = max(self.share.free_in(self.workspace), SEAT_WAIT_MIN_SECONDS)
            return self._waiting(
                records,
                token,
                report,
                wait + self.rng.uniform(0, SEAT_WAIT_MIN_SECONDS),
                WaitReason.BUDGET,
                "waiting for a thread: the workspace holds its share of the worker's threads",
            )
        return self._post_in_seat(lead, records, token, report, sent, seat, claim.grant)

    def _post_in_seat(
        self,
        lead: BatchRecord,
        records: list[BatchRecord],
        token: str,
        report: PostReport,
        sent: _Sent,
        seat: Seat | None,
        grant: Grant | None,
    ) -> PostReport:
        if grant is None:  # the claim took no turn (v2; or the worker stops)
            if self.liveness.stopping.is_set():
                return self._hand_back(records, token, report)
            grant = self.limiter.acquire(batch_lane(lead.id))
        if seat is not None and grant.granted:
            seat.expect_release_in(grant.wait_seconds)
        waiting = self._wait_for_turn(grant, records, token, report)
        if waiting is not None:
            return waiting
        topped = self._top_up_before_send(records, token)
        if topped is not records:  # a full request is left as it is (the report's size too)
            records = topped
            report = replace(report, size=len({v for record in records for v in record.values}))

        records_or_report = self._respect_opt_outs(records, token, report)
        if isinstance(records_or_report, PostReport):
            return records_or_report
        records = records_or_report
        if self.liveness.stopping.is_set():
            return self._hand_back(records, token, report)
        return self._send_and_settle(lead, records, token, report, sent, grant, None)

    def _send_and_settle(
        self,
        lead: BatchRecord,
        records: list[BatchRecord],
        token: str,
        report: PostReport,
        sent: _Sent,
        grant: Grant,
        since: float | None,
    ) -> PostReport:
        """Send the request (fenced right before its first byte, unless its claim fenced
        it: `since`) and act on the answer."""
        if since is not None:
            # Fenced by the claim: what is left of the fence here is to note that the
            # request's first byte may go (its outcome unknown from then on).
            def fenced() -> bool:
                sent.sent = True
                return True

            reply = self._send(records, fence=fenced, since=since)
        else:
            # Fencing: the claim may have been lost while this worker waited for its turn
            # or froze (a paused container): then the batch was taken back, and sending
            # would risk an older state landing after a newer one. Checked last, right
            # before the request's first byte is written, with lease enough left for the
            # whole exchange.
            need_ms = self.settings.http_timeout_ms
            ids = [r.id for r in records]

            def fence() -> bool:
                sent.sent = self.store.fence(ids, token, need_ms)
                return sent.sent

            reply = self._send(records, fence=fence)
        if reply.unsent:
            logger.warning(
                "batch %s: claim lost before sending (%d identifiers): not sent; it was taken "
                "back and goes out from the schedule",
                lead.id,
                report.size,
            )
            self._recover_orphans([r.id for r in records])
            return replace(report, status=PostStatus.LOST, detail="claim lost before sending")
        result = reply.classified()
        report = replace(
            report,
            http_status=reply.status,
            latency_ms=round(reply.latency_ms, 1),
            detail=result.detail,
        )
        sent.tally = self.counters.tally(
            identifiers=report.size,
            throttled=result.outcome is Outcome.RATE_LIMITED,
            endpoint=V2_PATH if self.settings.braze_api_version == "v2" else V1_PATH,
            status=reply.status,
        )
        # The outcome first (ended, or deferred with its attempt counted), then the
        # bookkeeping: nothing after the outcome can make the batch go again.
        rate = parse_rate_limit(reply.headers)
        report = self._settle(records, token, report, reply, result, rate, sent)
        # The report is the task's result, which Flower shows: identifiers masked (a
        # delivery's detail is empty).
        if report.detail:
            report = replace(report, detail=masked_detail(report.detail, records))
        self._bookkeeping(records, report, reply, result, rate, grant, sent)
        return report

    def _top_up_before_send(self, records: list[BatchRecord], token: str) -> list[BatchRecord]:
        """After the wait for the turn, before the request is built (and before the opt-out
        check, which then covers the members taken too): a short batch is topped up again
        with the due changes of its kind that came while it waited (top_up_batch.lua, the
        claim's rules, while this token holds the claim; issue 26). A full request, a
        retry (the new members would inherit its attempts) and a split's half cost no
        round trip. A claim lost meanwhile leaves the record as it was: the fence refuses
        the send anyway."""
        if len({value for record in records for value in record.values}) >= self.top_up_to:
            return records
        need_ms = self.settings.http_timeout_ms
        topped: list[BatchRecord] = []
        for record in records:
            fresh = None
            if record.attempts == 0 and record.sibling is None:
                fresh = self.store.top_up_before_send(
                    record.id, token, need_ms, top_up_to=self.top_up_to
                )
            topped.append(fresh or record)
        return topped

    def _bookkeeping(
        self,
        records: list[BatchRecord],
        report: PostReport,
        reply: Reply,
        result: Classified,
        rate: RateLimit,
        grant: Grant,
        sent: _Sent,
    ) -> None:
        """What follows a recorded outcome: counters (unless the finish counted the request),
        Braze's rate-limit headers, a closed credentials circuit, the log line. Each step
        that fails is logged and skipped; none can change the outcome (the batch has ended
        or waits with its attempt counted)."""
        steps: list[tuple[str, Callable[[], object]]] = []
        tally = sent.count_once()
        if tally is not None:
            steps.append(("count the request", lambda: self.counters.count(tally)))
        if reply.status is not None and result.outcome is not Outcome.RATE_LIMITED:
            steps.append(
                (
                    "read the rate-limit headers",
                    lambda: self.limiter.observe(rate, sent_at_ms=grant.send_at_ms),
                )
            )
        if grant.tests_the_key and result.outcome is Outcome.DELIVERED:
            steps.append(("close the credentials circuit", lambda: self._close_circuit(grant)))
        steps.append(("log the outcome", lambda: self._log(records, report)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # the outcome stands; say what was skipped
                logger.error(
                    "batch %s: %s failed after its outcome (%s) was recorded: %s: %s",
                    report.batch_id,
                    what,
                    report.status,
                    type(exc).__name__,
                    str(exc)[:200],
                )

    def _close_circuit(self, grant: Grant) -> None:
        """A key works: the refused key's probe, or the key deployed since (a rotation, told
        by the grant while the circuit names another key). Closed for every worker and
        reader, then every batch that waited for the key is due now (a crash in between
        leaves them due at their probe time, as before)."""
        if self.limiter.close_circuit():
            released = self.store.release_waiting(WaitReason.CREDENTIALS)
            logger.warning(
                "credentials accepted %s: posting resumes (%d batches due now)",
                "again" if grant.probe else "with the key deployed since",
                released,
            )

    def _wait_for_turn(
        self, grant: Grant, records: list[BatchRecord], token: str, report: PostReport
    ) -> PostReport | None:
        """Sleep until the reserved turn; or put the batches back into the schedule (no
        attempt spent) when the turn is too far off, posting was paused meanwhile, or the
        worker began to stop. None: go ahead."""
        if not grant.granted:
            reason = {
                "paused": WaitReason.PAUSED,
                "credentials": WaitReason.CREDENTIALS,
            }.get(grant.waits_for, WaitReason.BUDGET)
            # A turn too far off: the limiter gave this batch its place in the queue of
            # refused ones (one interval apart), so little jitter is needed; a pause ends
            # for everyone at once, so spread those.
            spread = 0.05 if reason is WaitReason.BUDGET else grant.wait_seconds / 2
            wait = grant.wait_seconds + self.rng.uniform(0, max(0.05, spread))
            why = {
                WaitReason.PAUSED: "posting paused after a 429",
                WaitReason.CREDENTIALS: "the API key is refused: waiting for the next probe",
            }.get(reason, "waiting for the rate budget")
            return self._waiting(records, token, report, wait, reason, why)
        if not self.liveness.wait(grant.wait_seconds):
            return self._hand_back(records, token, report)
        # A turn reserved before another worker hit a 429 must not go into the exhausted
        # window, nor one reserved before Braze refused this key go out with it: the pause
        # wins over the reservation (a probe is the pause's exception). A turn granted for
        # now was reserved by the script that read the pause and the circuit an instant ago
        # (acquire_token.lua): reading them again then only moves that instant by a round
        # trip, as the request itself comes a moment after any read, so it is skipped
        # (~85 us of a worker's CPU a post, issue 26); a turn that was waited for reads them.
        if grant.probe or grant.wait_seconds <= 0:
            paused, why = 0.0, ""
        else:
            paused, why = self.limiter.pause_after_turn()
        if why == "credentials":
            wait = paused + self.rng.uniform(0, max(paused / 4, 0.5))
            return self._waiting(
                records,
                token,
                report,
                wait,
                WaitReason.CREDENTIALS,
                "the API key is refused: waiting for the next probe",
            )
        if paused > 0:
            wait = paused + self.rng.uniform(0, 0.5)
            return self._waiting(
                records, token, report, wait, WaitReason.PAUSED, "posting paused after a 429"
            )
        return None

    def _waiting(
        self,
        records: list[BatchRecord],
        token: str,
        report: PostReport,
        wait: float,
        reason: WaitReason,
        why: str,
    ) -> PostReport:
        return self._defer(
            records,
            token,
            replace(report, status=PostStatus.WAITING),
            wait,
            reason,
            detail=why,
            count_attempt=False,
        )

    def _hand_back(self, records: list[BatchRecord], token: str, report: PostReport) -> PostReport:
        """The worker is stopping (SIGTERM): what it has not sent goes back, due now, for
        another worker; nothing is spent."""
        handed = self._defer(
            records,
            token,
            replace(report, status=PostStatus.HANDED_BACK),
            0.0,
            WaitReason.HANDED_BACK,
            detail="handed back: the worker is stopping",
            count_attempt=False,
        )
        self._log(records, handed)
        return handed

    def _respect_opt_outs(
        self, records: list[BatchRecord], token: str, report: PostReport
    ) -> list[BatchRecord] | PostReport:
        """The records to post, without the identifiers Braze holds as unsubscribed where a
        change asked for it (delivery/opt_outs.py); or the report when nothing is posted:
        every identifier left out, or the check could not be made (then the batch waits
        or is retried like a failed post: an opt-out that cannot be ruled out is not
        overridden)."""
        if self.opt_outs is None:
            return records
        try:
            screened = self.opt_outs.screen(records)
        except ReadDeferred as deferred:
            wait = deferred.wait_seconds + self.rng.uniform(0, 0.5)
            return self._waiting(
                records, token, report, wait, WaitReason.BUDGET, f"opt-out check: {deferred}"
            )
        except BrazeReadError as exc:
            failed = replace(report, detail=f"opt-out check: {exc}")
            if report.attempt >= self.settings.max_attempts:
                failed = self._dead_letter(records, token, failed, failed.detail)
            else:
                wait = backoff_seconds(
                    report.attempt,
                    base=self.settings.retry_backoff_base_seconds,
                    cap=self.settings.retry_backoff_max_seconds,
                    rng=self.rng,
                )
                failed = self._defer(
                    records, token, failed, wait, WaitReason.RETRY, count_attempt=True
                )
            failed = replace(failed, detail=masked_detail(failed.detail, records))
            self._log(records, failed)
            return failed
        ended = [self.store.delivered(record.id, token, sent=()) for record in screened.emptied]
        if any(finish.status is not Ended.ENDED for finish in ended):
            return replace(report, status=PostStatus.LOST, detail="claim lost")
        if not screened.send:
            done = replace(report, status=PostStatus.DELIVERED, size=0, detail="opted out in Braze")
            self._log(records, done)
            return done
        return screened.send

    def _claim_siblings(
        self, lead: BatchRecord, token: str, lease_ms: int
    ) -> list[tuple[BatchRecord, Claim]]:
        """The other batches of the lead's v2 pack that no one holds and that do not wait
        in the schedule, with their claims: they travel in the same request."""
        siblings: list[tuple[BatchRecord, Claim]] = []
        values = set(lead.values)
        for sibling_id in lead.pack:
            if sibling_id == lead.id:
                continue
            claim = self.store.claim(sibling_id, token, lease_ms, top_up_to=self.top_up_to)
            record = claim.record
            if claim.status is not ClaimStatus.CLAIMED or record is None:
                continue
            self.liveness.hold(sibling_id, token)
            if (
                record.key.kind is not lead.key.kind
                or len(values | set(record.values)) > self.settings.batch_max_identifiers
            ):
                # Cannot happen for packs the planner made; never send an oversized request.
                self._put_back_alone(sibling_id, token)
                continue
            values |= set(record.values)
            siblings.append((record, claim))
        return siblings

    def _hand_off_pack(self, lead: BatchRecord, token: str, lease_ms: int) -> None:
        """A v1 worker took the message of a v2 pack: every other batch of it that no one
        holds and that does not wait is put into the schedule alone, due now, so the next
        tick sends each its own message (instead of the sweep, minutes later). Claimed
        first, so that a batch another worker holds or has finished is left alone."""
        for sibling_id in lead.pack:
            if sibling_id == lead.id:
                continue
            claim = self.store.claim(sibling_id, token, lease_ms, top_up_to=self.top_up_to)
            if claim.status is not ClaimStatus.CLAIMED:
                continue
            self.liveness.hold(sibling_id, token)
            self._put_back_alone(sibling_id, token)

    def _put_back_alone(self, batch_id: str, token: str) -> None:
        """A pack's batch this worker claimed but will not send with its pack: into the
        schedule on its own (out of the pack), due now, no attempt spent."""
        self.store.defer(
            batch_id,
            token,
            error="",
            count_attempt=False,
            due_in_ms=0,
            reason=WaitReason.READY,
            grace_ms=self.grace_ms,
            solo=True,
        )

    def _send(
        self,
        records: list[BatchRecord],
        fence: Callable[[], bool],
        since: float | None = None,
    ) -> Reply:
        if self.settings.braze_api_version == "v2":
            body = v2_body([(r.key, r.values) for r in records])
            return self.braze.post(V2_PATH, body, fence=fence)
        (record,) = records
        return self.braze.post(
            V1_PATH, v1_body(record.key, record.values), fence=fence, since=since
        )

    def _settle(
        self,
        records: list[BatchRecord],
        token: str,
        report: PostReport,
        reply: Reply,
        result: Classified,
        rate: RateLimit,
        sent: _Sent,
    ) -> PostReport:
        """Record the outcome of a request that was sent: the batches end, or wait in the
        schedule (a retry with its attempt counted; a pause or the key, without). A delivery
        without errors (nearly every post) counts the request in its first batch's finish."""
        settings = self.settings
        answer = {"http_status": reply.status, "latency_ms": report.latency_ms}  # for history
        if result.outcome is Outcome.DELIVERED:
            errors = delivery_errors(reply.body)
            if errors:
                return self._delivered_with_errors(records, token, report, errors)
            ended = [
                self.store.delivered(
                    record.id,
                    token,
                    sent=sent_members(record),
                    tally=sent.count_once(),
                    **answer,
                )
                for record in records
            ]
            for finish in ended:
                if finish.count_error is not None:  # as `_bookkeeping` logs a failed step
                    logger.error(
                        "batch %s: count the request failed after its outcome (%s) was "
                        "recorded: ResponseError: %s",
                        report.batch_id,
                        finish.status,
                        finish.count_error[:200],
                    )
            if any(finish.status is not Ended.ENDED for finish in ended):
                return self._lost_during_request(records, report)
            return replace(report, status=PostStatus.DELIVERED, detail="")
        if result.outcome is Outcome.RATE_LIMITED:
            window = settings.braze_rate_limit_window_seconds
            now = time.time()
            # A reset beyond one window is not Braze's: pause at most a window.
            reset = min(rate.reset_epoch or now + window, now + window)
            wait = min(max(reset - now, 0.5), window) + self.rng.uniform(0, 0.5)
            deferred = self._defer(records, token, report, wait, WaitReason.PAUSED)
            self._guarded("pause posting", lambda: self.limiter.pause_until(reset, PAUSE_429))
            return deferred
        if result.outcome in (Outcome.CREDENTIALS, Outcome.REDIRECTED):
            # The key (or, for a redirect, the endpoint) is at fault, not the changes: stop
            # everyone, spend nothing, and let one probe per interval find out when it works
            # again. A redirect is never followed: the key would go wherever it points.
            wait = settings.credentials_probe_seconds
            deferred = self._defer(
                records,
                token,
                report,
                wait + self.rng.uniform(0, wait / 4),
                WaitReason.CREDENTIALS,
            )
            self._guarded("stop posting", lambda: self._open_circuit(result))
            return deferred
        if result.outcome is Outcome.BAD_REQUEST:
            return self._isolate(records, token, report)
        if report.attempt >= settings.max_attempts:
            return self._dead_letter(records, token, report, result.detail, **answer)
        wait = backoff_seconds(
            report.attempt,
            base=settings.retry_backoff_base_seconds,
            cap=settings.retry_backoff_max_seconds,
            rng=self.rng,
        )
        return self._defer(records, token, report, wait, WaitReason.RETRY, count_attempt=True)

    def _open_circuit(self, result: Classified) -> None:
        """Stop posting everywhere; said once, loudly (the first worker to open it)."""
        if not self.limiter.open_circuit(result.detail):
            return
        if result.outcome is Outcome.REDIRECTED:
            logger.error(
                "configuration error: %s answered with a redirect (%s). Redirects are never "
                "followed (the API key would go wherever they point): check "
                "BRAZE_REST_ENDPOINT / BRAZE_INSTANCE. Posting stopped; one probe every %ss",
                self.braze.endpoint,
                result.detail,
                round(self.settings.credentials_probe_seconds),
            )
        else:
            logger.error("Braze refused the API key (%s): posting stopped", result.detail)

    def _guarded(self, what: str, step: Callable[[], object]) -> None:
        """Run a step that follows a recorded outcome; its failure is logged, not raised."""
        try:
            step()
        except Exception as exc:
            logger.error(
                "%s failed after the outcome was recorded: %s: %s",
                what,
                type(exc).__name__,
                str(exc)[:200],
            )

    def _lost_during_request(self, records: list[BatchRecord], report: PostReport) -> PostReport:
        # Another worker holds or will take the claim (this one froze after its fence): it
        # ends the batch; this worker does not report what it cannot vouch for.
        logger.warning("batch %s: claim lost during its request", report.batch_id)
        self._recover_orphans([r.id for r in records])
        return replace(report, status=PostStatus.LOST, detail="claim lost during the request")

    def _recover_orphans(self, ids: list[str]) -> None:
        """A claim can also be lost with the Redis master that took it (killed before its
        replica had the write): then nobody holds the batch on the new master, its message
        is consumed, and only the sweep would send it again, minutes later. Such batches go
        back into the schedule now (recover_orphans.lua); one someone holds or that waits
        already is left alone."""
        self._guarded(
            "recovering batches nobody holds",
            lambda: self.store.recover_orphans(ids, self.grace_ms),
        )

    def _dead_letter(
        self,
        records: list[BatchRecord],
        token: str,
        report: PostReport,
        error: str,
        *,
        http_status: int | None = None,
        latency_ms: float | None = None,
    ) -> PostReport:
        ended = [
            self.store.dead_letter(
                record.id, token, error, http_status=http_status, latency_ms=latency_ms
            )
            for record in records
        ]
        if any(finish.status is not Ended.ENDED for finish in ended):
            return self._lost_during_request(records, report)
        return replace(report, status=PostStatus.DEAD_LETTERED)

    def _isolate(self, records: list[BatchRecord], token: str, report: PostReport) -> PostReport:
        """Braze refused the request (400): find the identifiers at fault by splitting, so
        that only they are dead-lettered and the rest is delivered. Splits cost no attempt;
        each half goes through the rate budget like any request. One bad identifier in 50
        costs about 2 * log2(50) extra requests, or 2 when Braze's message names it."""
        if len(records) > 1:  # a v2 pack: first find the batch at fault, each sent alone
            return self._defer(
                records, token, report, 0.0, WaitReason.READY, count_attempt=False, solo=True
            )
        (record,) = records
        return self._refused(record, token, report, report.detail)

    # --- refusals: a 400, and what it says about the group ----------------------------------

    def _decide(self, record: BatchRecord, detail: str) -> Decision:
        key = record.key
        decision = decide_bad_request(detail, group_id=key.group_id, values=record.values)
        if record.sibling and decision.verdict in (Verdict.SPLIT, Verdict.DEAD_LETTER):
            # A half of a split that named nobody: the sibling's answer decides.
            sibling = self.refusals.mark_half_refused(
                record.id,
                record.sibling,
                detail,
                ttl_seconds=self.settings.batch_redispatch_seconds * 2,
            )
            decision = decide_bad_request(
                detail, group_id=key.group_id, values=record.values, sibling=sibling
            )
        return decision

    def _refused(
        self, record: BatchRecord, token: str, report: PostReport, detail: str
    ) -> PostReport:
        """Act on Braze's refusal (`detail`) of one batch: condemn its group, dead-letter
        it, isolate or split it, or hold it until its sibling half is answered."""
        decision = self._decide(record, detail)
        verdict = decision.verdict
        if verdict is not Verdict.HOLD:
            self.refusals.forget_half(record.id)
        if verdict is Verdict.CONDEMN:
            return self._condemn(record, token, report, detail, decision.why)
        if verdict is Verdict.DEAD_LETTER:
            return self._dead_letter(
                [record], token, report, detail, http_status=report.http_status
            )
        if verdict is Verdict.HOLD:
            wait = HOLD_SECONDS + self.rng.uniform(0, HOLD_SECONDS / 2)
            return self._defer(
                [record],
                token,
                replace(report, status=PostStatus.WAITING),
                wait,
                WaitReason.HELD,
                count_attempt=False,
                detail=detail,
            )
        halves = self.store.split(
            record.id, token, isolate=decision.isolate, grace_ms=self.grace_ms
        )
        if halves is None:
            # One member (cannot happen: a single member is dead-lettered, not split), or
            # the claim was taken back meanwhile: its next holder decides.
            return replace(report, status=PostStatus.LOST, detail="not split: claim lost")
        self.counters.add("splits")
        return replace(report, status=PostStatus.SPLIT)

    def _condemn(
        self, record: BatchRecord, token: str, report: PostReport, detail: str, why: str
    ) -> PostReport:
        key = record.key
        refusal = self.refusals.refuse(
            key.group_id,
            key.state.value,
            key.kind.value,
            detail,
            seconds=self.settings.group_refusal_seconds,
        )
        logger.error(
            "Braze refuses group=%s state=%s kind=%s as a whole (%s): %s; its batches are "
            "dead-lettered unsent for %ss (until `dlq replay`)",
            key.group_id,
            key.state.value,
            key.kind.value,
            why,
            masked_detail(detail, [record]),
            round(self.settings.group_refusal_seconds),
            extra={"refusal": {"group": key.group_id, "since_ms": refusal.since_ms}},
        )
        if record.sibling:  # the held half: it finds the refusal and follows unsent
            self.store.expedite(record.sibling)
        ended = self._dead_letter([record], token, report, f"{detail} (group refused: {why})")
        return replace(ended, detail=f"{detail} (group refused)")

    def _refused_unsent(
        self,
        records: list[BatchRecord],
        claims: dict[str, Claim],
        token: str,
        report: PostReport,
    ) -> PostReport | None:
        """Before a request: a batch whose group Braze refuses as a whole is dead-lettered
        unsent, and a refused half awaiting its sibling is decided without a request.
        None: send the request. Both are read by each batch's claim (claim_batch.lua), at
        its instant: one round trip a post where the reads after it took one or two more
        (issue 26). The claim is tried again while Redis does not answer, so these reads
        are too, as they were on their own."""
        outcome = None
        for record in records:
            refusal = claims[record.id].refusal
            if refusal is None:
                continue
            detail = f"not sent: group refused as a whole by Braze: {refusal.detail}"
            if record.sibling:
                self.refusals.forget_half(record.id)
            outcome = replace(self._dead_letter([record], token, report, detail), detail=detail)
        if outcome is None and len(records) == 1 and records[0].sibling:
            (record,) = records
            detail = claims[record.id].half_refused
            if detail is not None:
                return self._refused(record, token, replace(report, detail=detail), detail)
        if outcome is not None and len(records) > 1:
            # A pack: the others go alone, due now (the refused ones are gone already).
            self._defer(
                records, token, outcome, 0.0, WaitReason.READY, count_attempt=False, solo=True
            )
            return replace(outcome, retry_in=0.0)
        return outcome

    def _delivered_with_errors(
        self, records: list[BatchRecord], token: str, report: PostReport, errors: list[str]
    ) -> PostReport:
        """A 2xx with `errors`: delivered, except the identifiers the errors name, which are
        dead-lettered with them. The errors are logged masked and counted for `status`."""
        text = "; ".join(errors)
        answer = {"http_status": report.http_status, "latency_ms": report.latency_ms}
        dead = 0
        ended = []
        for record in records:
            named = named_identifiers(text, record.values)
            if named:
                error = f"HTTP {report.http_status} errors: {text}"[:500]
                ended.append(
                    self.store.delivered_except(
                        record.id, token, named, error, sent=record.values, **answer
                    )
                )
                dead += len(named)
            else:
                ended.append(
                    self.store.delivered(record.id, token, sent=sent_members(record), **answer)
                )
        if any(finish.status is not Ended.ENDED for finish in ended):
            return self._lost_during_request(records, report)
        self._guarded("count Braze's errors", lambda: self.counters.delivery_errors(len(errors)))
        logger.warning(
            "batch %s delivered with %d error(s) from Braze, %d identifier(s) dead-lettered: %s",
            report.batch_id,
            len(errors),
            dead,
            json.dumps([masked_detail(error, records) for error in errors])[:1000],
        )
        return replace(
            report, status=PostStatus.DELIVERED, detail=masked_detail(text, records)[:300]
        )

    def _defer(
        self,
        records: list[BatchRecord],
        token: str,
        report: PostReport,
        wait: float,
        reason: WaitReason,
        *,
        count_attempt: bool = False,
        detail: str | None = None,
        solo: bool = False,
    ) -> PostReport:
        """Put the batches back into the schedule, due in `wait` seconds for `reason`,
        keeping their locks; the coalescer's tick sends each a message when due."""
        deferred = [
            self.store.defer(
                record.id,
                token,
                error=detail if detail is not None else report.detail,
                count_attempt=count_attempt,
                due_in_ms=round(wait * 1000),
                reason=reason,
                grace_ms=self.grace_ms,
                solo=solo,
                http_status=report.http_status,
            )
            for record in records
        ]
        if any(d.status is not Deferred.DEFERRED for d in deferred):
            return self._lost_during_request(records, report)
        return replace(report, retry_in=round(wait, 3))

    def _log(self, records: list[BatchRecord], report: PostReport) -> None:
        lead = records[0].key
        log = logger.warning if report.status in WARN_STATUSES else logger.info
        log(
            "batch %s group=%s state=%s kind=%s entries=%d size=%d status=%s http=%s "
            "latency_ms=%s attempt=%d%s",
            report.batch_id,
            lead.group_id,
            lead.state.value,
            lead.kind.value,
            report.entries,
            report.size,
            report.status,
            report.http_status,
            report.latency_ms,
            report.attempt,
            f" detail={masked_detail(report.detail, records)!r}"
            if report.status is not PostStatus.DELIVERED
            else "",
            extra={
                "batch": {
                    "id": report.batch_id,
                    "group": lead.group_id,
                    "state": lead.state.value,
                    "kind": lead.kind.value,
                    "entries": report.entries,
                    "size": report.size,
                    "status": report.status,
                    "http_status": report.http_status,
                    "latency_ms": report.latency_ms,
                    "attempt": report.attempt,
                }
            },
        )
