"""The Prometheus exporter: `braze-subs metrics` serves `/metrics` on `METRICS_PORT`.

One process per deployment. Nothing is counted in its memory: every scrape reads Redis the
way `status` does (counters and the ends of sorted sets in pipelined round trips, never a
scan), so the figures are fleet-wide and survive a restart of the exporter. Counters are
monotonic totals kept in Redis by the workers and scripts (`stores/counters.py`).

Names follow Prometheus conventions: the `braze_subs_` prefix, `_total` for counters,
`_seconds` for durations and timestamps. Labels take a few fixed values each (endpoint,
HTTP status, a reason category, the workspace's name); none holds an identifier, a group or
a key. Every series of a workspace's pipeline carries `workspace` (its name in
BRAZE_WORKSPACES_FILE, `default` without one); the deployment's own (beat, Redis, the HTTP
API, the scrape) carry none.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

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

from admin.status import Status, Target, read_status
from core.routing import DEFAULT_WORKSPACE
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


def read_extras(client: Redis, keys: Keys, *, deployment: bool = True) -> Extras:
    """A workspace's request totals and last tick; with `deployment` (one workspace, whose
    keys are the default tag's) the HTTP API's totals and beat's heartbeat too."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.request_totals)
    pipe.get(keys.coalesce_last_tick)
    raw_requests, last_tick = pipe.execute()
    shared = read_deployment_extras(client, keys) if deployment else Extras([], None)
    return replace(
        shared,
        requests=counters.request_totals(raw_requests),
        last_tick_ms=float(last_tick) if last_tick else None,
    )


def read_deployment_extras(client: Redis, keys: Keys) -> Extras:
    """What belongs to no workspace: the HTTP API's totals, beat's heartbeat (`keys`: the
    default tag's, `Keys(prefix)`)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.api_requests)
    pipe.get(keys.beat_seen)
    raw_api, beat_seen = pipe.execute()
    return Extras(
        requests=[],
        last_tick_ms=None,
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
    """A deployment-wide gauge (no `workspace` label)."""
    family = GaugeMetricFamily(PREFIX + name, doc, unit=unit)
    if value is not None:
        family.add_metric([], value)
    return family


class _Families:
    """The per-workspace families of one scrape: each metric once, with a sample per
    workspace (label `workspace` first), in the order first added."""

    def __init__(self) -> None:
        self.found: dict[str, Metric] = {}

    def gauge(
        self,
        name: str,
        doc: str,
        workspace: str,
        value: float | None,
        *,
        unit: str = "",
        labels: tuple[str, ...] = (),
        values: tuple[str, ...] = (),
    ) -> None:
        family = self.found.get(name)
        if family is None:
            family = self.found[name] = GaugeMetricFamily(
                PREFIX + name, doc, labels=["workspace", *labels], unit=unit
            )
        if value is not None:
            family.add_metric([workspace, *values], value)

    def counter(
        self,
        name: str,
        doc: str,
        workspace: str,
        value: float,
        *,
        labels: tuple[str, ...] = (),
        values: tuple[str, ...] = (),
    ) -> None:
        # prometheus_client appends `_total` to counter samples; `name` is given without it.
        family = self.found.get(name)
        if family is None:
            family = self.found[name] = CounterMetricFamily(
                PREFIX + name, doc, labels=["workspace", *labels]
            )
        family.add_metric([workspace, *values], value)


def families(
    status: Status, extras: Extras, workspace: str = DEFAULT_WORKSPACE
) -> Iterator[Metric]:
    """Every metric of one scrape of a deployment of one workspace (pure)."""
    return scrape_families({workspace: (status, extras)}, extras, status.redis_findings)


def scrape_families(
    per: Mapping[str, tuple[Status, Extras]],
    deployment: Extras,
    redis_findings: list[str] | None,
) -> Iterator[Metric]:
    """Every metric of one scrape (pure): each workspace's from its status read and extras,
    labelled `workspace`; the deployment's (beat, Redis, the HTTP API) from `deployment`."""
    found = _Families()
    for workspace, (status, extras) in per.items():
        _workspace_families(found, workspace, status, extras)
    yield from found.found.values()
    yield _gauge(
        "beat_last_seen_timestamp",
        "Beat's last heartbeat in Redis (every HEARTBEAT_INTERVAL_SECONDS), Unix time "
        "(Redis clock); 0: never seen.",
        deployment.beat_seen_ms / 1000 if deployment.beat_seen_ms else 0.0,
        unit="seconds",
    )
    yield _gauge(
        "redis_unsafe_settings",
        "Redis settings that can lose changes (eviction, no persistence); -1 when unknown.",
        len(redis_findings) if redis_findings is not None else -1,
    )
    if deployment.api is not None:
        yield from api_families(deployment.api)


