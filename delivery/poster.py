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
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from config.settings import Settings
from core.outcome import Classified, Outcome, backoff_seconds, classify, parse_rate_limit
from core.redaction import mask_identifier
from core.refusal import (
    Decision,
    Verdict,
    decide_bad_request,
    delivery_errors,
    named_identifiers,
)
from delivery.braze_client import V1_PATH, V2_PATH, BrazeClient, Reply, v1_body, v2_body
from delivery.braze_reads import BrazeReadError, ReadDeferred
from delivery.opt_outs import OptOutCheck
from stores import counters as metrics
from stores.batch_records import BatchRecord, BatchStore, ClaimStatus
from stores.buffer import server_time_ms
from stores.limiter import Grant, RateLimiter
from stores.refusals import Refusals

logger = logging.getLogger("braze_subs.poster")


@dataclass(frozen=True, slots=True)
class PostReport:
    """What happened to one batch in one task run (also the task's Flower-visible result)."""

    batch_id: str
    status: str  # delivered | dead_lettered | split | retry | waiting | gone | busy | empty | lost
    size: int = 0  # identifiers in the request (all entries of a v2 pack)
    entries: int = 0  # batches in the request
    http_status: int | None = None
    latency_ms: float | None = None
    attempt: int = 0
    retry_in: float | None = None
    detail: str = ""


def _no_dispatch(_batch_id: str, _countdown: float) -> None:
    return None


# How often a refused half of a split looks again whether its sibling was answered.
HOLD_SECONDS = 1.0


def masked_detail(detail: str, records: list[BatchRecord]) -> str:
    """`detail` (Braze's message) with every identifier of the batches it quotes masked,
    for log lines; the batch record and the dead letter keep it whole."""
    for record in records:
        kind = record.key.kind.value
        for value in named_identifiers(detail, record.values) if detail else ():
            detail = detail.replace(value, mask_identifier(kind, value))
    return detail


