"""Changes from another language reach Braze: a real `braze-subs api`, worker and beat at
the default settings, the simulator over HTTP, and the order oracle."""

from __future__ import annotations

import random

import pytest

from tests.api_process import running_api
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, wait_for
from tests.sim_control import sim_states

GROUPS = ("newsletter", "product-updates")


@pytest.mark.slow
def test_waves_posted_to_the_api_end_in_braze_in_order_at_default_settings(
    default_env, sim, processes, tmp_path
):
    processes.worker("w1", concurrency=8)
    processes.beat()
    rng = random.Random(25)
    sent = EnqueuedLog()
    last: dict[tuple[str, str, str], str] = {}
    with running_api(default_env["REDIS_URL"], tmp_path) as api:
        for _wave in range(4):  # flips of the same 600 identifiers, lists of 1 to 200
            rows = []
            for n in rng.sample(range(600), 400):
                group = GROUPS[n % 2]
                state = rng.choice(("subscribed", "unsubscribed"))
                rows.append(
                    {
                        "subscription_group_id": group,
                        "subscription_state": state,
                        "email": f"api{n}@example.com",
                    }
                )
            start = 0
            while start < len(rows):
                size = rng.choice((1, 7, 50, 200))
                chunk = rows[start : start + size]
                start += size
                answer = api.post(sent.add(chunk))
                assert answer.status_code == 202, answer.text
                assert answer.json() == {"accepted": len(chunk), "stale": 0}
                for row in chunk:
                    last[(row["subscription_group_id"], "email", row["email"])] = row[
                        "subscription_state"
                    ]
    wait_for(drained, timeout=120, what="the backlog to drain")
    wait_for(lambda: sim_states(sim) == last, timeout=60, what="every last state in Braze")
    assert_applied_in_order(sim.url, sent)