def _workspace_families(found: _Families, ws: str, status: Status, extras: Extras) -> None:
    gauge, counter = found.gauge, found.counter
    gauge(
        "buffer_pending",
        "Distinct group + identifier pairs waiting, not yet in a batch.",
        ws,
        status.pending,
    )
    gauge("buffer_due", "Pending changes due now.", ws, status.due_now)
    gauge(
        "buffer_oldest_due_age",
        "How long the oldest due change has waited (0 when none is due).",
        ws,
        status.oldest_due_age_seconds or 0.0,
        unit="seconds",
    )
    for lane, figures in status.lanes.items():
        gauge(
            "lane_pending",
            "Changes waiting to be cut per lane (live goes first; bulk: imports, repairs, "
            "replays), not those behind a batch in flight.",
            ws,
            figures["pending"],
            labels=("lane",),
            values=(lane,),
        )
    for lane, figures in status.lanes.items():
        gauge(
            "lane_oldest_due_age",
            "How long the lane's oldest due change has waited (0 when none is due).",
            ws,
            figures["oldest_seconds"],
            unit="seconds",
            labels=("lane",),
            values=(lane,),
        )
    gauge(
        "in_flight_identifiers",
        "Identifiers in batches not yet acknowledged by Braze.",
        ws,
        status.in_flight,
    )
    gauge("in_flight_batches", "Batches cut and not yet finished.", ws, status.batches_in_flight)
    for reason in WAIT_REASONS:
        gauge(
            "waiting_batches",
            "Batches waiting in the schedule for their next try, by reason (every reason is "
            "always exported, so sum() is the total).",
            ws,
            status.waiting_by_reason.get(reason, 0),
            labels=("reason",),
            values=(reason,),
        )
    next_due = status.waiting_next_due_seconds
    gauge(
        "waiting_overdue",
        "How long the soonest due waiting batch has been overdue (0 when none is).",
        ws,
        -next_due if next_due is not None and next_due < 0 else 0.0,
        unit="seconds",
    )
    gauge("batches_posting", "Batches a worker holds a claim on now.", ws, status.batches_posting)
    gauge(
        "workers_alive",
        f"Worker processes whose heartbeat is alive (counted up to {WORKERS_READ}).",
        ws,
        status.workers_alive,
    )
    gauge(
        "dead_letter_identifiers", "Identifiers in the dead-letter store.", ws, status.dead_letter
    )
    gauge(
        "dead_letter_entries", "Entries in the dead-letter store.", ws, status.dead_letter_entries
    )
    gauge(
        "budget_tokens",
        "Requests the workspace's shared rate budget would grant at once now.",
        ws,
        status.tokens_left,
    )
    current = (
        pause_reason_label(status.pause_reason, status.credentials_refused)
        if status.paused or status.credentials_refused
        else None
    )
    for reason in PAUSE_REASONS:
        gauge(
            "posting_paused",
            "1 while every worker pauses posting, by reason (rate_limited: a 429; "
            "credentials: the key is refused).",
            ws,
            1.0 if reason == current else 0.0,
            labels=("reason",),
            values=(reason,),
        )
    gauge(
        "posting_paused_until_timestamp",
        "When the current pause ends, Unix time (0 when not paused).",
        ws,
        status.paused_until or 0.0,
        unit="seconds",
    )
    refused = (
        circuit_reason_label(status.credentials_refused) if status.credentials_refused else None
    )
    for reason in CIRCUIT_REASONS:
        gauge(
            "credentials_circuit_open",
            "1 while Braze refuses the API key and posting is stopped, by the HTTP status "
            "that opened the circuit; every reason is always exported, so max() is the state.",
            ws,
            1.0 if reason == refused else 0.0,
            labels=("reason",),
            values=(reason,),
        )
    gauge(
        "credentials_circuit_open_since_timestamp",
        "Since when the key is refused, Unix time (0 when not).",
        ws,
        status.credentials_refused_since or 0.0,
        unit="seconds",
    )
    gauge(
        "coalescer_last_tick_timestamp",
        "When the coalescer last finished a tick, Unix time (Redis clock); beat schedules "
        "the ticks, the workers run them, so it stops when either is missing.",
        ws,
        extras.last_tick_ms / 1000 if extras.last_tick_ms else 0.0,
        unit="seconds",
    )
    gauge(
        "refused_groups",
        "Group + state + identifier kind combinations Braze refuses as a whole right now "
        "(their batches are dead-lettered unsent); `braze-subs status` names them.",
        ws,
        len(status.refused_groups),
    )
    throttled = 0
    for request in extras.requests:
        counter(
            "braze_requests",
            'Requests sent to Braze, by endpoint and HTTP status (code "none": no answer).',
            ws,
            request.total,
            labels=("endpoint", "code"),
            values=(request.endpoint, request.status),
        )
        if request.status == "429":
            throttled += request.total
    if not extras.requests:  # the family is there (empty) before the first request
        found.found.setdefault(
            "braze_requests",
            CounterMetricFamily(
                PREFIX + "braze_requests",
                'Requests sent to Braze, by endpoint and HTTP status (code "none": no answer).',
                labels=["workspace", "endpoint", "code"],
            ),
        )
    counter("braze_throttled", "429 answers from Braze.", ws, throttled)
    counter("changes_enqueued", "Changes enqueued by producers.", ws, status.enqueued_total)
    counter("batches_cut", "Batches cut by the coalescer.", ws, status.batches_total)
    counter("identifiers_delivered", "Identifiers Braze acknowledged.", ws, status.delivered_total)
    counter(
        "identifiers_dead_lettered",
        "Identifiers moved to the dead-letter store.",
        ws,
        status.dead_lettered_total,
    )
    counter(
        "dead_letters_expired",
        "Dead-letter entries removed after their retention.",
        ws,
        status.dead_letters_expired,
    )
    counter(
        "delivery_errors",
        "Errors Braze listed in its 2xx answers (their identifiers are dead-lettered).",
        ws,
        status.delivery_errors_total,
    )
    counter(
        "stale_dropped",
        "Changes dropped at enqueue because one that occurred later was already accepted "
        "for the same group and identifier (occurred_at).",
        ws,
        status.stale,
    )
    counter(
        "opt_out_skipped",
        "Identifiers left out of a subscribe because they opted out in Braze (respect_opt_out).",
        ws,
        status.opt_out_skipped,
    )
    counter(
        "batch_splits",
        "Batches split to isolate identifiers Braze refused (400).",
        ws,
        status.splits_total,
    )


