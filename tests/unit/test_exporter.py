"""The exporter's metrics from a status read (pure): names, types, bounded labels."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest

from admin.exporter import (
    Extras,
    circuit_reason_label,
    families,
    pause_reason_label,
    scrape_families,
)
from admin.status import Status
from stores.counters import RequestCount
from tests.metrics_scrape import parse_exposition

IDLE = Status(
    pending=0,
    due_now=0,
    due_later=0,
    oldest_due_age_seconds=None,
    in_flight=0,
    batches_in_flight=0,
    dead_letter=0,
    dead_letter_entries=0,
    enqueued_total=0,
    batches_total=0,
    delivered_total=0,
    dead_lettered_total=0,
    dead_letters_expired=0,
    tokens_left=50,
    redis_findings=[],
)


# Series that belong to the deployment, not to a workspace: no `workspace` label.
DEPLOYMENT_SERIES = {
    "braze_subs_beat_last_seen_timestamp_seconds",
    "braze_subs_redis_unsafe_settings",
}


def scrape(status: Status, extras: Extras) -> dict[str, dict[tuple, float]]:
    """The exposition text of a deployment of one workspace as Prometheus would parse it:
    name -> {labels: value}, the `workspace` label (always "default" here: checked) left
    out."""
    found: dict[str, dict[tuple, float]] = {}
    for name, samples in parse(lambda: families(status, extras)).items():
        for labels, value in samples.items():
            named = dict(labels)
            if name in DEPLOYMENT_SERIES or name.startswith("braze_subs_api_"):
                assert "workspace" not in named, (name, labels)
            else:
                assert named.pop("workspace") == "default", (name, labels)
            found.setdefault(name, {})[tuple(sorted(named.items()))] = value
    return found


def parse(collect) -> dict[str, dict[tuple, float]]:
    """What `collect()` exposes, as Prometheus would parse it: name -> {labels: value}."""

    class Fixed:
        def collect(self):
            return collect()

    registry = CollectorRegistry()
    registry.register(Fixed())
    return parse_exposition(generate_latest(registry).decode())


def test_a_paused_budget_after_a_429_and_the_request_totals():
    status = replace(
        IDLE,
        pending=120,
        due_now=100,
        oldest_due_age_seconds=4.5,
        paused=True,
        paused_until=1_800_000_000.0,
        pause_reason="429 from Braze",
        tokens_left=0,
        splits_total=3,
    )
    extras = Extras(
        [
            RequestCount("/subscription/status/set", "201", 40),
            RequestCount("/subscription/status/set", "429", 2),
            RequestCount("/v2/subscription/status/set", "none", 1),
        ],
        last_tick_ms=1_799_999_999_500.0,
    )
    found = scrape(status, extras)
    assert found["braze_subs_buffer_pending"] == {(): 120}
    assert found["braze_subs_buffer_due"] == {(): 100}
    assert found["braze_subs_buffer_oldest_due_age_seconds"] == {(): 4.5}
    assert found["braze_subs_posting_paused"] == {
        (("reason", "rate_limited"),): 1,
        (("reason", "credentials"),): 0,
        (("reason", "other"),): 0,
    }
    assert set(found["braze_subs_credentials_circuit_open"].values()) == {0}
    assert found["braze_subs_braze_requests_total"] == {
        (("code", "201"), ("endpoint", "/subscription/status/set")): 40,
        (("code", "429"), ("endpoint", "/subscription/status/set")): 2,
        (("code", "none"), ("endpoint", "/v2/subscription/status/set")): 1,
    }
    assert found["braze_subs_braze_throttled_total"] == {(): 2}
    assert found["braze_subs_batch_splits_total"] == {(): 3}
    assert found["braze_subs_opt_out_skipped_total"] == {(): 0}
    assert found["braze_subs_stale_dropped_total"] == {(): 0}
    assert found["braze_subs_coalescer_last_tick_timestamp_seconds"] == {(): 1_799_999_999.5}


def test_a_refused_key_opens_the_circuit_with_its_status_only():
    status = replace(
        IDLE,
        paused=True,
        pause_reason="HTTP 401: Invalid API key: abc123",
        credentials_refused="HTTP 401: Invalid API key: abc123",
        credentials_refused_since=1_800_000_000.0,
    )
    found = scrape(status, Extras([], None))
    assert found["braze_subs_credentials_circuit_open"] == {
        (("reason", "401"),): 1,
        (("reason", "403"),): 0,
        (("reason", "404"),): 0,
        (("reason", "other"),): 0,
    }
    assert found["braze_subs_posting_paused"][(("reason", "credentials"),)] == 1
    # Braze's free text (which might echo anything) never becomes a label value.
    text = repr(found)
    assert "abc123" not in text and "Invalid" not in text


def test_reason_labels_are_a_fixed_set():
    assert circuit_reason_label("HTTP 403: forbidden") == "403"
    assert circuit_reason_label("HTTP 418: teapot") == "other"
    assert circuit_reason_label("no response") == "other"
    assert pause_reason_label("429 from Braze", None) == "rate_limited"
    assert pause_reason_label("HTTP 401: x", "HTTP 401: x") == "credentials"
    assert pause_reason_label("anything else", None) == "other"


def test_names_follow_the_conventions():
    found = scrape(IDLE, Extras([RequestCount("/subscription/status/set", "201", 1)], None))
    for name in found:
        assert name.startswith("braze_subs_"), name
    counters = [name for name in found if name.endswith("_total")]
    assert len(counters) >= 8
    assert found["braze_subs_buffer_oldest_due_age_seconds"] == {(): 0}


def test_the_schedule_by_reason_posting_and_workers_alive():
    found = scrape(IDLE, Extras([], None))
    reasons = {
        dict(labels)["reason"]: value
        for labels, value in found["braze_subs_waiting_batches"].items()
    }
    # every reason is exported, zero-filled, so sum() is the total and a rate has a series
    assert reasons == dict.fromkeys(
        ("ready", "retry", "paused", "credentials", "budget", "held", "recovered", "handed_back"),
        0,
    )
    assert found["braze_subs_waiting_overdue_seconds"] == {(): 0}
    assert found["braze_subs_batches_posting"] == {(): 0}
    assert found["braze_subs_workers_alive"] == {(): 0}

    busy = replace(
        IDLE,
        waiting_batches=7,
        waiting_by_reason={**IDLE.waiting_by_reason, "retry": 5, "credentials": 2},
        waiting_next_due_seconds=-12.5,
        batches_posting=40,
        workers_alive=3,
        workers_alive_ids=["host-a:12:x1", "host-b:7:y2", "host-c:9:z3"],
    )
    found = scrape(busy, Extras([], None))
    assert found["braze_subs_waiting_batches"][(("reason", "retry"),)] == 5
    assert found["braze_subs_waiting_batches"][(("reason", "credentials"),)] == 2
    assert sum(found["braze_subs_waiting_batches"].values()) == 7
    assert found["braze_subs_waiting_overdue_seconds"] == {(): 12.5}
    assert found["braze_subs_batches_posting"] == {(): 40}
    assert found["braze_subs_workers_alive"] == {(): 3}
    # worker ids (host names, pids) never become labels
    assert "host-a" not in repr(found)
    # a batch due later is not overdue
    later = scrape(replace(busy, waiting_next_due_seconds=30.0), Extras([], None))
    assert later["braze_subs_waiting_overdue_seconds"] == {(): 0}


def test_each_lane_has_its_pending_and_oldest_due_age_series():
    status = replace(
        IDLE,
        lanes={
            "live": {"pending": 3, "oldest_seconds": 0.4},
            "bulk": {"pending": 60_000, "oldest_seconds": 95.0},
        },
    )
    found = scrape(status, Extras(requests=[], last_tick_ms=None))
    assert found["braze_subs_lane_pending"] == {
        (("lane", "live"),): 3.0,
        (("lane", "bulk"),): 60_000.0,
    }
    assert found["braze_subs_lane_oldest_due_age_seconds"] == {
        (("lane", "live"),): 0.4,
        (("lane", "bulk"),): 95.0,
    }
    # Idle: both lanes are exported at zero, so an alert on live never lacks its series.
    idle = scrape(IDLE, Extras(requests=[], last_tick_ms=None))
    idle = idle["braze_subs_lane_oldest_due_age_seconds"]
    assert idle == {(("lane", "live"),): 0.0, (("lane", "bulk"),): 0.0}


def test_two_workspaces_each_labelled_and_the_deployments_series_once():
    """Issue 23: every series of a workspace's pipeline carries `workspace`; beat's, Redis's
    and the HTTP API's are the deployment's, exported once without it."""
    us = replace(IDLE, pending=5, tokens_left=40, paused=False)
    eu = replace(
        IDLE,
        pending=7,
        tokens_left=0,
        paused=True,
        pause_reason="HTTP 401: refused",
        credentials_refused="HTTP 401: refused",
    )
    us_extras = Extras([RequestCount("/subscription/status/set", "201", 4)], 1_000.0)
    eu_extras = Extras([RequestCount("/subscription/status/set", "401", 2)], 2_000.0)
    shared = Extras([], None, beat_seen_ms=3_000.0)
    found = parse(
        lambda: scrape_families({"us": (us, us_extras), "eu": (eu, eu_extras)}, shared, [])
    )
    assert found["braze_subs_buffer_pending"] == {
        (("workspace", "us"),): 5,
        (("workspace", "eu"),): 7,
    }
    assert found["braze_subs_budget_tokens"] == {
        (("workspace", "us"),): 40,
        (("workspace", "eu"),): 0,
    }
    open_circuits = {
        labels: value
        for labels, value in found["braze_subs_credentials_circuit_open"].items()
        if value
    }
    assert open_circuits == {(("reason", "401"), ("workspace", "eu")): 1}
    assert found["braze_subs_braze_requests_total"] == {
        (("code", "201"), ("endpoint", "/subscription/status/set"), ("workspace", "us")): 4,
        (("code", "401"), ("endpoint", "/subscription/status/set"), ("workspace", "eu")): 2,
    }
    assert found["braze_subs_coalescer_last_tick_timestamp_seconds"] == {
        (("workspace", "us"),): 1.0,
        (("workspace", "eu"),): 2.0,
    }
    assert found["braze_subs_beat_last_seen_timestamp_seconds"] == {(): 3.0}
    assert found["braze_subs_redis_unsafe_settings"] == {(): 0}
    for name, samples in found.items():
        if name in DEPLOYMENT_SERIES:
            continue
        assert {dict(labels)["workspace"] for labels in samples} <= {"us", "eu"}, name
