"""The exporter's metrics from a status read (pure): names, types, bounded labels."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from admin.exporter import Extras, circuit_reason_label, families, pause_reason_label
from admin.status import Status
from stores.counters import RequestCount

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


def scrape(status: Status, extras: Extras) -> dict[str, dict[tuple, float]]:
    """The exposition text as Prometheus would parse it: name -> {labels: value}."""

    class Fixed:
        def collect(self):
            return families(status, extras)

    registry = CollectorRegistry()
    registry.register(Fixed())
    parsed: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            parsed.setdefault(sample.name, {})[labels] = sample.value
    return parsed


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
