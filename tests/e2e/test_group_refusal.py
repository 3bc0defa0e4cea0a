"""Issue 10: a group Braze refuses as a whole, through a real worker and beat with the
default delivery timings: 500 emails cost at most 3 requests per batch of 50, and the
group's later batches none."""

from __future__ import annotations

import httpx
import pytest

from admin.status import read_status
from delivery.services import services
from stores.dead_letters import DeadLetters
from tasks.producer import enqueue_changes
from tests.conftest import email, wait_for
from tests.sim_control import sim_stats

GROUP = "deleted-group"


def rows(numbers: range) -> list[dict[str, str]]:
    return [
        {"subscription_group_id": GROUP, "subscription_state": "subscribed", "email": email(n)}
        for n in numbers
    ]


@pytest.mark.parametrize("how", ["named", "anonymous"])
def test_500_emails_to_a_refused_group_cost_at_most_3_requests_per_batch(
    env, sim, processes, redis_client, how
):
    if how == "named":
        switches = {"reject_groups": [GROUP]}
    else:
        switches = {"reject_anonymous": [email(n) for n in range(1000)]}
    httpx.post(f"{sim.url}/_sim/faults", json=switches).raise_for_status()
    processes.worker("w1", concurrency=8)
    processes.beat()
    found = services()
    store = DeadLetters(redis_client, found.keys)

    def dead_lettered() -> int:
        return read_status(found.redis, found.keys).dead_letter

    enqueue_changes(rows(range(500)))
    wait_for(lambda: dead_lettered() == 500, timeout=60, what="all 500 dead-lettered")
    first = sim_stats(sim)["requests_total"]
    assert first <= 3 * 10, first  # 10 batches of 50; halving each would cost 990

    enqueue_changes(rows(range(500, 1000)))
    wait_for(lambda: dead_lettered() == 1000, timeout=60, what="the next 500 dead-lettered")
    assert sim_stats(sim)["requests_total"] == first  # while the refusal stands: no request
    status = read_status(found.redis, found.keys)
    assert [r["group"] for r in status.refused_groups] == [GROUP]
    assert status.in_flight == 0 and status.pending == 0
    assert len({i["value"] for e in store.list() for i in e.identifiers}) == 1000