class Poster:
    def __init__(
        self,
        settings: Settings,
        store: BatchStore,
        braze: BrazeClient,
        limiter: RateLimiter | None = None,
        *,
        dispatch: Callable[[str, float], object] = _no_dispatch,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        opt_outs: OptOutCheck | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.braze = braze
        self.limiter = limiter
        self.dispatch = dispatch  # re-sends a pack sibling's message after a deferral
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.opt_outs = opt_outs  # respect_opt_out: leave out who opted out in Braze
        self.refusals = Refusals(store.client, store.keys)

    # --- the steps ------------------------------------------------------------------------

    def post(self, batch_id: str) -> PostReport:
        token = uuid.uuid4().hex
        lease_ms = round(self.settings.batch_claim_seconds * 1000)
        claim = self.store.claim(batch_id, token, lease_ms)
        if claim.status is ClaimStatus.EMPTY and claim.record is not None:
            self._dispatch_siblings(claim.record)  # the pack's message was this one
        if claim.status is not ClaimStatus.CLAIMED or claim.record is None:
            return PostReport(batch_id, claim.status.value)
        records = [claim.record]
        if self.settings.braze_api_version == "v2":
            records += self._claim_siblings(claim.record, token, lease_ms)
        else:
            self._dispatch_siblings(claim.record)
        report = PostReport(
            batch_id,
            "retry",
            size=len({value for record in records for value in record.values}),
            entries=len(records),
            attempt=claim.record.attempts + 1,
        )
        unsent = self._refused_unsent(records, token, report)
        if unsent is not None:
            unsent = replace(unsent, detail=masked_detail(unsent.detail, records))
            self._log(records, unsent)
            return unsent

        grant = None
        if self.limiter is not None:
            grant = self.limiter.acquire()
            waiting = self._wait_for_turn(grant, records, token, report)
            if waiting is not None:
                return waiting

        records_or_report = self._respect_opt_outs(records, token, report)
        if isinstance(records_or_report, PostReport):
            return records_or_report
        records = records_or_report
        # Fencing: the claim may have been lost while this worker waited for its turn or
        # froze (a paused container): then another holds the batch, and sending would risk
        # an older state landing after a newer one. Checked last, right before the send.
        need_ms = round(self.settings.http_timeout_seconds * 1000)
        if not self.store.fence([r.id for r in records], token, need_ms):
            logger.warning(
                "batch %s: claim lost before sending (%d identifiers): not sent; its holder "
                "posts it",
                batch_id,
                report.size,
            )
            return replace(report, status="lost", detail="claim lost before sending")
        reply = self._send(records)
        result = classify(reply.status, reply.body, reply.error)
        report = replace(
            report,
            http_status=reply.status,
            latency_ms=round(reply.latency_ms, 1),
            detail=result.detail,
        )
        report = self._settle(records, token, report, reply, result)
        # The report is the task's result, which Flower shows: identifiers masked.
        report = replace(report, detail=masked_detail(report.detail, records))
        probe_passed = grant is not None and grant.probe and result.outcome is Outcome.DELIVERED
        if probe_passed and self.limiter is not None and self.limiter.close_circuit():
            logger.warning("credentials accepted again: posting resumes")
        self._log(records, report)
        return report

    def _wait_for_turn(
        self, grant: Grant, records: list[BatchRecord], token: str, report: PostReport
    ) -> PostReport | None:
        """Sleep until the reserved turn; or put the batches back (no attempt spent) when
        the turn is too far off, or posting was paused meanwhile. None: go ahead."""
        assert self.limiter is not None
        if not grant.granted:
            jitter = self.rng.uniform(0, max(0.05, grant.wait_seconds / 2))
            return self._waiting(
                records, token, report, grant.wait_seconds + jitter, "waiting for the rate budget"
            )
        if grant.wait_seconds > 0:
            self.sleep(grant.wait_seconds)
        # A turn reserved before another worker hit a 429 must not go into the exhausted
        # window: the pause wins over the reservation (a probe is the pause's exception).
        paused = 0.0 if grant.probe else self.limiter.paused_for()
        if paused > 0:
            wait = paused + self.rng.uniform(0, 0.5)
            return self._waiting(records, token, report, wait, "posting paused after a 429")
        return None

    def _waiting(
        self, records: list[BatchRecord], token: str, report: PostReport, wait: float, why: str
    ) -> PostReport:
        return self._defer(
            records, token, replace(report, status="waiting"), wait, detail=why, count_attempt=False
        )

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
            return self._waiting(records, token, report, wait, f"opt-out check: {deferred}")
        except BrazeReadError as exc:
            failed = replace(report, detail=f"opt-out check: {exc}")
            if report.attempt >= self.settings.max_attempts:
                for record in records:
                    self.store.dead_letter(record.id, token, failed.detail)
                failed = replace(failed, status="dead_lettered")
            else:
                wait = backoff_seconds(
                    report.attempt,
                    base=self.settings.retry_backoff_base_seconds,
                    cap=self.settings.retry_backoff_max_seconds,
                    rng=self.rng,
                )
                failed = self._defer(records, token, failed, wait, count_attempt=True)
            failed = replace(failed, detail=masked_detail(failed.detail, records))
            self._log(records, failed)
            return failed
        for record in screened.emptied:
            self.store.delivered(record.id, token, sent=())
        if not screened.send:
            done = replace(report, status="delivered", size=0, detail="opted out in Braze")
            self._log(records, done)
            return done
        return screened.send

    def _dispatch_siblings(self, lead: BatchRecord) -> None:
        """A pack travels as one message, for its first batch. A worker that does not send
        the pack whole gives every other batch of it a message of its own (once: on the
        first attempt; a duplicate message would find the batch gone or busy anyway)."""
        if lead.attempts == 0:
            for sibling_id in lead.pack:
                if sibling_id != lead.id:
                    self.dispatch(sibling_id, 0.0)

    def _claim_siblings(self, lead: BatchRecord, token: str, lease_ms: int) -> list[BatchRecord]:
        siblings: list[BatchRecord] = []
        values = set(lead.values)
        for sibling_id in lead.pack:
            if sibling_id == lead.id:
                continue
            claim = self.store.claim(sibling_id, token, lease_ms)
            record = claim.record
            if claim.status is not ClaimStatus.CLAIMED or record is None:
                continue
            if (
                record.key.kind is not lead.key.kind
                or len(values | set(record.values)) > self.settings.batch_max_identifiers
            ):
                # Cannot happen for packs the planner made; never send an oversized request.
                self.store.defer(sibling_id, token, error="", count_attempt=False, redispatch_ms=0)
                self.dispatch(sibling_id, 0.0)
                continue
            values |= set(record.values)
            siblings.append(record)
        return siblings

    def _send(self, records: list[BatchRecord]) -> Reply:
        if self.settings.braze_api_version == "v2":
            return self.braze.post(V2_PATH, v2_body([(r.key, r.values) for r in records]))
        (record,) = records
        return self.braze.post(V1_PATH, v1_body(record.key, record.values))

    def _settle(
        self,
        records: list[BatchRecord],
        token: str,
        report: PostReport,
        reply: Reply,
        result: Classified,
    ) -> PostReport:
        settings = self.settings
        rate = parse_rate_limit(reply.headers)
        client = self.store.client
        metrics.record(
            client,
            self.store.keys,
            server_time_ms(client),
            identifiers=report.size,
            throttled=result.outcome is Outcome.RATE_LIMITED,
            endpoint=V2_PATH if settings.braze_api_version == "v2" else V1_PATH,
            status=reply.status,
        )
        if self.limiter is not None and reply.status is not None:
            self.limiter.observe(rate)

        answer = {"http_status": reply.status, "latency_ms": report.latency_ms}  # for history
        if result.outcome is Outcome.DELIVERED:
            errors = delivery_errors(reply.body)
            if errors:
                return self._delivered_with_errors(records, token, report, errors)
            ended = [
                self.store.delivered(record.id, token, sent=record.values, **answer)
                for record in records
            ]
            if any(count < 0 for count in ended):
                # Another worker holds the claim now (this one froze after its fence): it
                # ends the batch; this worker does not report a delivery it cannot vouch for.
                logger.warning("batch %s: claim lost during its request", report.batch_id)
                return replace(report, status="lost", detail="claim lost during the request")
            return replace(report, status="delivered", detail="")
        if result.outcome is Outcome.RATE_LIMITED:
            window = settings.braze_rate_limit_window_seconds
            reset = rate.reset_epoch or (time.time() + window)
            if self.limiter is not None:
                self.limiter.pause_until(reset, "429 from Braze")
            wait = min(max(reset - time.time(), 0.5), window) + self.rng.uniform(0, 0.5)
            return self._defer(records, token, report, wait, count_attempt=False)
        if result.outcome is Outcome.CREDENTIALS:
            # The key, not the changes, is at fault: stop everyone, spend nothing, and let
            # one probe per interval find out when it works again.
            wait = settings.credentials_probe_seconds
            if self.limiter is not None and self.limiter.open_circuit(result.detail):
                logger.error("Braze refused the API key (%s): posting stopped", result.detail)
            return self._defer(
                records, token, report, wait + self.rng.uniform(0, wait / 4), count_attempt=False
            )
        if result.outcome is Outcome.BAD_REQUEST:
            return self._isolate(records, token, report)
        if report.attempt >= settings.max_attempts:
            for record in records:
                self.store.dead_letter(record.id, token, result.detail, **answer)
            return replace(report, status="dead_lettered")
        wait = backoff_seconds(
            report.attempt,
            base=settings.retry_backoff_base_seconds,
            cap=settings.retry_backoff_max_seconds,
            rng=self.rng,
        )
        return self._defer(records, token, report, wait, count_attempt=True)

    def _isolate(self, records: list[BatchRecord], token: str, report: PostReport) -> PostReport:
        """Braze refused the request (400): find the identifiers at fault by splitting, so
        that only they are dead-lettered and the rest is delivered. Splits cost no attempt;
        each half goes through the rate budget like any request. One bad identifier in 50
        costs about 2 * log2(50) extra requests, or 2 when Braze's message names it."""
        grace_ms = round(self.settings.batch_redispatch_seconds * 1000)
        if len(records) > 1:  # a v2 pack: first find the batch at fault, each sent alone
            for record in records:
                self.store.defer(
                    record.id,
                    token,
                    error=report.detail,
                    count_attempt=False,
                    redispatch_ms=grace_ms,
                    solo=True,
                )
            for record in records[1:]:
                self.dispatch(record.id, 0.0)
            return replace(report, status="retry", retry_in=0.0)
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
            self.store.dead_letter(record.id, token, detail, http_status=report.http_status)
            return replace(report, status="dead_lettered")
        if verdict is Verdict.HOLD:
            wait = HOLD_SECONDS + self.rng.uniform(0, HOLD_SECONDS / 2)
            return self._defer(
                [record],
                token,
                replace(report, status="waiting"),
                wait,
                count_attempt=False,
                detail=detail,
            )
        halves = self.store.split(
            record.id,
            token,
            isolate=decision.isolate,
            redispatch_ms=round(self.settings.batch_redispatch_seconds * 1000),
        )
        if halves:
            metrics.count(self.store.client, self.store.keys, "splits")
        for half in halves or ():
            self.dispatch(half, 0.0)
        return replace(report, status="split" if halves else "busy")

    def _condemn(
        self, record: BatchRecord, token: str, report: PostReport, detail: str, why: str
    ) -> PostReport:
        key = record.key
        refusal = self.refusals.refuse(
            key.group_id,
            key.state.value,
            key.kind.value,
            detail,
            now_ms=server_time_ms(self.store.client),
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
        self.store.dead_letter(record.id, token, f"{detail} (group refused: {why})")
        if record.sibling:  # the held half: it finds the refusal and follows unsent
            self.dispatch(record.sibling, 0.0)
        return replace(report, status="dead_lettered", detail=f"{detail} (group refused)")

    def _refused_unsent(
        self, records: list[BatchRecord], token: str, report: PostReport
    ) -> PostReport | None:
        """Before a request: a batch whose group Braze refuses as a whole is dead-lettered
        unsent, and a refused half awaiting its sibling is decided without a request.
        None: send the request."""
        outcome = None
        for record in records:
            key = record.key
            refusal = self.refusals.standing(key.group_id, key.state.value, key.kind.value)
            if refusal is None:
                continue
            detail = f"not sent: group refused as a whole by Braze: {refusal.detail}"
            self.store.dead_letter(record.id, token, detail)
            if record.sibling:
                self.refusals.forget_half(record.id)
            outcome = replace(report, status="dead_lettered", detail=detail)
        if outcome is None and len(records) == 1 and records[0].sibling:
            (record,) = records
            detail = self.refusals.half_refused(record.id)
            if detail is not None:
                return self._refused(record, token, replace(report, detail=detail), detail)
        if outcome is not None and len(records) > 1:
            # A pack: the others go alone (the refused ones find their batch gone).
            grace_ms = round(self.settings.batch_redispatch_seconds * 1000)
            for record in records:
                self.store.defer(
                    record.id,
                    token,
                    error="",
                    count_attempt=False,
                    redispatch_ms=grace_ms,
                    solo=True,
                )
                if record is not records[0]:
                    self.dispatch(record.id, 0.0)
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
        for record in records:
            named = named_identifiers(text, record.values)
            if named:
                error = f"HTTP {report.http_status} errors: {text}"[:500]
                self.store.delivered_except(
                    record.id, token, named, error, sent=record.values, **answer
                )
                dead += len(named)
            else:
                self.store.delivered(record.id, token, sent=record.values, **answer)
        pipe = self.store.client.pipeline(transaction=False)
        pipe.hincrby(self.store.keys.stats, "delivery_errors", len(errors))
        pipe.hincrby(self.store.keys.stats, "delivered_with_errors", 1)
        pipe.execute()
        logger.warning(
            "batch %s delivered with %d error(s) from Braze, %d identifier(s) dead-lettered: %s",
            report.batch_id,
            len(errors),
            dead,
            json.dumps([masked_detail(error, records) for error in errors])[:1000],
        )
        return replace(report, status="delivered", detail=masked_detail(text, records)[:300])

    def _defer(
        self,
        records: list[BatchRecord],
        token: str,
        report: PostReport,
        wait: float,
        *,
        count_attempt: bool,
        detail: str | None = None,
    ) -> PostReport:
        """Put the batches back, keeping their locks; the lead retries via its task, and
        every sibling gets a message of its own (a duplicate message finds it gone)."""
        grace_ms = round(self.settings.batch_redispatch_seconds * 1000)
        for record in records:
            self.store.defer(
                record.id,
                token,
                error=detail if detail is not None else report.detail,
                count_attempt=count_attempt,
                redispatch_ms=round(wait * 1000) + grace_ms,
                http_status=report.http_status,
            )
        for record in records[1:]:
            self.dispatch(record.id, wait)
        return replace(report, retry_in=round(wait, 3))

    def _log(self, records: list[BatchRecord], report: PostReport) -> None:
        lead = records[0].key
        log = logger.warning if report.status in ("retry", "dead_lettered") else logger.info
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
            if report.status != "delivered"
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
