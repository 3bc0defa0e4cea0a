"""Issue 21 item 7 through the broker: a `subscriptions.record_change` whose occurred_at is
a 400-digit integer (no float holds it) or a 5,000-digit one (past Python's int/str limit:
kombu's JSON decoder refused the whole message, logged CRITICAL with a traceback and the
raw body) fails its task with the one-line reason, as any invalid change does: no
traceback in the worker's log, the email never in it, nothing enqueued. In-process and
file inputs: tests/integration/test_huge_inputs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from celery import Celery
from kombu.serialization import register

from delivery.services import services
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

HUGE = "9" * 5000


def test_a_huge_occurred_at_fails_the_task_in_one_line(env, processes, redis_client):
    worker = processes.worker("w1", concurrency=2)
    # A producer in another language: its JSON carries the 5,000 digits as they are
    # (Python's own json.dumps cannot write such an int).
    register(
        "foreign-json",
        lambda obj: json.dumps(obj).replace('"HUGE"', HUGE),
        json.loads,
        content_type="application/json",
        content_encoding="utf-8",
    )
    foreign = Celery("other-service", broker=env["REDIS_URL"])
    row = {
        "subscription_group_id": "news",
        "subscription_state": "subscribed",
        "email": "jane@example.com",
    }
    tasks = {
        "400 digits": foreign.send_task(
            "subscriptions.record_change", kwargs={**row, "occurred_at": 10**400}
        ),
        "5000 digits": foreign.send_task(
            "subscriptions.record_change",
            kwargs={**row, "occurred_at": "HUGE"},
            serializer="foreign-json",
        ),
    }
    log = Path(worker.log_path)
    wait_for(
        lambda: all(f"[{t.id}] raised" in log.read_text(errors="replace") for t in tasks.values()),
        timeout=30,
        what="both tasks to fail",
    )
    text = log.read_text(errors="replace")
    failures = {
        name: next(line for line in text.splitlines() if f"[{task.id}] raised" in line)
        for name, task in tasks.items()
    }
    assert (
        "occurred_at: lies in the future, beyond any time, got a 401-digit number"
        in (failures["400 digits"])
    )
    assert "occurred_at: must be a finite time" in failures["5000 digits"]
    assert "Traceback" not in text, text[-3000:]
    assert "Can't decode message body" not in text
    assert "jane@example.com" not in text
    assert not redis_client.exists(services().keys.pending)
    foreign.close()
