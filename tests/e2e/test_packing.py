"""v2 packing end to end: what it saves for "unsubscribe from everything" (the pure rules of
which batches may share a request: tests/unit/test_packing.py)."""

from __future__ import annotations

import httpx
import pytest

from admin.status import read_status
from delivery.services import services
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, wait_for


def requests_to_unsubscribe_everyone(env, sim, processes, version: str) -> int:
    users, groups = 500, 4
    sent = EnqueuedLog()
    enqueue_changes(
        sent.add(
            {
                "subscription_group_id": f"group-{g}",
                "subscription_state": "unsubscribed",
                "external_id": f"user-{n}",
            }
            for n in range(users)
            for g in range(groups)
        )
    )
    processes.worker(f"w-{version}", extra_env={"BRAZE_API_VERSION": version})
    processes.beat()

    def drained() -> bool:
        found = services()
        status = read_status(found.redis, found.keys)
        return status.pending == 0 and status.in_flight == 0

    wait_for(drained, timeout=60, what="the buffer to drain")
    stats = httpx.get(f"{sim.url}/_sim/stats").json()
    assert stats["malformed"] == 0
    data = httpx.get(f"{sim.url}/_sim/state?log=0").json()
    assert len(data["subscriptions"]) == users * groups
    assert {s["state"] for s in data["subscriptions"]} == {"unsubscribed"}
    assert_applied_in_order(sim.url, sent, allow_repeats=False)
    return sum(1 for r in stats["requests"] if r["status"] == 201)


@pytest.mark.slow
def test_v1_needs_one_request_per_group_and_fifty_users(env, sim, processes):
    assert requests_to_unsubscribe_everyone(env, sim, processes, "v1") == 4 * 10


@pytest.mark.slow
def test_v2_needs_one_request_per_fifty_users(env, sim, processes):
    assert requests_to_unsubscribe_everyone(env, sim, processes, "v2") == 10
