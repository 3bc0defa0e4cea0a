"""End to end on a Redis Cluster (README "State on a Redis Cluster"): braze-subs' state on
a real 3-master, 3-replica cluster (REDIS_URL=redis+cluster://), Celery's broker on a
separate plain redis-server (BROKER_URL), real worker and beat processes, the simulator
over HTTP; the order oracle at the end. Then a master fails over mid-drain."""

from __future__ import annotations

import random
import time

import pytest

from delivery.services import services
from stores.keys import Keys
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, identifier, wait_for
from tests.sim_control import faults, sim_states, sim_stats

pytestmark = pytest.mark.slow

# promotion -> drained after a master's kill -9 (what is left of the drain, and the posts the
# outage caught given back): well under the claim's lease (60 s) and the sweep (120 s).
# The product recovers what a failover leaves without them (README "State on a Redis
# Cluster"), so the bound is the product's, at default timings: 2.5-4.7 s measured in 32
# runs under the other engineers' load (4-10), none above. It once timed out in CI and 1
# run in 10 here: a cut's take ran on the master, its reply was lost with it, and redis-py
# sent the pipeline again, which answered "nothing taken"; the batches, with their
# members' locks, got no message until the sweep. take_batch.lua now answers a second run
# with what the first took (integration/test_buffer.py), as dispatch_due.lua and
# sweep_batches.lua do; and an end lost with the master is found by a beat that rode the
# outage out (in 1 of the 15 last runs, no beat failed nor was anything taken back: the
# lease, 60 s, would have freed it; integration/test_batches.py).
FAILOVER_DRAIN_BOUND_SECONDS = 45

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
    # Every key any script or command wrote carries the workspace's hash tag: keys a
    # script builds itself (history, subjects, batch records) landed in the tag's slot.
    tag = Keys("braze-subs").tag
    written = {
        name.decode()
        for master in redis_cluster.shards()
        for name in redis_cluster.node(master).scan_iter(count=1000)
    }
    assert written and all(name.startswith(tag + ":") for name in written), sorted(written)[:5]
    assert any(":history:" in name for name in written)


def replicated(cluster, master: int) -> None:
    """Until the master's replica has every write made so far (WAIT counts the writes of
    its own connection, which come after all the others in the replication stream)."""
    node = cluster.node(master)
    node.set(f"{Keys('braze-subs').tag}:test-wait", "1")
    assert node.execute_command("WAIT", 1, 10_000) >= 1


def mid_drain(sim, answered: int) -> None:
    wait_for(
        lambda: sim_stats(sim.url)["requests_ok"] > answered and pending_or_in_flight(),
        timeout=60,
        what="the drain under way",
    )


def pending_or_in_flight() -> bool:
    return not drained()


def what_is_left() -> dict[str, object]:
    """Batch ids and counts only (no identifier): the batches set, which of them have a
    record, a claim token or a place in the schedule, the batch ids the in-flight locks
    name, and the pending changes and due sets' sizes."""
    found = services()
    r, k = found.redis, found.keys
    batches = [b.decode() for b in r.zrange(k.batches, 0, -1)]
    locks = [v.decode() for v in r.hvals(k.inflight)]
    return {
        "batches": {
            b: {
                "record": r.exists(k.batch(b)) == 1,
                "claimed": r.hexists(k.claim_tokens, b),
                "scheduled": r.zscore(k.schedule, b) is not None,
            }
            for b in batches
        },
        "locks_by_batch": {b: locks.count(b) for b in set(locks)},
        "pending": r.hlen(k.pending),
        "due": r.zcard(k.due),
        "due_live": r.zcard(k.due_live),
    }


def test_a_coordinated_failover_mid_drain_loses_nothing(own_cluster, sim, processes):
    """CLUSTER FAILOVER on the replica of the master holding the workspace: the replica
    catches up before it takes over, so nothing is lost; the clients follow the MOVED and
    the new slot map. Waves keep flipping identifiers across the failover."""
    rng = random.Random(241)
    faults(sim, latency_ms=1000)  # a drain of several seconds: the failover lands inside it
    processes.worker("w1", concurrency=8)
    processes.beat()
    expected: dict[tuple[str, str, str], str] = {}
    sent = EnqueuedLog()
    enqueue_changes(sent.add(changes(rng, 1000, expected)))
    mid_drain(sim, 0)
    master = own_cluster.master_of(Keys("braze-subs").pending)
    new_master = own_cluster.failover(master)
    assert own_cluster.master_of(Keys("braze-subs").pending) == new_master
    answered = sim_stats(sim.url)["requests_ok"]
    assert pending_or_in_flight()  # the failover came mid-drain
    enqueue_changes(sent.add(changes(rng, 1000, expected)))
    mid_drain(sim, answered)
    enqueue_changes(sent.add(changes(rng, 1000, expected)))
    wait_for(drained, timeout=120, what="the buffer to drain")
    assert sim_states(sim.url) == expected
    assert_applied_in_order(sim.url, sent)
    for port in (master, new_master):  # both lived through it
        assert own_cluster.processes[port].poll() is None


