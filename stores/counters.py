"""Counters of what was sent to Braze, fleet-wide, in Redis.

- Per second: one small hash per second (`requests`, `identifiers`, `throttled`) that
  expires by itself: `status` reads the last minute with one pipelined round trip and never
  scans a large key.
- Since start: monotonic totals for the Prometheus exporter, which is one process per
  deployment and so cannot count in its own memory: requests by endpoint and HTTP status
  (a hash of a few fields), and named events (splits, ...) in the `stats` hash that the
  Lua scripts also count in (enqueued, batches, delivered, dead_lettered).
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from stores.keys import Keys
from stores.scripts import Scripts, encoded

# Seconds a per-second hash is kept: the last minute, with room for a slow reader.
RETENTION_SECONDS = 180


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int = 0
    identifiers: int = 0
    throttled: int = 0  # 429 answers

    @property
    def identifiers_per_request(self) -> float | None:
        return round(self.identifiers / self.requests, 1) if self.requests else None


# The HTTP status of a request that got no answer (timeout, connection error).
NO_ANSWER = "none"


def record_request(client: Redis, keys: Keys, endpoint: str, status: int | None) -> None:
    """Count one request in the totals by endpoint and HTTP status only (the reads, which
    spend their own budget and so stay out of the per-second counters of posts)."""
    client.hincrby(keys.request_totals, f"{endpoint} {status or NO_ANSWER}", 1)


def count(client: Redis, keys: Keys, event: str, amount: int = 1) -> None:
    """Add to a named total since start (e.g. "splits")."""
    client.hincrby(keys.stats, event, amount)


@dataclass(frozen=True, slots=True)
class RequestCount:
    endpoint: str
    status: str  # "201", "429", ... or NO_ANSWER
    total: int


def request_totals(raw: dict[bytes, bytes]) -> list[RequestCount]:
    """Parse the reply of HGETALL request_totals (read in the caller's pipeline)."""
    found = []
    for field, value in raw.items():
        endpoint, _, status = field.decode().rpartition(" ")
        found.append(RequestCount(endpoint, status, int(value)))
    return sorted(found, key=lambda c: (c.endpoint, c.status))


def last_minute(client: Redis, keys: Keys, now_ms: float) -> Totals:
    return recent(client, keys, now_ms, 60)


def recent(client: Redis, keys: Keys, now_ms: float, seconds: int) -> Totals:
    """Totals of the current second and the `seconds - 1` before it (one round trip)."""
    second = int(now_ms // 1000)
    pipe = client.pipeline(transaction=False)
    for past in range(seconds):
        pipe.hmget(keys.metrics(second - past), "requests", "identifiers", "throttled")
    requests = identifiers = throttled = 0
    for reply in pipe.execute():
        requests += int(reply[0] or 0)
        identifiers += int(reply[1] or 0)
        throttled += int(reply[2] or 0)
    return Totals(requests, identifiers, throttled)


# Arrival samples: one at most every SAMPLE_SPACING_MS, SAMPLES_KEPT kept (~6 s).
SAMPLE_SPACING_MS = 500
SAMPLES_KEPT = 12


def arrival_rate(client: Redis, keys: Keys, now_ms: float, window_ms: float) -> float:
    """Changes enqueued per second over about the last `window_ms`, fleet-wide, from the
    buffer's monotonic `enqueued` counter; records a sample when the newest is old enough.
    Two round trips; 0.0 until there are two samples."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.stats, "enqueued")
    pipe.lrange(keys.arrival_samples, 0, SAMPLES_KEPT - 1)
    raw_total, raw_samples = pipe.execute()
    total = int(raw_total or 0)
    samples = [tuple(map(float, item.split())) for item in raw_samples]
    if not samples or now_ms - samples[0][0] >= SAMPLE_SPACING_MS:
        pipe = client.pipeline(transaction=False)
        pipe.lpush(keys.arrival_samples, f"{now_ms:.0f} {total}")
        pipe.ltrim(keys.arrival_samples, 0, SAMPLES_KEPT - 1)
        pipe.execute()
    within = [(ms, count) for ms, count in samples if now_ms - ms <= window_ms]
    if not within:
        return 0.0
    oldest_ms, oldest_total = within[-1]
    elapsed = max(now_ms - oldest_ms, SAMPLE_SPACING_MS)
    return max(0.0, (total - oldest_total) * 1000 / elapsed)


@dataclass(frozen=True, slots=True)
class Tally:
    """One post's request as the counters count it (`Counters.tally`): by count_request.lua,
    or by the finish that records its outcome (finish_batch.lua KEYS[14], ARGV[13..16]:
    `finish_args`; issue 26, one call a post). Both count with `count_post` (_prelude.lua)."""

    totals_key: bytes  # KEYS: the totals by endpoint and HTTP status
    metrics_prefix: bytes  # the per-second hashes' name without the second
    identifiers: int
    throttled: bool  # a 429 (never a finish's: a 429 is deferred)
    field: str  # "<endpoint> <status>" in the totals; "" counts per second only

    def finish_args(self) -> list[str | int | bytes]:
        """finish_batch.lua's ARGV[13..16]."""
        return [self.metrics_prefix, self.identifiers, self.field, _RETENTION]


# finish_batch.lua's ARGV[13..16] when the finish counts no request.
NO_TALLY_ARGS: list[str | int | bytes] = [b"", b"", b"", b""]
_RETENTION = str(RETENTION_SECONDS).encode()


class Counters:
    """The counters one poster writes, bound to its Redis (so the poster need not reach
    into another store's client)."""

    def __init__(self, client: Redis, keys: Keys, scripts: Scripts | None = None) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts or Scripts(client)
        # The same for every post of the process: built and encoded once (issue 26).
        self._metrics_prefix, self._totals_key = encoded(
            [keys.metrics(0).removesuffix("0"), keys.request_totals]
        )

    def tally(
        self, *, identifiers: int, throttled: bool, endpoint: str, status: int | None
    ) -> Tally:
        """One post's request, to count (`request`, or the finish told it)."""
        return Tally(
            self._totals_key,
            self._metrics_prefix,
            identifiers,
            throttled,
            f"{endpoint} {status or NO_ANSWER}" if endpoint else "",
        )

    def request(
        self, *, identifiers: int, throttled: bool, endpoint: str, status: int | None
    ) -> None:
        """One post answered (or not): per second, and in the totals by endpoint and HTTP
        status. The second is Redis's, so every worker counts on one clock: read inside
        count_request.lua, one round trip a post (a TIME and then a pipeline before)."""
        self.count(
            self.tally(
                identifiers=identifiers, throttled=throttled, endpoint=endpoint, status=status
            )
        )

    def count(self, tally: Tally) -> None:
        """Count a request no finish counted (count_request.lua)."""
        self.scripts.count_request(
            keys=[tally.totals_key],
            args=[
                tally.metrics_prefix,
                tally.identifiers,
                1 if tally.throttled else 0,
                tally.field,
                _RETENTION,
            ],
        )

    def add(self, event: str, amount: int = 1) -> None:
        """Add to a named total since start (e.g. "splits")."""
        count(self.client, self.keys, event, amount)

    def delivery_errors(self, errors: int) -> None:
        """A 2xx answer that carried `errors` entries."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(self.keys.stats, "delivery_errors", errors)
        pipe.hincrby(self.keys.stats, "delivered_with_errors", 1)
        pipe.execute()