class RedisCollector(Collector):
    """Reads Redis on every scrape: each workspace's status and extras (`targets`), and the
    deployment's (`deployment`: the default tag's keys). When Redis cannot be read, only
    `braze_subs_redis_up 0` is exported (and the scrape still succeeds), so an alert can
    tell the two apart."""

    def __init__(self, client: Redis, deployment: Keys, targets: Sequence[Target]) -> None:
        self.client = client
        self.deployment = deployment
        self.targets = list(targets)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            per = {
                target.name: (
                    read_status(self.client, target.keys, target.limiter),
                    read_extras(self.client, target.keys, deployment=False),
                )
                for target in self.targets
            }
            shared = read_deployment_extras(self.client, self.deployment)
        except RedisError as exc:
            logger.warning("cannot read Redis: %s", exc.__class__.__name__)
            yield _gauge("redis_up", "1 when the last scrape could read Redis.", 0)
            return
        yield _gauge("redis_up", "1 when the last scrape could read Redis.", 1)
        findings = next(iter(per.values()))[0].redis_findings if per else None
        yield from scrape_families(per, shared, findings)
        yield _gauge(
            "scrape_read",
            "Time this scrape spent reading Redis.",
            time.perf_counter() - started,
            unit="seconds",
        )


def registry_for(
    client: Redis,
    keys: Keys,
    limiter: RateLimiter | None,
    *,
    targets: Sequence[Target] | None = None,
) -> CollectorRegistry:
    """The exporter's registry. `targets`: the workspaces (each its keys and budget), `keys`
    then the deployment's (the default tag); without them one workspace, `default`, whose
    keys and budget are `keys` and `limiter`."""
    registry = CollectorRegistry(auto_describe=False)
    chosen = targets if targets is not None else [Target(DEFAULT_WORKSPACE, keys, limiter)]
    registry.register(RedisCollector(client, keys, chosen))
    return registry


def serve(port: int, host: str, registry: CollectorRegistry) -> None:
    """Serve `/metrics` until SIGTERM or SIGINT."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
