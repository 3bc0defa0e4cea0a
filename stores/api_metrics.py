"""The HTTP API's request metrics, counted in each API process and added to Redis.

The exporter is one process per deployment and the API runs as many (replicas, uvicorn
workers), so the totals live in Redis like the workers' (`stores/counters.py`). Counting
a request costs no round trip: each process adds to its own tally in memory and `flush`
adds the tally to one hash in one pipelined round trip (the API flushes every second and
at shutdown; a killed process loses at most that second's counts). Requests by HTTP
status, changes accepted and stale, and the duration as a Prometheus histogram (counts
per bucket, and the sum).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from stores.keys import Keys

# Upper bounds (seconds) of the duration buckets: a one-change request takes ~1 ms, a
# thousand-change one tens of ms; seconds mean Redis is slow or refusing.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INF = "+Inf"


def _bucket_label(bound: float) -> str:
    return repr(bound)


@dataclass(frozen=True, slots=True)
class ApiTotals:
    """What the exporter reads back: totals since start, fleet-wide."""

    requests: dict[str, int]  # HTTP status ("202", "401", ...) -> requests
    changes: dict[str, int]  # "accepted" / "stale" -> changes
    buckets: list[tuple[str, int]]  # cumulative, upper bound label -> requests, "+Inf" last
    duration_sum: float


class ApiMetrics:
    """One API process's tally since its last flush (threads share it)."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._lock = threading.Lock()
        self._tally: Counter[str] = Counter()
        self._duration_sum = 0.0

    def observe(self, status: int, seconds: float, accepted: int = 0, stale: int = 0) -> None:
        index = bisect_left(DURATION_BUCKETS, seconds)
        bucket = _bucket_label(DURATION_BUCKETS[index]) if index < len(DURATION_BUCKETS) else INF
        with self._lock:
            tally = self._tally
            tally[f"status {status}"] += 1
            tally[f"duration {bucket}"] += 1
            if accepted:
                tally["changes accepted"] += accepted
            if stale:
                tally["changes stale"] += stale
            self._duration_sum += seconds

    def flush(self) -> bool:
        """Add the tally to Redis; on a Redis error keep it for the next flush."""
        with self._lock:
            tally, self._tally = self._tally, Counter()
            duration_sum, self._duration_sum = self._duration_sum, 0.0
        if not tally:
            return True
        pipe = self.client.pipeline(transaction=False)
        for field, amount in tally.items():
            pipe.hincrby(self.keys.api_requests, field, amount)
        pipe.hincrbyfloat(self.keys.api_requests, "duration sum", duration_sum)
        try:
            pipe.execute()
        except RedisError:
            # Not sent, or sent in part (a connection lost mid-pipeline): keep it whole.
            # Counting a second twice beats losing a minute of a Redis outage.
            with self._lock:
                self._tally.update(tally)
                self._duration_sum += duration_sum
            return False
        return True


def read_api_totals(raw: dict[bytes, bytes]) -> ApiTotals:
    """The totals in the `api_requests` hash (`HGETALL`), for the exporter."""
    requests: dict[str, int] = {}
    changes: dict[str, int] = {"accepted": 0, "stale": 0}
    per_bucket: dict[str, int] = {}
    duration_sum = 0.0
    for raw_field, raw_value in raw.items():
        kind, _, name = raw_field.decode().partition(" ")
        if kind == "status":
            requests[name] = int(raw_value)
        elif kind == "changes":
            changes[name] = int(raw_value)
        elif kind == "duration" and name == "sum":
            duration_sum = float(raw_value)
        elif kind == "duration":
            per_bucket[name] = int(raw_value)
    buckets: list[tuple[str, int]] = []
    running = 0
    for label in [*map(_bucket_label, DURATION_BUCKETS), INF]:
        running += per_bucket.get(label, 0)
        buckets.append((label, running))
    return ApiTotals(requests, changes, buckets, duration_sum)
