"""End to end on a real Redis Cluster (README "State on a Redis Cluster", "Failover"): what
a `kill -9` of a master loses of the enqueues its producers were told were accepted, with
and without WAIT-acknowledged enqueues (REDIS_WAIT_REPLICAS=1). Real worker and beat, the
simulator over HTTP, the order oracle at the end.

The replica of the workspace's master is stopped (SIGSTOP) while a producer keeps
enqueuing, as a replica far behind its master would be; then the master is killed and
the replica, resumed, is promoted. Without WAIT the producer is told "accepted" for changes
the replica never got (the master held them in its output buffer, past what the sockets
hold) and they are never delivered. With it, the first enqueue the replica did not
acknowledge is refused, and every change that was acknowledged is delivered."""

from __future__ import annotations

import signal

import pytest

from delivery.services import reset_services
from devtools.processes import wait_until
from stores.keys import Keys
from stores.replication import NotReplicated
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, email, wait_for
from tests.sim_control import faults, sim_states

pytestmark = pytest.mark.slow

CHUNK = 1000  # one enqueue call
MOST_CHUNKS = 100  # while the replica is stopped: ~19 fit in the sockets here
# Held by the master for its stopped replica, past the sockets: several calls' worth of
# the replication stream (~0.5 MB a call), newer than anything the drain has reached.
HELD_BYTES = 4_000_000


def rows(first: int, count: int, expected: dict) -> list[dict[str, str]]:
    made = []
    for n in range(first, first + count):
        state = "subscribed" if n % 3 else "unsubscribed"
        made.append(
            {"subscription_group_id": "news", "subscription_state": state, "email": email(n)}
        )
        expected[("news", "email", email(n))] = state
    return made


def replica_output_held(master) -> int:
    """Bytes the master holds for its replica that the sockets no longer take: what a
    `kill -9` of the master loses for certain."""
    return sum(int(client["omem"]) for client in master.client_list(_type="replica"))


@pytest.mark.parametrize("wait", ["1", "0"], ids=["REDIS_WAIT_REPLICAS=1", "no-wait"])
def test_a_master_killed_behind_a_lagging_replica(
    own_cluster, sim, processes, env, monkeypatch, wait
):
    env["REDIS_WAIT_REPLICAS"] = wait
    monkeypatch.setenv("REDIS_WAIT_REPLICAS", wait)
    reset_services()
    faults(sim, latency_ms=200)  # a drain of several seconds: the kill lands inside it
    processes.worker("w1", concurrency=8)
    processes.beat()
    acknowledged: dict[tuple[str, str, str], str] = {}
    sent = EnqueuedLog()
    enqueue_changes(sent.add(rows(0, 3 * CHUNK, acknowledged)))  # the replica is up
    master = own_cluster.master_of(Keys("braze-subs").pending)
    replica = own_cluster.shards()[master][0]
    node = own_cluster.node(master)
    refused: list[dict[str, str]] = []
    own_cluster.processes[replica].send_signal(signal.SIGSTOP)
    try:
        for chunk in range(3, 3 + MOST_CHUNKS):
            wanted: dict = {}
            batch = sent.add(rows(chunk * CHUNK, CHUNK, wanted))
            try:
                enqueue_changes(batch)
            except NotReplicated:
                refused = batch
                break
            acknowledged.update(wanted)
            if replica_output_held(node) > HELD_BYTES:
                break  # chunks beyond what the sockets hold: lost with the master
    finally:
        own_cluster.processes[master].send_signal(signal.SIGKILL)
        own_cluster.processes[master].wait(timeout=10)
        own_cluster.processes[replica].send_signal(signal.SIGCONT)
    wait_until(lambda: replica in own_cluster.shards(), timeout=60, what="the replica promoted")
    own_cluster.wait_healthy()
    wait_for(drained, timeout=240, what="the buffer to drain after the failover")
    delivered = sim_states(sim.url)
    lost = {key for key, state in acknowledged.items() if delivered.get(key) != state}
    assert_applied_in_order(sim.url, sent)
    if wait == "1":
        # The first call the stopped replica did not acknowledge was refused (the
        # producer would send it again); every acknowledged change was delivered.
        assert len(refused) == CHUNK
        assert len(acknowledged) == 3 * CHUNK
        assert not lost, f"{len(lost)} acknowledged changes lost"
        # The price: the promoted master has no replica now (the old master is gone),
        # so every enqueue is refused until one joins it.
        with pytest.raises(NotReplicated):
            enqueue_changes(rows(900_000, 1, {}))
    else:
        assert not refused and len(acknowledged) > 3 * CHUNK
        # Told "accepted", never delivered: what asynchronous replication loses.
        assert lost, "no acknowledged change was lost: the replica kept up after all"
