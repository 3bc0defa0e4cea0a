"""The Celery side, with real worker and beat processes and the simulator over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from admin.status import read_status
from core.redaction import mask_phone
from delivery.services import services
from tasks.producer import ChangesRejected, enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, wait_for
from tests.sim_control import faults, sim_states, sim_stats, sim_subscriptions

GROUP = "news"


def email(n: int) -> str:
    return f"user{n}@example.com"


def row(value: str, state: str = "subscribed", kind: str = "email") -> dict[str, Any]:
    return {"subscription_group_id": GROUP, "subscription_state": state, kind: value}


def producer_app(env: dict[str, str]) -> Celery:
    """This project's own Celery app, bound to the test broker."""
    from tasks.celery_app import app, create_app

    if app.conf.broker_url == env["REDIS_URL"]:
        return app
    from config.settings import get_settings

    return create_app(get_settings())  # imported earlier under other settings


# --------------------------------------------------------------------------------------
# Python producer API (no processes)
# --------------------------------------------------------------------------------------


def test_enqueue_changes_with_one_invalid_item_enqueues_nothing(env, redis_client):
    items = [row(email(n)) for n in range(5)]
    items.insert(3, row("not-an-email"))
    with pytest.raises(ChangesRejected) as caught:
        enqueue_changes(items)
    assert [index for index, _error in caught.value.errors] == [3]
    assert "email" in str(caught.value)
    keys = services().keys
    assert redis_client.hlen(keys.pending) == 0
    assert redis_client.exists(keys.seq) == 0
    assert redis_client.hget(keys.stats, "enqueued") is None

    assert enqueue_changes(items[:3] + items[4:]) == 5
    assert redis_client.hlen(keys.pending) == 5


# --------------------------------------------------------------------------------------
# With worker and beat
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_record_change_task_from_another_service(env, sim, processes, redis_client):
    worker = processes.worker("w1", concurrency=4)
    processes.beat()

    # A service that shares only the broker: a bare Celery app, send_task by name.
    foreign = Celery("other-service", broker=env["REDIS_URL"])
    foreign.send_task(
        "subscriptions.record_change",
        kwargs={
            "subscription_group_id": GROUP,
            "subscription_state": "unsubscribed",
            "email": " Jane@Example.COM ",
        },
    )
    # And this project's own app, the way the INTERFACE names it.
    own = producer_app(env)
    own.send_task(
        "subscriptions.record_change",
        kwargs={
            "subscription_group_id": "sms-promos",
            "subscription_state": "subscribed",
            "phone": "+14155550123",
            "use_double_opt_in_logic": True,
        },
    )
    expected = {
        (GROUP, "email", "jane@example.com"): "unsubscribed",
        ("sms-promos", "phone", "+14155550123"): "subscribed",
    }
    wait_for(lambda: sim_states(sim) == expected, timeout=30, what="both changes in Braze")
    assert sim_subscriptions(sim)[("sms-promos", "phone", "+14155550123")]["double_opt_in"]

    # An invalid change fails its task and enqueues nothing.
    bad = foreign.send_task(
        "subscriptions.record_change",
        kwargs={"subscription_group_id": GROUP, "subscription_state": "subscribed", "email": "x"},
    )
    log = Path(worker.log_path)
    wait_for(
        lambda: f"[{bad.id}] raised" in log.read_text(errors="replace"),
        timeout=20,
        what="the invalid task to fail",
    )
    failure = next(
        line
        for line in log.read_text(errors="replace").splitlines()
        if f"[{bad.id}] raised" in line
    )
    assert "email: " in failure  # the reason names the field

    # Refused values are personal data too: the log and Flower see them masked.
    refused = {"phone": "+1415555012345678901", "email": "jane.doe@@example.com"}
    for kind, value in refused.items():
        task = foreign.send_task(
            "subscriptions.record_change",
            kwargs={
                "subscription_group_id": GROUP,
                "subscription_state": "subscribed",
                kind: value,
            },
        )
        wait_for(
            lambda task=task: f"[{task.id}] raised" in log.read_text(errors="replace"),
            timeout=20,
            what=f"the task with a bad {kind} to fail",
        )
    text = log.read_text(errors="replace")
    assert "ChangeRefused" in text and "phone: " in text
    for value in refused.values():
        assert value not in text
    assert f"phone: '{mask_phone(refused['phone'])}' is too long" in text  # as batch lines mask
    keys = services().keys
    assert int(redis_client.hget(keys.stats, "enqueued")) == 2
    wait_for(drained, timeout=10, what="the buffer to drain")
    assert sim_states(sim) == expected
    assert sim_stats(sim)["malformed"] == 0
    assert_applied_in_order(sim.url, {key: [state] for key, state in expected.items()})
    foreign.close()


