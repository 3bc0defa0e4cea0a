"""Several batches in one Celery message (issue 26, the ceiling): while the budget is far
from binding, a tick that cuts many batches sends them in fewer messages
(`subscriptions.post_batches`), each batch claimed, fenced and ended as alone. Real worker,
beat, Redis and the simulator; the order oracle checks that no older state landed after a
newer one. The split itself: unit/test_message_groups.py."""

from __future__ import annotations

import re

import pytest

from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, identifier, wait_for
from tests.sim_control import sim_states, sim_stats

pytestmark = pytest.mark.slow

# A budget that never binds (the ceiling's case): the messages carry several batches.
HIGH_BUDGET = {"BRAZE_RATE_LIMIT": "100000", "BRAZE_RATE_LIMIT_WINDOW_SECONDS": "2"}


def test_a_backlog_goes_in_messages_of_several_batches_in_order(env, sim, processes):
    rows_per_wave = 3000  # 60 batches of 50 when cut at once
    expected: dict[tuple[str, str, str], str] = {}
    sent = EnqueuedLog()

    def wave(state_of: dict[int, str]) -> None:
        rows = []
        for n, state in state_of.items():
            group = ("news", "promo-mail")[n % 2]
            rows.append(
                {
                    "subscription_group_id": group,
                    "subscription_state": state,
                    "email": identifier("email", n),
                }
            )
            expected[(group, "email", identifier("email", n))] = state
        enqueue_changes(sent.add(rows))

    wave({n: ("subscribed", "unsubscribed")[n % 3 == 0] for n in range(rows_per_wave)})
    worker = processes.worker("w1", concurrency=8, extra_env=HIGH_BUDGET)
    processes.beat()
    # A second wave flips a third of them while the first is on its way.
    wait_for(lambda: sim_stats(sim.url)["requests_ok"] > 0, what="a first request")
    wave({n: "unsubscribed" if n % 2 else "subscribed" for n in range(0, rows_per_wave, 3)})

    wait_for(drained, timeout=90, what="the buffer to drain")
    assert sim_states(sim.url) == expected
    assert_applied_in_order(sim.url, sent)
    stats = sim_stats(sim.url)
    assert stats["malformed"] == 0
    assert stats["rate_limited_429"] == 0
    # The backlog went out in messages of several batches, each batch as its own request.
    groups = re.findall(r"post_batches\[[^\]]+\] succeeded", worker.log())
    assert groups, "no message of several batches was posted"
    assert stats["requests_ok"] > len(groups)
