"""End to end: producers -> Redis buffer -> beat coalescer -> real worker -> simulator."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest

from tasks.producer import enqueue_changes
from tests.conftest import drained, identifier, wait_for

pytestmark = pytest.mark.slow

GROUPS = {
    "email": ["news", "promo-mail"],
    "phone": ["sms-promos"],
    "external_id": ["news", "sms-promos"],
}


def sim_state(url: str) -> dict[tuple[str, str, str], str]:
    data = httpx.get(f"{url}/_sim/state").json()
    return {(s["group"], s["kind"], s["value"]): s["state"] for s in data["subscriptions"]}


def sim_stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/_sim/stats").json()


def test_thousands_of_flipping_changes_end_in_last_written_state(env, sim, processes):
    rng = random.Random(7)
    processes.worker("w1", concurrency=8)
    processes.beat()

    expected: dict[tuple[str, str, str], str] = {}
    for _wave in range(4):
        rows = []
        for _ in range(1500):
            kind = rng.choice(list(GROUPS))
            group = rng.choice(GROUPS[kind])
            value = identifier(kind, rng.randrange(600))
            state = rng.choice(["subscribed", "unsubscribed"])
            rows.append({"subscription_group_id": group, "subscription_state": state, kind: value})
            expected[(group, kind, value)] = state
        enqueue_changes(rows)
        # Let the coalescer cut part of this wave before the next one flips it again.
        wait_for(lambda: sim_stats(sim.url)["requests_ok"] > 0, what="first requests")

    wait_for(drained, timeout=90, what="the buffer to drain")
    assert sim_state(sim.url) == expected
    stats = sim_stats(sim.url)
    assert stats["malformed"] == 0
    assert stats["rate_limited_429"] == 0
