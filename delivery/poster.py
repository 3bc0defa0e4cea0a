"""Posting one batch (v1), or one batch and its pack (v2): claim, wait for a turn in the
shared rate budget, send, and act on Braze's answer.

- delivered: the batches end and their identifiers unlock;
- 429: every worker pauses until Braze's reset; the batches go again after it, no attempt
  spent;
- credentials (401/403/404): every worker stops posting (a circuit in the shared budget),
  one probe per interval tries again, no attempt is spent and nothing is dead-lettered;
- 400: split (halves, or the identifier Braze names) until only the identifiers Braze
  refuses remain; those are dead-lettered with Braze's message;
- anything else: retried with exponential backoff and full jitter, and dead-lettered after
  `max_attempts`.
Waiting for a turn is not a failed attempt either.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from config.settings import Settings
from core.outcome import Classified, Outcome, backoff_seconds, classify, parse_rate_limit
from delivery.braze_client import V1_PATH, V2_PATH, BrazeClient, Reply, v1_body, v2_body
from delivery.braze_reads import BrazeReadError, ReadDeferred
from delivery.opt_outs import OptOutCheck
from stores import counters as metrics
from stores.batch_records import BatchRecord, BatchStore, ClaimStatus
from stores.buffer import server_time_ms
from stores.limiter import Grant, RateLimiter

logger = logging.getLogger("braze_subs.poster")


@dataclass(frozen=True, slots=True)
class PostReport:
    """What happened to one batch in one task run (also the task's Flower-visible result)."""

    batch_id: str
    status: str  # delivered | dead_lettered | split | retry | waiting | gone | busy | empty
    size: int = 0  # identifiers in the request (all entries of a v2 pack)
    entries: int = 0  # batches in the request
    http_status: int | None = None
    latency_ms: float | None = None
    attempt: int = 0
    retry_in: float | None = None
    detail: str = ""


def _no_dispatch(_batch_id: str, _countdown: float) -> None:
    return None


_TOKEN_SEPARATORS = re.compile(r"""[\s,;"'\[\]{}()<>]+""")


def named_identifier(message: str, values: tuple[str, ...]) -> str | None:
    """The one identifier of the batch that Braze's message names, if exactly one."""
    tokens = {token.strip(".:") for token in _TOKEN_SEPARATORS.split(message)}
    named = [value for value in values if value in tokens]
    return named[0] if len(named) == 1 else None


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
        reply = self._send(records)
        result = classify(reply.status, reply.body, reply.error)
        report = replace(
            report,
            http_status=reply.status,
            latency_ms=round(reply.latency_ms, 1),
            detail=result.detail,
        )
        report = self._settle(records, token, report, reply, result)
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
                return replace(failed, status="dead_lettered")
            wait = backoff_seconds(
                report.attempt,
                base=self.settings.retry_backoff_base_seconds,
                cap=self.settings.retry_backoff_max_seconds,
                rng=self.rng,
            )
            return self._defer(records, token, failed, wait, count_attempt=True)
        for record in screened.emptied:
            self.store.delivered(record.id, token)
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
        )
        if self.limiter is not None and reply.status is not None:
            self.limiter.observe(rate)

        if result.outcome is Outcome.DELIVERED:
            for record in records:
                self.store.delivered(record.id, token)
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
                self.store.dead_letter(record.id, token, result.detail)
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
        if record.size == 1:
            self.store.dead_letter(record.id, token, report.detail)
            return replace(report, status="dead_lettered")
        halves = self.store.split(
            record.id,
            token,
            isolate=named_identifier(report.detail, record.values),
            redispatch_ms=grace_ms,
        )
        for half in halves or ():
            self.dispatch(half, 0.0)
        return replace(report, status="split" if halves else "busy")

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
            f" detail={report.detail!r}" if report.status != "delivered" else "",
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
