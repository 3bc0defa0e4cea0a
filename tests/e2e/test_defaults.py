"""Recovery at the defaults users run (no timing shortened): a worker killed with a post on
the wire, its batch recovered by the coalescer's sweep, nothing lost, nothing out of order.
Slow by design: the default claim (60 s) and redispatch (120 s) are what is waited for."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from admin.status import read_status
from delivery.services import services
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, email, wait_for
from tests.sim_control import sim_stats

pytestmark = pytest.mark.slow

GROUP = "news"


def row(value: str, state: str) -> dict[str, Any]:
    return {"subscription_group_id": GROUP, "subscription_state": state, "email": value}


def test_a_worker_killed_mid_post_loses_nothing_at_default_settings(default_env, sim, processes):
    httpx.post(f"{sim.url}/_sim/faults", json={"hold": True}).raise_for_status()
    first = processes.worker("w1", concurrency=4)
    processes.beat()

    values = [email(n) for n in range(6)]
    sent = EnqueuedLog()
    enqueue_changes(sent.add([row(v, "subscribed") for v in values]))
    wait_for(lambda: sim_stats(sim)["held"] >= 1, timeout=30, what="the post to be held")
    # Newer changes for half of the batch while its answer is held: they wait for the lock.
    enqueue_changes(sent.add([row(v, "unsubscribed") for v in values[:3]]))

    processes.kill(first)
    killed = time.monotonic()
    httpx.post(f"{sim.url}/_sim/faults", json={"hold": False}).raise_for_status()
    processes.worker("w2", concurrency=4)

    wait_for(drained, timeout=400, interval=0.5, what="the killed worker's batch recovered")
    recovered = time.monotonic() - killed
    states = {
        (s["group"], s["kind"], s["value"]): s["state"]
        for s in httpx.get(f"{sim.url}/_sim/state", params={"log": "0"}).json()["subscriptions"]
    }
    expected = {(GROUP, "email", v): "unsubscribed" for v in values[:3]}
    expected |= {(GROUP, "email", v): "subscribed" for v in values[3:]}
    assert states == expected
    assert_applied_in_order(sim.url, sent)
    found = services()
    assert read_status(found.redis, found.keys).dead_letter == 0
    print(f"killed mid-post at defaults: recovered in {recovered:.0f} s")
