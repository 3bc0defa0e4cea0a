"""What a Braze answer means for a batch: pure functions, no I/O.

`classify` maps one exchange (status code and body, or a transport error) to what the
worker does next; `parse_rate_limit` reads Braze's X-RateLimit-* headers; `backoff_seconds`
is the retry schedule. All three are exhaustively unit-tested.

Answers are parsed defensively: they come from whatever answers at the endpoint (Braze, or
a proxy, a captive portal, a wrong host). `parse_answer` is the one JSON reader of an
answer body (size and nesting bounded); header numbers are bounded in `parse_rate_limit`.
Nothing here raises on any body or header value.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from core.redaction import confine, scrub

# Longest error text kept from a response body (it goes into logs and dead letters).
MAX_DETAIL = 300
# Braze's answers are a few hundred bytes: a body is read up to this (delivery's client
# stops there), and only a body within it is parsed as JSON.
MAX_ANSWER_BYTES = 256 * 1024
# Braze's answers nest 3 deep (an object, `errors`, an error object); deeper is not Braze.
MAX_ANSWER_DEPTH = 16
# What a 2xx of Braze's says in `message` when it accepted the request (SPEC).
ACCEPTED_MESSAGES = frozenset({"success", "queued"})
# Longest X-RateLimit-* header value read, and the largest number taken from one.
MAX_HEADER_CHARS = 32
MAX_HEADER_NUMBER = 1e12


class Outcome(StrEnum):
    DELIVERED = "delivered"  # 2xx: 201 success, 200 with non-fatal errors, 202 queued
    RATE_LIMITED = "rate_limited"  # 429: wait for the window's reset, then resend
    RETRYABLE = "retryable"  # 5xx, 408, timeouts, connection errors: back off, retry
    BAD_REQUEST = "bad_request"  # 400 and other 4xx: the content is at fault
    CREDENTIALS = "credentials"  # 401, 403, 404: the key is at fault, not the changes
    # A 2xx (or 1xx) that is not Braze's JSON answer: a proxy, a captive portal, a wrong
    # endpoint. Not a delivery: retried like a 5xx, dead-lettered after MAX_ATTEMPTS.
    UNEXPECTED = "unexpected"
    # 3xx: the endpoint is wrong (http:// redirected to https://, a moved host). Never
    # followed (the key would go to wherever it points); posting stops like for a refused key.
    REDIRECTED = "redirected"


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


def _depth_within(value: object, limit: int) -> bool:
    """True if `value` (parsed JSON) nests no deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return True


def parse_answer(body: str) -> object | None:
    """The JSON of an answer body, or None when it is not JSON within MAX_ANSWER_BYTES and
    MAX_ANSWER_DEPTH. Never raises: the standard library's C parser is bounded by the size
    first (a nesting deeper than the interpreter's recursion limit raises RecursionError,
    caught here), then the depth of what it built is checked without recursion. Why not a
    library: orjson and others bound depth only at a fixed 1024 and are one more native
    dependency; the size and depth caps are what matter here, and they are two lines."""
    if len(body) > MAX_ANSWER_BYTES:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if _depth_within(data, MAX_ANSWER_DEPTH) else None


def one_line(text: str, limit: int = MAX_DETAIL) -> str:
    """`text` as one short line without credentials: for details, logs and dead letters."""
    return scrub(" ".join(text[: limit * 4].split()))[:limit]


def braze_message(body: str) -> str:
    """Braze's `message` (plus any `errors`) from a JSON body, else the body itself."""
    data = parse_answer(body.strip())
    text = body
    if isinstance(data, dict):
        message = str(data.get("message", "")).strip()
        errors = data.get("errors")
        if errors:
            message = f"{message} {json.dumps(errors, separators=(',', ':'))}".strip()
        text = message or text
    return one_line(text)


def is_braze_acceptance(body: str) -> bool:
    """True if `body` is Braze's JSON answer accepting a request (`message` `success` or
    `queued`, SPEC); anything else in a 2xx came from something that is not Braze."""
    data = parse_answer(body)
    return isinstance(data, dict) and data.get("message") in ACCEPTED_MESSAGES


def unexpected_detail(status: int, body: str, content_type: str, truncated: bool) -> str:
    """What an answer that is not Braze's says about itself: its status, content type and
    first bytes (one line, credentials scrubbed, every email address and E.164 number
    masked: it may echo any request, a v2 pack's other batches too)."""
    kind = one_line(content_type, 60) or "no content type"
    size = "over the size cap, " if truncated else ""
    first = confine(one_line(body, 120), ()) or "empty body"
    return f"HTTP {status}: unexpected answer, not Braze's ({kind}, {size}first bytes: {first})"


def redirected(reason: str) -> bool:
    """True if a circuit's `reason` is a redirect (a configuration error), not a refused
    key: what `classify` says of a 3xx."""
    return reason.startswith("HTTP 3") and ": redirect to " in reason


def classify(
    status: int | None,
    body: str = "",
    error: str | None = None,
    *,
    content_type: str = "",
    truncated: bool = False,
    location: str = "",
) -> Classified:
    """Classify one exchange. `status` is None when no response arrived (`error` says why).
    `truncated`: the body was longer than the client reads (MAX_ANSWER_BYTES); `location`:
    a redirect's Location header."""
    if status is None:
        # A transport error's text is never trusted: bearer tokens and URL userinfo go.
        detail = one_line(error or "no response")
        return Classified(Outcome.RETRYABLE, detail)
    if 200 <= status < 300 or status < 200:
        # Only Braze's own JSON answer is a delivery: a proxy's or a captive portal's 200
        # page applied nothing.
        if 200 <= status < 300 and not truncated and is_braze_acceptance(body):
            return Classified(Outcome.DELIVERED, braze_message(body) or f"HTTP {status}")
        return Classified(
            Outcome.UNEXPECTED, unexpected_detail(status, body, content_type, truncated)
        )
    if 300 <= status < 400:
        target = one_line(location, 120) or "nowhere said"
        return Classified(Outcome.REDIRECTED, f"HTTP {status}: redirect to {target} not followed")
    detail = braze_message(body) or f"HTTP {status}"
    if status == 429:
        return Classified(Outcome.RATE_LIMITED, detail)
    if status in (401, 403, 404):
        return Classified(Outcome.CREDENTIALS, f"HTTP {status}: {detail}")
    if status == 408 or status >= 500:
        return Classified(Outcome.RETRYABLE, f"HTTP {status}: {detail}")
    return Classified(Outcome.BAD_REQUEST, f"HTTP {status}: {detail}")


@dataclass(frozen=True, slots=True)
class RateLimit:
    limit: int | None
    remaining: int | None
    reset_epoch: float | None


def _number(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None or len(raw) > MAX_HEADER_CHARS:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    # Bounded: `1e308` or a 400-digit value is not a count or a time of Braze's; taken as
    # absent, it cannot overflow the arithmetic done with it later.
    return value if math.isfinite(value) and 0 <= value <= MAX_HEADER_NUMBER else None


def parse_rate_limit(headers: Mapping[str, str]) -> RateLimit:
    """Read X-RateLimit-Limit/-Remaining/-Reset, whatever their case; absent, not a
    number, longer than MAX_HEADER_CHARS or above MAX_HEADER_NUMBER -> None."""
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
