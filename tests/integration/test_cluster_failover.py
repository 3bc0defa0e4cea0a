"""A post caught by a Redis Cluster failover (issue 24): the master of the workspace's slot
dies while the request is on the wire, so the post cannot record Braze's answer and has to
give its batch back; the slot has no master until its replica is promoted. The give-back
is tried again until the new master answers, so the batch waits in the schedule seconds
after the promotion instead of staying claimed until its lease runs out (60 s, then the
tick's take-back). A real 3 + 3 cluster, a real poster in this process, the simulator over
HTTP; every setting at its default."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from delivery.services import services
from stores.connection import REDIS_UNAVAILABLE
from tests.conftest import email, wait_for
from tests.integration.test_poster import email_batch, record
from tests.sim_control import faults, sim_stats

pytestmark = pytest.mark.slow

# How long the slot stays without a master after the kill: Redis's default
# cluster-node-timeout (15 s), the least a real failover after a crash takes. It outlasts
# redis-py's own retries of a command (10 tries, waits doubling from 10 ms up to 1 s: a few
# seconds), so the finish and a give-back tried once both fail inside it. The outage is
# the scenario, not a wait for a condition.
OUTAGE_SECONDS = 15.0

# The bound: promotion -> the batch waits in the schedule. The give-back's backoff is at
# most 1 s a try (the rest is a loaded machine's slack); the lease it no longer waits for is
# 60 s.
GIVEN_BACK_WITHIN_SECONDS = 10.0


def replicated(cluster: Any, master: int) -> None:
    """Until the master's replica has every write made so far (WAIT counts the writes of
    its own connection, which come after all the others in the replication stream): the
    batch, its claim and its fence survive the kill, so what the test sees after it is the
    failover's outage, not asynchronous replication's loss (README, "Failover")."""
    node = cluster.node(master)
    node.set(f"{services().keys.tag}:test-wait", "1")
    assert node.execute_command("WAIT", 1, 10_000) >= 1


def test_a_post_caught_by_a_failover_gives_its_batch_back_once_the_new_master_is_up(
    own_cluster, sim, default_env
):
    found = services()
    keys, client = found.keys, found.redis
    batch_id = email_batch([email(n) for n in range(3)])
    master = own_cluster.master_of(keys.pending)
    faults(sim, hold=True)  # Braze's answer waits until the master is dead
    poster = found.poster()
    raised: list[BaseException] = []

    def post() -> Any:
        try:
            poster.post(batch_id)
        except BaseException as exc:  # the test reads it
            raised.append(exc)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    wait_for(lambda: client.hexists(keys.fences, batch_id), what="the request sent (fenced)")
    wait_for(lambda: sim_stats(sim.url)["requests_ok"] == 1, what="Braze's 201, held")
    replicated(own_cluster, master)
    replicas = own_cluster.kill_master_unreplaced(master)
    killed = time.monotonic()
    faults(sim, hold=False)  # the 201 arrives; the post cannot record it (connection refused)
    # The outage goes on: the post's give-back cannot reach the slot either.
    wait_for(lambda: time.monotonic() >= killed + OUTAGE_SECONDS, timeout=OUTAGE_SECONDS + 5)
    promoted = own_cluster.promote(replicas[0])
    assert own_cluster.master_of(keys.pending) == promoted
    promoted_at = time.monotonic()

    def waiting() -> bool:
        return (
            client.zscore(keys.schedule, batch_id) is not None
            and client.zscore(keys.claims, batch_id) is None
        )

    wait_for(
        waiting,
        timeout=GIVEN_BACK_WITHIN_SECONDS,
        interval=0.02,
        what="the batch given back into the schedule after the promotion",
    )
    given_back = time.monotonic() - promoted_at
    thread.join(timeout=30)
    assert not thread.is_alive()
    # The task still fails with the error that stopped it (Celery logs it); its batch is
    # given back: a retry, its attempt counted (Braze's answer was never recorded).
    assert raised and isinstance(raised[0], REDIS_UNAVAILABLE), raised
    assert client.hget(keys.schedule_reasons, batch_id) == b"retry"
    saved = record(client, batch_id)
    assert saved is not None and saved["attempts"] == 1
    assert client.hget(keys.claim_tokens, batch_id) is None
    print(f"promotion -> given back: {given_back:.2f} s")


def test_a_claim_during_a_failover_goes_through_once_the_new_master_is_up(
    own_cluster, sim, default_env
):
    """A post task whose message arrives while the slot has no master: its claim is tried
    again until the new master answers, and the batch is posted then. Before, the claim
    raised, the task ended with the message taken, and the batch waited for the sweep
    (BATCH_REDISPATCH_SECONDS, 120 s)."""
    found = services()
    keys, client = found.keys, found.redis
    batch_id = email_batch([email(n) for n in range(3)])
    poster = found.poster()
    poster.liveness.ensure_started()  # a worker that was already running
    master = own_cluster.master_of(keys.pending)
    replicated(own_cluster, master)
    replicas = own_cluster.kill_master_unreplaced(master)
    killed = time.monotonic()
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(poster.post(batch_id)), daemon=True)
    thread.start()
    wait_for(lambda: time.monotonic() >= killed + OUTAGE_SECONDS, timeout=OUTAGE_SECONDS + 5)
    assert sim_stats(sim.url)["requests_total"] == 0
    promoted = own_cluster.promote(replicas[0])
    assert own_cluster.master_of(keys.pending) == promoted
    promoted_at = time.monotonic()
    wait_for(
        lambda: outcome,
        timeout=GIVEN_BACK_WITHIN_SECONDS,
        interval=0.02,
        what="the post to claim and deliver after the promotion",
    )
    print(f"promotion -> delivered: {time.monotonic() - promoted_at:.2f} s")
    assert outcome[0].status == "delivered"
    assert record(client, batch_id) is None
    assert sim_stats(sim.url)["requests_ok"] == 1
