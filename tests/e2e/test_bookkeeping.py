"""After an answer, failing bookkeeping cannot re-post (issue 21 item 4), end to end: Braze
accepts double opt-in batches but its X-RateLimit-* headers are absurd (`1e308`, which made
the limiter's arithmetic overflow after the 201, so the batch was given back and texted
again and again). Real worker and beat processes at default settings."""

from __future__ import annotations

import time

from delivery.services import services
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, wait_for
from tests.sim_control import faults, sim_stats, sim_subscriptions

PHONES = [f"+1415555{n:04d}" for n in range(120)]


def test_double_opt_in_batches_are_posted_once_whatever_the_headers(default_env, sim, processes):
    faults(sim, absurd_rate_limit_headers=True)
    sent = EnqueuedLog()
    rows = [
        {
            "subscription_group_id": "sms-promos",
            "subscription_state": "subscribed",
            "phone": phone,
            "use_double_opt_in_logic": True,
        }
        for phone in PHONES
    ]
    enqueue_changes(sent.add(rows))
    processes.worker("w1")
    processes.beat()

    wait_for(drained, timeout=60, interval=0.2, what="every batch delivered")
    batches = -(-len(PHONES) // services().settings.batch_max_identifiers)
    # A few ticks more: a batch given back would be posted again by now.
    deadline = time.monotonic() + 3
    wait_for(lambda: time.monotonic() > deadline, timeout=10, what="a few ticks")
    stats = sim_stats(sim)
    assert stats["requests_ok"] == stats["requests_total"]
    assert stats["requests_total"] <= batches + 1  # one request per batch (a partial one
    # may be cut in two ticks)
    held = sim_subscriptions(sim)
    assert len(held) == len(PHONES)
    assert all(s["double_opt_in"] for s in held.values())
    assert_applied_in_order(sim.url, sent, allow_repeats=False)
