"""What a Braze answer means for a batch: pure functions, no I/O.

`classify` maps one exchange (status code and body, or a transport error) to what the
worker does next; `parse_rate_limit` reads Braze's X-RateLimit-* headers; `backoff_seconds`
is the retry schedule. All three are exhaustively unit-tested.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from core.redaction import scrub

# Longest error text kept from a response body (it goes into logs and dead letters).
MAX_DETAIL = 300


class Outcome(StrEnum):
    DELIVERED = "delivered"  # 2xx: 201 success, 200 with non-fatal errors, 202 queued
    RATE_LIMITED = "rate_limited"  # 429: wait for the window's reset, then resend
    RETRYABLE = "retryable"  # 5xx, 408, timeouts, connection errors: back off, retry
    BAD_REQUEST = "bad_request"  # 400 and other 4xx: the content is at fault
    CREDENTIALS = "credentials"  # 401, 403, 404: the key is at fault, not the changes


class PostStatus(StrEnum):
    """What one run of the post task did with its batch (the task's result)."""

    DELIVERED = "delivered"  # Braze accepted it (perhaps naming some identifiers)
    DEAD_LETTERED = "dead_lettered"  # given up on: in the dead-letter store
    SPLIT = "split"  # refused (400): replaced by two halves, due now
    RETRY = "retry"  # failed: waits in the schedule for its backoff
    WAITING = "waiting"  # not sent: waits in the schedule for its turn, a pause, the key
    HANDED_BACK = "handed_back"  # not sent: the worker is stopping; due now for another
    LOST = "lost"  # this worker no longer holds the claim (taken back): nothing done
    GONE = "gone"  # the message found the batch finished
    BUSY = "busy"  # another worker holds it
    QUEUED = "queued"  # the message found the batch waiting in the schedule (a duplicate)
    EMPTY = "empty"  # every member had been superseded by a newer change


@dataclass(frozen=True, slots=True)
class Classified:
    outcome: Outcome
    detail: str  # short, one line: Braze's message or the transport error's name


def braze_message(body: str) -> str:
    """Braze's `message` (plus any `errors`) from a JSON body, else the body itself."""
    text = body.strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        message = str(data.get("message", "")).strip()
        errors = data.get("errors")
        if errors:
            message = f"{message} {json.dumps(errors, separators=(',', ':'))}".strip()
        text = message or text
    return scrub(" ".join(text.split()))[:MAX_DETAIL]


def classify(status: int | None, body: str = "", error: str | None = None) -> Classified:
    """Classify one exchange. `status` is None when no response arrived (`error` says why)."""
    if status is None:
        # A transport error's text is never trusted: bearer tokens and URL userinfo go.
        detail = scrub(" ".join((error or "no response").split()))[:MAX_DETAIL]
        return Classified(Outcome.RETRYABLE, detail)
    detail = braze_message(body) or f"HTTP {status}"
    if 200 <= status < 300:
        return Classified(Outcome.DELIVERED, detail)
    if status == 429:
        return Classified(Outcome.RATE_LIMITED, detail)
    if status in (401, 403, 404):
        return Classified(Outcome.CREDENTIALS, f"HTTP {status}: {detail}")
    if status == 408 or status >= 500:
        return Classified(Outcome.RETRYABLE, f"HTTP {status}: {detail}")
    if 400 <= status < 500:
        return Classified(Outcome.BAD_REQUEST, f"HTTP {status}: {detail}")
    # 1xx/3xx: not an answer Braze gives to this endpoint (a proxy, a wrong URL): retry.
    return Classified(Outcome.RETRYABLE, f"HTTP {status}: unexpected status")


@dataclass(frozen=True, slots=True)
class RateLimit:
    limit: int | None
    remaining: int | None
    reset_epoch: float | None


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_rate_limit(headers: Mapping[str, str]) -> RateLimit:
    """Read X-RateLimit-Limit/-Remaining/-Reset, whatever their case; absent -> None."""
    lowered = {name.lower(): value for name, value in headers.items()}
    limit = _number(lowered, "x-ratelimit-limit")
    remaining = _number(lowered, "x-ratelimit-remaining")
    return RateLimit(
        limit=int(limit) if limit is not None else None,
        remaining=int(remaining) if remaining is not None else None,
        reset_epoch=_number(lowered, "x-ratelimit-reset"),
    )


def backoff_seconds(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))].

    Full jitter spreads the retries of many batches that failed together (an outage) so
    they do not return as one wave (AWS Architecture Blog, "Exponential Backoff And Jitter").
    """
    exponent = min(max(attempt, 1) - 1, 62)
    ceiling = min(cap, base * 2.0**exponent)
    return (rng or random).uniform(0.0, ceiling)