@pytest.mark.slow
def test_batch_of_a_killed_worker_is_swept_and_ends_right(env, sim, processes, redis_client):
    fast = {
        "HTTP_TIMEOUT_SECONDS": "4",
        "BATCH_CLAIM_SECONDS": "6",
        "BATCH_REDISPATCH_SECONDS": "2",
    }
    faults(sim, hold=True)
    w1 = processes.worker("w1", concurrency=4, extra_env=fast)
    processes.start("beat", "beat", extra_env=fast)

    values = [email(n) for n in range(6)]
    sent = EnqueuedLog()
    enqueue_changes(sent.add([row(v, "subscribed") for v in values]))
    wait_for(lambda: sim_stats(sim)["held"] >= 1, timeout=20, what="the post to be held")
    # Newer changes for half of the batch, while its answer is held: they wait for the lock.
    enqueue_changes(sent.add([row(v, "unsubscribed") for v in values[:3]]))

    processes.kill(w1)
    assert services().buffer.inflight_count() == 6
    faults(sim, hold=False)
    processes.worker("w2", concurrency=4, extra_env=fast)

    wait_for(drained, timeout=40, what="the swept batch and the newer changes to finish")
    expected = {(GROUP, "email", v): "unsubscribed" for v in values[:3]}
    expected |= {(GROUP, "email", v): "subscribed" for v in values[3:]}
    subscriptions = sim_subscriptions(sim)
    assert {key: s["state"] for key, s in subscriptions.items()} == expected
    # The held request reached Braze once; after the sweep every identifier went once more:
    # the unchanged ones in the redelivered batch, the flipped ones in a batch of their own.
    assert {key: s["updates"] for key, s in subscriptions.items()} == dict.fromkeys(expected, 2)
    stats = sim_stats(sim)
    assert stats["malformed"] == 0
    assert read_status(redis_client, services().keys).dead_letter == 0
    # The redelivered batch re-applies "subscribed" (a repeat); never after "unsubscribed".
    assert_applied_in_order(sim.url, sent)


def test_beat_expires_dead_letters_past_their_retention(env, processes, redis_client):
    """`subscriptions.expire_dead_letters` is on beat's schedule every
    DEAD_LETTER_EXPIRY_INTERVAL_SECONDS; a worker running it removes the entries older than
    DEAD_LETTER_RETENTION_DAYS, counted in `status`."""
    from config.settings import get_settings
    from core.changes import parse_change
    from core.planning import plan_batches
    from stores.clock import server_time_ms

    own = producer_app(env)
    entry = own.conf.beat_schedule["expire-dead-letters"]
    assert entry["task"] == "subscriptions.expire_dead_letters"
    assert entry["schedule"] == get_settings().dead_letter_expiry_interval_seconds == 600

    found = services()
    found.buffer.enqueue(
        [
            parse_change(
                {"subscription_group_id": GROUP, "subscription_state": "subscribed", "email": v}
            )
            for v in ("old@example.com", "young@example.com")
        ]
    )
    now = server_time_ms(redis_client)
    changes, _ = found.buffer.read_due(now, 10)
    ids = []
    for change in changes:  # one batch each, dead-lettered
        [plan] = plan_batches([change], now_ms=now, max_identifiers=50)
        [[(batch_id, _size)]] = found.buffer.take([[plan]], 60_000)
        found.batches.claim(batch_id, "t", 60_000)
        found.batches.dead_letter(batch_id, "t", "HTTP 400")
        ids.append(batch_id)
    old = ids[0]
    redis_client.zadd(found.keys.dead_letter_index, {old: now - 31 * 86_400_000})

    processes.worker("w1", concurrency=2)
    own.send_task("subscriptions.expire_dead_letters")  # what beat sends
    wait_for(
        lambda: [e.id for e in found.dead_letters.list()] == ids[1:],
        timeout=30,
        what="the old entry to expire",
    )
    assert read_status(found.redis, found.keys).dead_letters_expired == 1
