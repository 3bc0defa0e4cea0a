"""The Prometheus exporter: `braze-subs metrics` serves `/metrics` on `METRICS_PORT`.

One process per deployment. Nothing is counted in its memory: every scrape reads Redis the
way `status` does (counters and the ends of sorted sets in pipelined round trips, never a
scan), so the figures are fleet-wide and survive a restart of the exporter. Counters are
monotonic totals kept in Redis by the workers and scripts (`stores/counters.py`).

Names follow Prometheus conventions: the `braze_subs_` prefix, `_total` for counters,
`_seconds` for durations and timestamps. Labels take a few fixed values each (endpoint,
HTTP status, a reason category); none holds an identifier, a group or a key.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from admin.status import Status, read_status
from stores import counters
from stores.api_metrics import ApiTotals, read_api_totals
from stores.fleet import WAIT_REASONS, WORKERS_READ
from stores.keys import Keys
from stores.limiter import RateLimiter

logger = logging.getLogger("braze_subs.exporter")

PREFIX = "braze_subs_"
# The values the `reason` labels may take (bounded: the free text stays in `status`).
PAUSE_REASONS = ("rate_limited", "credentials", "other")
CIRCUIT_REASONS = ("401", "403", "404", "other")
_HTTP_STATUS = re.compile(r"^HTTP (\d{3})\b")


def pause_reason_label(reason: str | None, circuit: str | None) -> str:
    """The category of a pause: a 429, the credentials circuit, or anything else."""
    if circuit:
        return "credentials"
    if reason and "429" in reason:
        return "rate_limited"
    return "other"


def circuit_reason_label(reason: str) -> str:
    """The HTTP status that opened the credentials circuit ("401", ...), else "other"."""
    found = _HTTP_STATUS.match(reason)
    code = found.group(1) if found else ""
    return code if code in CIRCUIT_REASONS else "other"


@dataclass(frozen=True, slots=True)
class Extras:
    """What the exporter reads beside `status`: totals by endpoint and status, the last tick,
    beat's last heartbeat."""

    requests: list[counters.RequestCount]
    last_tick_ms: float | None
    api: ApiTotals | None = None  # the HTTP API's requests (`stores/api_metrics.py`)
    beat_seen_ms: float | None = None


def read_extras(client: Redis, keys: Keys) -> Extras:
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.request_totals)
    pipe.get(keys.coalesce_last_tick)
    pipe.hgetall(keys.api_requests)
    pipe.get(keys.beat_seen)
    raw_requests, last_tick, raw_api, beat_seen = pipe.execute()
    return Extras(
        requests=counters.request_totals(raw_requests),
        last_tick_ms=float(last_tick) if last_tick else None,
        api=read_api_totals(raw_api),
        beat_seen_ms=float(beat_seen) if beat_seen else None,
    )


def api_families(api: ApiTotals) -> Iterator[Metric]:
    """The HTTP API's request metrics, summed over every API process (pure)."""
    requests = CounterMetricFamily(
        PREFIX + "api_requests",
        "Requests answered by the HTTP ingest API, by HTTP status.",
        labels=["code"],
    )
    for code, total in sorted(api.requests.items()):
        requests.add_metric([code], total)
    yield requests
    changes = CounterMetricFamily(
        PREFIX + "api_changes",
        "Changes the HTTP ingest API enqueued (stale: of those, dropped as older than a "
        "change already accepted).",
        labels=["outcome"],
    )
    for outcome in ("accepted", "stale"):
        changes.add_metric([outcome], api.changes.get(outcome, 0))
    yield changes
    duration = HistogramMetricFamily(
        PREFIX + "api_request_duration_seconds",
        "Time the HTTP ingest API took to answer a request.",
        buckets=api.buckets,
        sum_value=api.duration_sum,
    )
    yield duration


