"""Per-second counters of what was sent to Braze, kept for a few minutes, summed on demand.

One small hash per second (`requests`, `identifiers`, `throttled`) that expires by itself:
`status` reads the last minute with one pipelined round trip and never scans a large key.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from stores.keys import Keys

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


def record(client: Redis, keys: Keys, now_ms: float, *, identifiers: int, throttled: bool) -> None:
    """Count one request (and its identifiers, unless Braze throttled it)."""
    key = keys.metrics(int(now_ms // 1000))
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(key, "requests", 1)
    if throttled:
        pipe.hincrby(key, "throttled", 1)
    else:
        pipe.hincrby(key, "identifiers", identifiers)
    pipe.expire(key, RETENTION_SECONDS)
    pipe.execute()


def last_minute(client: Redis, keys: Keys, now_ms: float) -> Totals:
    second = int(now_ms // 1000)
    pipe = client.pipeline(transaction=False)
    for past in range(60):
        pipe.hmget(keys.metrics(second - past), "requests", "identifiers", "throttled")
    requests = identifiers = throttled = 0
    for reply in pipe.execute():
        requests += int(reply[0] or 0)
        identifiers += int(reply[1] or 0)
        throttled += int(reply[2] or 0)
    return Totals(requests, identifiers, throttled)
