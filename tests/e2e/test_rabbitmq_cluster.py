"""Issue 24, a RabbitMQ cluster as Celery's broker: three rabbitmq-server nodes on this one
machine (distinct node names and ports, one Erlang cookie and one private epmd,
`rabbitmqctl join_cluster`), BROKER_URL listing the nodes in kombu's failover form
(`amqp://...@n1/v;amqp://...@n2/v;amqp://...@n3/v`), the state on REDIS_URL's Redis, real
worker and beat processes, the simulator over HTTP, default timings.

The queues braze-subs declares are quorum queues replicated on all three nodes; kill -9 of
the node that leads the live post queue (and holds the worker's and beat's connections)
mid-drain loses nothing: the worker and beat fail over to the next node, the queue elects
a new leader among the two left, the messages the worker held unacknowledged are ready
again, and every identifier ends in its last-written state (order oracle).

The cluster is this module's own (started once: ~45 s on a loaded 2-core machine), in the
`rabbitmq` xdist group (`rabbitmq_cluster` in tests/conftest.py's XDIST_GROUP_FIXTURES) so
it never runs beside another RabbitMQ test.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from config.settings import load_settings
from delivery.services import reset_services
from devtools.rabbitmq import RabbitMQ, RabbitMQCluster
from devtools.rabbitmq import unavailable as rabbitmq_unavailable
from tasks.celery_app import LIVE_POST_QUEUE, QUEUE_ORDER
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, wait_for
from tests.e2e.test_redis_cluster import changes
from tests.sim_control import faults, sim_states, sim_stats

# `alone`: the assertion rests on time (RECOVERY_BOUND_SECONDS).
pytestmark = [pytest.mark.slow, pytest.mark.alone]

# From the kill to the last change delivered, stated in README ("A RabbitMQ cluster"):
# measured 2-6 s here (the worker's and beat's reconnection to the next node at once, the
# new leaders elected in under a second, the dead connection's messages ready again and
# run, and what was still to post at 1 s per request). With Celery's prefetch reduction
# after a reconnection (turned off on RabbitMQ, stores/connection.py) the worker stalled
# ~60 s and the drain ended 62 s after the kill: this bound fails it.
RECOVERY_BOUND_SECONDS = 30


@pytest.fixture(scope="module")
def rabbitmq_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQCluster]:
    reason = rabbitmq_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = RabbitMQCluster(tmp_path_factory.mktemp("rabbitmq-cluster"), size=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_vhost(
    rabbitmq_cluster: RabbitMQCluster, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh virtual host of the cluster; BROKER_URL is set by the test (the order of the
    nodes in it matters to what it tests)."""
    vhost = rabbitmq_cluster.add_vhost()
    yield vhost
    monkeypatch.delenv("BROKER_URL", raising=False)
    reset_services()


def use_broker(url: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    env["BROKER_URL"] = url
    monkeypatch.setenv("BROKER_URL", url)
    reset_services()


def declare_queues(url: str) -> None:
    """Declare the app's queues as a worker does (quorum, durable), from this process."""
    from tasks.celery_app import create_app

    app = create_app(load_settings(broker_url=url))
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in app.conf.task_queues:
            queue(channel).declare()


def test_quorum_queues_are_replicated_on_three_nodes_and_survive_the_leaders_kill(
    rabbitmq_cluster: RabbitMQCluster, cluster_vhost, env, monkeypatch, sim, processes
):
    """Three nodes, BROKER_URL listing them (the live post queue's leader first, so the
    worker and beat connect to it). Mid-drain, kill -9 of that node: every queue keeps its
    three members with two online and a leader among them; the drain ends within
    RECOVERY_BOUND_SECONDS of the kill, every identifier in its last-written state (order
    oracle, both lanes), and nothing is stranded (every post and record queue empty, no
    message unacknowledged)."""
    cluster = rabbitmq_cluster
    declare_queues(cluster.url(cluster_vhost))
    queues = cluster.queues(cluster_vhost)
    everyone = {node.node for node in cluster.nodes}
    for name in QUEUE_ORDER:
        assert queues[name]["type"] == "quorum", queues[name]
        assert set(queues[name]["members"]) == everyone, queues[name]
        assert set(queues[name]["online"]) == everyone, queues[name]
    leader: RabbitMQ = cluster.node_named(queues[LIVE_POST_QUEUE]["leader"])
    others = [node for node in cluster.nodes if node is not leader]
    broker = {"BROKER_URL": cluster.url(cluster_vhost, [leader, *others])}
    use_broker(broker["BROKER_URL"], env, monkeypatch)

    rng = random.Random(2424)
    faults(sim, latency_ms=1000)  # a drain of several seconds: the kill lands inside it
    processes.worker("w1", concurrency=8, extra_env=broker)
    processes.start("beat", "beat", extra_env=broker)
    expected: dict[tuple[str, str, str], str] = {}
    sent = EnqueuedLog()
    for lane in ("live", "bulk", "live"):
        enqueue_changes(sent.add(changes(rng, 600, expected)), lane=lane)
    wait_for(
        lambda: sim_stats(sim.url)["requests_ok"] > 0 and not drained(),
        timeout=60,
        what="the drain under way",
    )
    on_leader = connections_on(cluster, leader, cluster_vhost)
    assert on_leader >= 2, on_leader  # the worker's and beat's connections die with it
    answered = sim_stats(sim.url)["requests_ok"]
    killed_at = time.monotonic()
    leader.kill()

    # Waves written after the kill go through the two nodes left.
    enqueue_changes(sent.add(changes(rng, 300, expected)))
    wait_for(drained, timeout=RECOVERY_BOUND_SECONDS, interval=0.2, what="the drain to end")
    took = time.monotonic() - killed_at
    print(f"drained {took:.1f} s after the kill -9 of the leader")
    assert sim_stats(sim.url)["requests_ok"] > answered  # the drain went on after the kill
    assert sim_states(sim.url) == expected
    assert_applied_in_order(sim.url, sent)

    survivors = {node.node for node in others}
    queues = wait_for(
        lambda: stranded_free(cluster, cluster_vhost),
        timeout=60,
        what="every post and record queue empty, nothing unacknowledged",
    )
    for name in QUEUE_ORDER:
        assert set(queues[name]["members"]) == everyone, queues[name]
        assert set(queues[name]["online"]) == survivors, queues[name]
        assert queues[name]["leader"] in survivors, queues[name]


def connections_on(cluster: RabbitMQCluster, node: RabbitMQ, vhost: str) -> int:
    import json

    # A connection's `port` is the AMQP port of the node it reached (each node its own).
    out = cluster.ctl("list_connections", "vhost", "port", "--formatter", "json")
    listed = json.loads(out[out.index("[") :]) if "[" in out else []
    return sum(1 for c in listed if c["vhost"] == vhost and int(c["port"]) == node.port)


def stranded_free(cluster: RabbitMQCluster, vhost: str) -> dict[str, dict[str, Any]] | None:
    """The queues when none but the coalescer's (which beat keeps feeding ticks) holds a
    message and none has a message unacknowledged; else None."""
    queues = cluster.queues(vhost)
    for name in QUEUE_ORDER:
        row = queues.get(name, {})
        if int(row.get("messages_unacknowledged", 0)) > 0 and name != "braze-subs.coalesce":
            return None
        if int(row.get("messages_ready", 0)) > 0 and name != "braze-subs.coalesce":
            return None
    return queues