def test_a_master_killed_mid_drain_every_identifier_ends_in_its_last_state(
    own_cluster, sim, processes
):
    """kill -9 of the master holding the workspace mid-drain; its replica is promoted
    (cluster-node-timeout 2 s here). Replication is asynchronous: what the master wrote
    in its last moments and had not passed on is lost — here the pipeline's own
    bookkeeping (takes, claims, finishes), which the claims, the heartbeat's take-back and
    the sweep make good by posting again. The changes themselves were replicated before
    the kill (WAIT), as README says to do for enqueues that must survive it."""
    rng = random.Random(242)
    faults(sim, latency_ms=1000)  # a drain of several seconds: the kill lands inside it
    processes.worker("w1", concurrency=8)
    processes.beat()
    expected: dict[tuple[str, str, str], str] = {}
    sent = EnqueuedLog()
    for _wave in range(3):
        enqueue_changes(sent.add(changes(rng, 1000, expected)))
    master = own_cluster.master_of(Keys("braze-subs").pending)
    replicated(own_cluster, master)
    mid_drain(sim, 0)
    promoted = own_cluster.kill_master(master)
    promoted_at = time.monotonic()
    assert own_cluster.master_of(Keys("braze-subs").pending) == promoted
    assert pending_or_in_flight()  # the kill came mid-drain
    answered = sim_stats(sim.url)["requests_ok"]
    # Posts the outage caught give their batches back once the new master answers
    # (delivery/poster.py `_until_answered`), so the drain goes on at once: before, such
    # a batch stayed claimed until its lease ran out (60 s) or its message was swept
    # (120 s), and this drain took 55-174 s.
    try:
        wait_for(
            drained,
            timeout=FAILOVER_DRAIN_BOUND_SECONDS,
            what="the buffer to drain after the failover",
        )
    except AssertionError as exc:  # say what was left (ids and counts, no identifier)
        raise AssertionError(f"{exc}; left: {what_is_left()}") from None
    print(f"promotion -> drained: {time.monotonic() - promoted_at:.1f} s")
    assert sim_stats(sim.url)["requests_ok"] > answered  # the drain went on on the replica
    assert sim_states(sim.url) == expected
    assert_applied_in_order(sim.url, sent)


def test_two_workspaces_on_different_masters_drain_through_a_failover_of_one(
    redis_cluster, workspaces_env, processes
):
    """Both workspaces of BRAZE_WORKSPACES_FILE on the cluster, their tags on different
    masters; a real worker and beat drain them, and mid-drain the master holding `us`
    hands over to its replica (CLUSTER FAILOVER) while `eu`'s master is untouched. Each
    simulator ends with exactly its workspace's last states, in order (oracle)."""
    from tests.e2e.test_workspaces import drained as workspace_drained
    from tests.e2e.test_workspaces import enqueue_mixed, final_states, keys

    masters = {name: redis_cluster.master_of(keys(name).pending) for name in ("us", "eu")}
    assert masters["us"] != masters["eu"]
    for sim in workspaces_env.sims.values():
        faults(sim, latency_ms=1000)  # a drain of several seconds: the failover lands inside
    processes.worker("w1", concurrency=8)
    processes.beat()
    client = services("us").redis
    rng = random.Random(2423)
    sent = {"us": EnqueuedLog(), "eu": EnqueuedLog()}
    for _round in range(3):
        enqueue_mixed(rng, sent, 200)
    wait_for(
        lambda: sim_stats(workspaces_env.sims["us"])["requests_ok"] > 0,
        timeout=60,
        what="us's drain under way",
    )
    new_master = redis_cluster.failover(masters["us"])
    assert redis_cluster.master_of(keys("us").pending) == new_master
    assert redis_cluster.master_of(keys("eu").pending) == masters["eu"]
    assert not workspace_drained(client, "us")  # the failover came mid-drain
    enqueue_mixed(rng, sent, 200)
    for workspace, sim in workspaces_env.sims.items():
        wait_for(
            lambda w=workspace: workspace_drained(client, w),
            timeout=120,
            what=f"{workspace} drained",
        )
        wait_for(
            lambda w=workspace, s=sim: sim_states(s) == final_states(sent[w]),
            timeout=10,
            what=f"{workspace}'s simulator to hold exactly its changes",
        )
        assert sim_stats(sim)["unauthorized"] == 0
        assert_applied_in_order(sim.url, sent[workspace])
