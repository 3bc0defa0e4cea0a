"""Posting one batch: claim it, send it, and act on Braze's answer.

Delivered batches end (their identifiers unlock); failed attempts are deferred with
exponential backoff and full jitter, and after `max_attempts` the batch is dead-lettered.
A 429 or a credentials error is not the batch's fault and costs no attempt.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, replace

from config.settings import Settings
from worker.batches import BatchStore, ClaimStatus
from worker.braze_client import V1_PATH, BrazeClient, v1_body
from worker.outcome import Outcome, backoff_seconds, classify, parse_rate_limit

logger = logging.getLogger("braze_subs.poster")

# Wait after a credentials error before the batch tries again (the key must be fixed by a
# person; trying often helps nobody). Bounded by RETRY_BACKOFF_MAX_SECONDS.
CREDENTIALS_RETRY_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class PostReport:
    """What happened to one batch in one task run (also the task's Flower-visible result)."""

    batch_id: str
    status: str  # delivered | dead_lettered | retry | gone | busy | empty
    size: int = 0
    http_status: int | None = None
    latency_ms: float | None = None
    attempt: int = 0
    retry_in: float | None = None
    detail: str = ""


class Poster:
    def __init__(
        self,
        settings: Settings,
        store: BatchStore,
        braze: BrazeClient,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.braze = braze
        self.rng = rng or random.Random()

    def post(self, batch_id: str) -> PostReport:
        settings = self.settings
        token = uuid.uuid4().hex
        lease_ms = round(settings.batch_claim_seconds * 1000)
        claim = self.store.claim(batch_id, token, lease_ms)
        if claim.status is not ClaimStatus.CLAIMED or claim.record is None:
            return PostReport(batch_id, claim.status.value)
        record = claim.record
        attempt = record.attempts + 1

        reply = self.braze.post(V1_PATH, v1_body(record.key, record.values))
        result = classify(reply.status, reply.body, reply.error)
        report = PostReport(
            batch_id,
            "retry",
            size=record.size,
            http_status=reply.status,
            latency_ms=round(reply.latency_ms, 1),
            attempt=attempt,
            detail=result.detail,
        )

        if result.outcome is Outcome.DELIVERED:
            self.store.delivered(batch_id, token)
            report = replace(report, status="delivered", detail="")
        elif result.outcome is Outcome.RATE_LIMITED:
            reset = parse_rate_limit(reply.headers).reset_epoch
            wait = (reset - time.time()) if reset else settings.braze_rate_limit_window_seconds
            wait = min(max(wait, 0.5), settings.braze_rate_limit_window_seconds)
            report = self._defer(report, token, wait, count_attempt=False)
        elif result.outcome is Outcome.CREDENTIALS:
            wait = min(CREDENTIALS_RETRY_SECONDS, settings.retry_backoff_max_seconds)
            report = self._defer(report, token, wait, count_attempt=False)
        elif result.outcome is Outcome.BAD_REQUEST or attempt >= settings.max_attempts:
            self.store.dead_letter(batch_id, token, result.detail)
            report = replace(report, status="dead_lettered")
        else:
            wait = backoff_seconds(
                attempt,
                base=settings.retry_backoff_base_seconds,
                cap=settings.retry_backoff_max_seconds,
                rng=self.rng,
            )
            report = self._defer(report, token, wait, count_attempt=True)

        log = logger.warning if report.status in ("retry", "dead_lettered") else logger.info
        log(
            "batch %s group=%s state=%s kind=%s size=%d status=%s http=%s latency_ms=%s "
            "attempt=%d%s",
            batch_id,
            record.key.group_id,
            record.key.state.value,
            record.key.kind.value,
            record.size,
            report.status,
            reply.status,
            report.latency_ms,
            attempt,
            f" detail={report.detail!r}" if report.status != "delivered" else "",
            extra={"batch": _log_fields(report, record.key.group_id)},
        )
        return report

    def _defer(
        self, report: PostReport, token: str, wait: float, *, count_attempt: bool
    ) -> PostReport:
        grace_ms = round(self.settings.batch_redispatch_seconds * 1000)
        self.store.defer(
            report.batch_id,
            token,
            error=report.detail,
            count_attempt=count_attempt,
            redispatch_ms=round(wait * 1000) + grace_ms,
        )
        return replace(report, status="retry", retry_in=round(wait, 3))


def _log_fields(report: PostReport, group_id: str) -> dict[str, object]:
    return {
        "id": report.batch_id,
        "group": group_id,
        "size": report.size,
        "status": report.status,
        "http_status": report.http_status,
        "latency_ms": report.latency_ms,
        "attempt": report.attempt,
    }