def _gauge(name: str, doc: str, value: float | None, unit: str = "") -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, doc, unit=unit)
    if value is not None:
        family.add_metric([], value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    # prometheus_client appends `_total` to counter samples; `name` is given without it.
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def families(status: Status, extras: Extras) -> Iterator[Metric]:
    """Every metric of one scrape, from one status read and the extras (pure)."""
    yield _gauge(
        "buffer_pending",
        "Distinct group + identifier pairs waiting, not yet in a batch.",
        status.pending,
    )
    yield _gauge("buffer_due", "Pending changes due now.", status.due_now)
    yield _gauge(
        "buffer_oldest_due_age",
        "How long the oldest due change has waited (0 when none is due).",
        status.oldest_due_age_seconds or 0.0,
        unit="seconds",
    )
    lane_pending = GaugeMetricFamily(
        PREFIX + "lane_pending",
        "Changes waiting to be cut per lane (live goes first; bulk: imports, repairs, "
        "replays), not those behind a batch in flight.",
        labels=["lane"],
    )
    lane_oldest = GaugeMetricFamily(
        PREFIX + "lane_oldest_due_age",
        "How long the lane's oldest due change has waited (0 when none is due).",
        labels=["lane"],
        unit="seconds",
    )
    for lane, figures in status.lanes.items():
        lane_pending.add_metric([lane], figures["pending"])
        lane_oldest.add_metric([lane], figures["oldest_seconds"])
    yield lane_pending
    yield lane_oldest
    yield _gauge(
        "in_flight_identifiers",
        "Identifiers in batches not yet acknowledged by Braze.",
        status.in_flight,
    )
    yield _gauge("in_flight_batches", "Batches cut and not yet finished.", status.batches_in_flight)
    waiting = GaugeMetricFamily(
        PREFIX + "waiting_batches",
        "Batches waiting in the schedule for their next try, by reason (every reason is "
        "always exported, so sum() is the total).",
        labels=["reason"],
    )
    for reason in WAIT_REASONS:
        waiting.add_metric([reason], status.waiting_by_reason.get(reason, 0))
    yield waiting
    next_due = status.waiting_next_due_seconds
    yield _gauge(
        "waiting_overdue",
        "How long the soonest due waiting batch has been overdue (0 when none is).",
        -next_due if next_due is not None and next_due < 0 else 0.0,
        unit="seconds",
    )
    yield _gauge(
        "batches_posting", "Batches a worker holds a claim on now.", status.batches_posting
    )
    yield _gauge(
        "workers_alive",
        f"Worker processes whose heartbeat is alive (counted up to {WORKERS_READ}).",
        status.workers_alive,
    )
    yield _gauge(
        "dead_letter_identifiers", "Identifiers in the dead-letter store.", status.dead_letter
    )
    yield _gauge(
        "dead_letter_entries", "Entries in the dead-letter store.", status.dead_letter_entries
    )
    yield _gauge(
        "budget_tokens",
        "Requests the shared rate budget would grant at once now.",
        status.tokens_left,
    )

    paused = GaugeMetricFamily(
        PREFIX + "posting_paused",
        "1 while every worker pauses posting, by reason (rate_limited: a 429; credentials: "
        "the key is refused).",
        labels=["reason"],
    )
    current = (
        pause_reason_label(status.pause_reason, status.credentials_refused)
        if status.paused or status.credentials_refused
        else None
    )
    for reason in PAUSE_REASONS:
        paused.add_metric([reason], 1.0 if reason == current else 0.0)
    yield paused
    yield _gauge(
        "posting_paused_until_timestamp",
        "When the current pause ends, Unix time (0 when not paused).",
        status.paused_until or 0.0,
        unit="seconds",
    )

    circuit = GaugeMetricFamily(
        PREFIX + "credentials_circuit_open",
        "1 while Braze refuses the API key and posting is stopped, by the HTTP status that "
        "opened the circuit; every reason is always exported, so max() is the state.",
        labels=["reason"],
    )
    refused = (
        circuit_reason_label(status.credentials_refused) if status.credentials_refused else None
    )
    for reason in CIRCUIT_REASONS:
        circuit.add_metric([reason], 1.0 if reason == refused else 0.0)
    yield circuit
    yield _gauge(
        "credentials_circuit_open_since_timestamp",
        "Since when the key is refused, Unix time (0 when not).",
        status.credentials_refused_since or 0.0,
        unit="seconds",
    )
    yield _gauge(
        "coalescer_last_tick_timestamp",
        "When the coalescer last finished a tick, Unix time (Redis clock); beat schedules "
        "the ticks, the workers run them, so it stops when either is missing.",
        extras.last_tick_ms / 1000 if extras.last_tick_ms else 0.0,
        unit="seconds",
    )
    yield _gauge(
        "beat_last_seen_timestamp",
        "Beat's last heartbeat in Redis (every HEARTBEAT_INTERVAL_SECONDS), Unix time "
        "(Redis clock); 0: never seen.",
        extras.beat_seen_ms / 1000 if extras.beat_seen_ms else 0.0,
        unit="seconds",
    )
    yield _gauge(
        "refused_groups",
        "Group + state + identifier kind combinations Braze refuses as a whole right now "
        "(their batches are dead-lettered unsent); `braze-subs status` names them.",
        len(status.refused_groups),
    )
    yield _gauge(
        "redis_unsafe_settings",
        "Redis settings that can lose changes (eviction, no persistence); -1 when unknown.",
        len(status.redis_findings) if status.redis_findings is not None else -1,
    )

    requests = CounterMetricFamily(
        PREFIX + "braze_requests",
        'Requests sent to Braze, by endpoint and HTTP status (code "none": no answer).',
        labels=["endpoint", "code"],
    )
    throttled = 0
    for found in extras.requests:
        requests.add_metric([found.endpoint, found.status], found.total)
        if found.status == "429":
            throttled += found.total
    yield requests
    yield _counter("braze_throttled", "429 answers from Braze.", throttled)
    yield _counter("changes_enqueued", "Changes enqueued by producers.", status.enqueued_total)
    yield _counter("batches_cut", "Batches cut by the coalescer.", status.batches_total)
    yield _counter(
        "identifiers_delivered", "Identifiers Braze acknowledged.", status.delivered_total
    )
    yield _counter(
        "identifiers_dead_lettered",
        "Identifiers moved to the dead-letter store.",
        status.dead_lettered_total,
    )
    yield _counter(
        "dead_letters_expired",
        "Dead-letter entries removed after their retention.",
        status.dead_letters_expired,
    )
    yield _counter(
        "delivery_errors",
        "Errors Braze listed in its 2xx answers (their identifiers are dead-lettered).",
        status.delivery_errors_total,
    )
    yield _counter(
        "stale_dropped",
        "Changes dropped at enqueue because one that occurred later was already accepted "
        "for the same group and identifier (occurred_at).",
        status.stale,
    )
    yield _counter(
        "opt_out_skipped",
        "Identifiers left out of a subscribe because they opted out in Braze (respect_opt_out).",
        status.opt_out_skipped,
    )
    yield _counter(
        "batch_splits",
        "Batches split to isolate identifiers Braze refused (400).",
        status.splits_total,
    )
    if extras.api is not None:
        yield from api_families(extras.api)


class RedisCollector(Collector):
    """Reads Redis on every scrape. When Redis cannot be read, only `braze_subs_redis_up 0`
    is exported (and the scrape still succeeds), so an alert can tell the two apart."""

    def __init__(self, client: Redis, keys: Keys, limiter: RateLimiter | None) -> None:
        self.client = client
        self.keys = keys
        self.limiter = limiter

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            status = read_status(self.client, self.keys, self.limiter)
            extras = read_extras(self.client, self.keys)
        except RedisError as exc:
            logger.warning("cannot read Redis: %s", exc.__class__.__name__)
            yield _gauge("redis_up", "1 when the last scrape could read Redis.", 0)
            return
        yield _gauge("redis_up", "1 when the last scrape could read Redis.", 1)
        yield from families(status, extras)
        yield _gauge(
            "scrape_read",
            "Time this scrape spent reading Redis.",
            time.perf_counter() - started,
            unit="seconds",
        )


def registry_for(client: Redis, keys: Keys, limiter: RateLimiter | None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(client, keys, limiter))
    return registry


def serve(port: int, host: str, client: Redis, keys: Keys, limiter: RateLimiter | None) -> None:
    """Serve `/metrics` until SIGTERM or SIGINT."""
    server, thread = start_http_server(
        port, addr=host, registry=registry_for(client, keys, limiter)
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
