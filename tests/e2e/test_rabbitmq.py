"""Issue 24, the broker on its own: Celery's broker on RabbitMQ (BROKER_URL=amqp://...), the
state on REDIS_URL's Redis. A private rabbitmq-server (the `rabbitmq` fixture: Debian's
package, a fresh virtual host per test; skipped with the reason where it is not installed),
real worker and beat processes, the simulator over HTTP, default timings.

The recovery, SIGTERM and fault tests that run on Redis run on RabbitMQ too (the `broker`
parameter of tests/e2e/test_recovery.py and tests/e2e/test_faults.py); these are what only
RabbitMQ has: quorum queues, acks_late across a worker's death, and publishes it nacks.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from admin.status import read_status
from delivery.services import services
from tasks.celery_app import COALESCE_QUEUE, LIVE_POST_QUEUE, POST_QUEUE, QUEUE_ORDER
from tasks.producer import enqueue_changes
from tests.conftest import Broker, EnqueuedLog, assert_applied_in_order, email, wait_for
from tests.sim_control import faults, sim_states, sim_stats

pytestmark = pytest.mark.slow

POST_QUEUES = (LIVE_POST_QUEUE, POST_QUEUE)
# Every queue but the coalescer's, which beat keeps feeding ticks.
QUIET_QUEUES = tuple(name for name in QUEUE_ORDER if name != COALESCE_QUEUE)


def rows(count: int, state: str, group: str = "news") -> list[dict[str, Any]]:
    return [
        {"subscription_group_id": group, "subscription_state": state, "email": email(n)}
        for n in range(count)
    ]


def drained() -> bool:
    found = services()
    status = read_status(found.redis, found.keys)
    return status.pending == 0 and status.in_flight == 0 and status.batches_in_flight == 0


def messages(queues: dict[str, dict[str, Any]], names: tuple[str, ...]) -> tuple[int, int]:
    """(ready, unacknowledged) messages over the queues `names`."""
    found = [queues.get(name, {}) for name in names]
    return (
        sum(int(q.get("messages_ready", 0)) for q in found),
        sum(int(q.get("messages_unacknowledged", 0)) for q in found),
    )


def test_a_worker_on_rabbitmq_delivers_through_quorum_queues(rabbitmq, default_env, sim, processes):
    """BROKER_URL on RabbitMQ: the worker and beat declare every queue of the app as a
    quorum queue, the changes are delivered, and no message is left behind."""
    sent = EnqueuedLog()
    worker = processes.worker("w1")
    processes.beat()
    enqueue_changes(sent.add(rows(120, "subscribed")))
    enqueue_changes(sent.add(rows(60, "unsubscribed")), lane="bulk")
    wait_for(drained, timeout=60, interval=0.1, what="everything to drain")

    states = sim_states(sim)
    assert len(states) == 120
    assert {states[("news", "email", email(n))] for n in range(60)} == {"unsubscribed"}
    assert {states[("news", "email", email(n))] for n in range(60, 120)} == {"subscribed"}
    assert_applied_in_order(sim.url, sent)

    # Celery saw the quorum queues: per-consumer prefetch (no global QoS), and no native
    # delayed delivery step warning at start (braze-subs sends no ETA messages).
    assert "Global QoS is disabled" in worker.log()
    assert "delayed delivery" not in worker.log()
    queues = rabbitmq.queues()
    assert set(QUEUE_ORDER) <= set(queues), sorted(queues)
    for name in QUEUE_ORDER:
        assert queues[name]["type"] == "quorum", queues[name]
    wait_for(
        lambda: messages(rabbitmq.queues(), QUIET_QUEUES) == (0, 0),
        timeout=10,
        what="no message left in the post and record queues",
    )


def test_a_worker_killed_mid_post_leaves_nothing_stranded(
    rabbitmq: Broker, default_env, sim, processes
):
    """acks_late on RabbitMQ: a worker is killed (SIGKILL) while its posts wait for Braze's
    answer. The messages it had taken and not acknowledged go back to their queue (ready
    again, none lost with the dead connection); a new worker delivers everything in its
    last-written state and every queue ends empty."""
    sent = EnqueuedLog()
    faults(sim, hold=True)  # Braze applies each post, then holds its answer
    worker = processes.worker("w1", concurrency=2)
    processes.beat()
    enqueue_changes(sent.add(rows(200, "subscribed")))
    wait_for(
        lambda: messages(rabbitmq.queues(), POST_QUEUES)[1] >= 1,
        timeout=30,
        what="a post message taken and unacknowledged (its request held)",
    )
    # Frozen, the worker publishes and acknowledges nothing more: the counts hold still
    # (only it publishes posts; beat's ticks go to the coalesce queue).
    worker.signal_group(signal.SIGSTOP)
    ready, unacked = messages(rabbitmq.queues(), POST_QUEUES)
    assert unacked >= 1
    processes.kill(worker)
    after = wait_for(
        lambda: (now := messages(rabbitmq.queues(), POST_QUEUES))[1] == 0 and now,
        timeout=30,
        what="the dead worker's messages to be released",
    )
    assert after == (ready + unacked, 0), (ready, unacked, after)

    enqueue_changes(sent.add(rows(100, "unsubscribed")))
    faults(sim, hold=False)
    processes.worker("w2")
    wait_for(drained, timeout=90, interval=0.1, what="everything to drain")
    states = sim_states(sim)
    assert {states[("news", "email", email(n))] for n in range(100)} == {"unsubscribed"}
    assert {states[("news", "email", email(n))] for n in range(100, 200)} == {"subscribed"}
    assert_applied_in_order(sim.url, sent)
    assert sim_stats(sim)["malformed"] == 0
    # Nothing stranded: the redelivered messages ran (their batches were taken back on the
    # dead worker's heartbeat, so they posted nothing twice) and were acknowledged.
    wait_for(
        lambda: messages(rabbitmq.queues(), QUIET_QUEUES) == (0, 0),
        timeout=30,
        what="every post and record queue empty",
    )


@pytest.mark.alone  # drained before the sweep's 120 s: timed
def test_a_post_message_rabbitmq_nacks_is_published_again(
    rabbitmq: Broker, default_env, sim, processes
):
    """A publish RabbitMQ refuses (nacks) is sent again, not left to the 120 s sweep: a
    policy caps the live post queue at one message and rejects publishes beyond it
    (`overflow: reject-publish`, RabbitMQ nacks them), as a quorum queue nacks a publish
    when its leader dies (tests/e2e/test_rabbitmq_cluster.py). The coalescer's post
    messages are nacked while the queue is full and published again as the worker frees
    it; everything drains well before the sweep would have sent the batches again. Before
    `_dispatch` published again, the first nack failed the tick and its batches waited
    BATCH_REDISPATCH_SECONDS (120 s)."""
    rabbitmq.server.ctl(
        "set_policy", "-p", rabbitmq.vhost, "cap-live-posts", f"^{LIVE_POST_QUEUE}$",
        '{"max-length": 1, "overflow": "reject-publish"}', "--apply-to", "queues",
    )  # fmt: skip
    sent = EnqueuedLog()
    faults(sim, latency_ms=200)  # posts take a moment: the queue stays full meanwhile
    worker = processes.worker("w1", concurrency=4)
    processes.beat()
    enqueue_changes(sent.add(rows(400, "subscribed", group="news")))
    enqueue_changes(sent.add(rows(400, "subscribed", group="promo-mail")))
    wait_for(drained, timeout=60, interval=0.2, what="everything to drain before the sweep")
    assert "nacked" in worker.log()  # the cap did refuse publishes
    assert "raised unexpected" not in worker.log()
    states = sim_states(sim)
    assert len(states) == 800 and set(states.values()) == {"subscribed"}
    assert_applied_in_order(sim.url, sent)
