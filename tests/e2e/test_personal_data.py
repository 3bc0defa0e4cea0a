"""Issue 10, personal data: a real worker with LOG_FORMAT=json, fed by a plain Celery app of
another service (raw identifiers in its `kwargsrepr` header)."""

from __future__ import annotations

import json

import pytest
from celery import Celery

from core.redaction import mask_email, mask_phone
from tests.conftest import wait_for

GROUP = "newsletter"


def json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def test_celery_success_and_failure_records_carry_masked_arguments(env, sim, processes):
    worker = processes.worker("w1", concurrency=2, extra_env={"LOG_FORMAT": "json"})
    foreign = Celery("other-service", broker=env["REDIS_URL"])  # fills kwargsrepr raw
    good_email = "jane.doe@example.com"
    long_phone = "+1415555012345678901234567890123456789012345"
    sent = {
        "ok": {"email": good_email},
        "long-phone": {"phone": long_phone},
        "misspelled": {"emial": "misspelt.person@example.com"},
    }
    ids = {}
    for name, identifier in sent.items():
        result = foreign.send_task(
            "subscriptions.record_change",
            kwargs={
                "subscription_group_id": GROUP,
                "subscription_state": "subscribed",
                **identifier,
            },
        )
        ids[name] = result.id

    def finished() -> bool:
        text = worker.log()
        return all(
            f"[{task_id}]" in text and ("succeeded" in text) for task_id in ids.values()
        ) and (sum(f"[{task_id}] raised" in text for task_id in ids.values()) == 2)

    wait_for(finished, timeout=30, what="three record_change tasks to finish")
    text = worker.log()
    for raw in (good_email, long_phone, "misspelt.person@example.com", long_phone[:20]):
        assert raw not in text, raw
    records = json_lines(text)
    success = next(
        r for r in records if ids["ok"] in r.get("message", "") and "succeeded" in r["message"]
    )
    assert mask_email(good_email) in success["data"]["kwargs"]
    failures = {
        name: next(r for r in records if f"[{ids[name]}] raised" in r.get("message", ""))
        for name in ("long-phone", "misspelled")
    }
    assert mask_phone(long_phone) in failures["long-phone"]["message"]
    misspelled = failures["misspelled"]["message"]
    assert "ChangeRefused" in misspelled and "TypeError" not in misspelled
    assert "unknown field(s): 'emial' (did you mean 'email'?)" in misspelled
    assert "m***" in failures["misspelled"]["data"]["kwargs"]
    foreign.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_misspelled_task_name_is_logged_without_the_identifiers(env, sim, processes, log_format):
    """Issue 21, item 8: a foreign producer's typo in the task name. Celery logs an
    unregistered task's whole body and headers (`kwargsrepr` raw from a plain app); the
    worker logs them masked, and drops the message as Celery does."""
    worker = processes.worker("w1", concurrency=2, extra_env={"LOG_FORMAT": log_format})
    foreign = Celery("other-service", broker=env["REDIS_URL"])  # fills kwargsrepr raw
    raw_email, raw_phone = "jane.doe@example.com", "+14155550123"
    result = foreign.send_task(
        "subscriptions.record_chnage",
        kwargs={
            "subscription_group_id": GROUP,
            "subscription_state": "subscribed",
            "email": raw_email,
            "phone": raw_phone,
        },
    )
    wait_for(
        lambda: result.id in worker.log() and "unregistered task" in worker.log(),
        timeout=30,
        what="the worker to log the unregistered task",
    )
    text = worker.log()
    for raw in (raw_email, raw_phone, "jane.doe", "4155550123"):
        assert raw not in text, raw
    assert "subscriptions.record_chnage" in text
    assert mask_email(raw_email) in text and mask_phone(raw_phone) in text
    if log_format == "json":
        [record] = [r for r in json_lines(text) if "unregistered task" in r.get("message", "")]
        assert mask_email(raw_email) in record["message"]
    foreign.close()
