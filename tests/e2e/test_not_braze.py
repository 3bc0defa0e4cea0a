"""Only Braze's JSON answer is a delivery (issue 21 item 2), end to end: something in
between (a captive portal, a proxy, a wrong endpoint) answering 200 with an HTML page
delivers nothing. Real worker and beat processes at default settings."""

from __future__ import annotations

from delivery.services import services
from stores.batch_records import BatchRecord
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, email, wait_for
from tests.sim_control import faults, sim_states, sim_stats

CHANGES = 200


def test_html_200s_deliver_nothing_and_the_changes_go_once_braze_answers(
    default_env, sim, processes
):
    found = services()
    faults(sim, answer="html")
    sent = EnqueuedLog()
    enqueue_changes(
        sent.add(
            {"subscription_group_id": "news", "subscription_state": "subscribed", "email": email(n)}
            for n in range(CHANGES)
        )
    )
    processes.worker("w1")
    processes.beat()

    # Every batch was posted, answered with the portal's page, and posted again.
    batches = CHANGES // found.settings.batch_max_identifiers
    wait_for(lambda: sim_stats(sim)["not_braze"] >= 2 * batches, timeout=60, what="retries")
    # None of them counts as delivered: all still in flight, locked, attempts counted.
    ids = [raw.decode() for raw in found.redis.zrange(found.keys.batches, 0, -1)]
    assert len(ids) == batches
    records = [BatchRecord.from_json(found.redis.get(found.keys.batch(i))) for i in ids]
    assert sum(r.size for r in records) == CHANGES
    assert all(r.attempts >= 1 for r in records)
    assert all("unexpected answer" in (r.last_error or "") for r in records)
    assert sim_states(sim) == {}

    # Braze answers again: the retries deliver every change.
    faults(sim, answer=None)
    wait_for(drained, timeout=90, interval=0.2, what="the retries to deliver")
    states = sim_states(sim)
    assert len(states) == CHANGES and set(states.values()) == {"subscribed"}
    assert_applied_in_order(sim.url, sent)
