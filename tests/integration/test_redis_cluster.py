"""braze-subs' state on a real Redis Cluster (issue 24; README "State on a Redis Cluster"):
3 masters and 3 replicas from `redis-server --cluster-enabled yes` (devtools/redis_cluster.py),
REDIS_URL=redis+cluster://, the broker a plain redis-server (BROKER_URL).

Two workspaces (`us`, `eu`) whose hash tags live on different masters run the stores' main
operations: enqueue, take, claim, post (finish), dead letter, replay, purge, history, forget
and the limiter, each workspace's keys all in its own slot. The scripts survive a node
that forgot them (SCRIPT FLUSH, as on a replica promoted by a failover)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.cluster import RedisCluster

from core.changes import parse_change
from core.planning import plan_batches
from delivery.services import services
from stores.clock import server_time_ms
from stores.dead_letters import DeadLetters
from stores.erasure import forget
from stores.history import ConsentHistory
from tests.cli_runs import assert_one_line_error, run_cli, run_real
from tests.conftest import TwoWorkspaces, email, take_each
from tests.sim_control import sim_states

WORKSPACES = ("us", "eu")


@pytest.fixture
def cluster(redis_cluster, workspaces_env):
    """Both workspaces (us on `sim`, eu on `sim_b`) with their state on the cluster."""
    redis_cluster.sims = workspaces_env.sims
    return redis_cluster


def change(group: str, value: str, state: str = "subscribed") -> Any:
    return parse_change(
        {"subscription_group_id": group, "subscription_state": state, "email": value}
    )


def take_one_batch(workspace: str, changes: list) -> str:
    buffer = services(workspace).buffer
    buffer.enqueue(changes)
    now = server_time_ms(buffer.client)
    wanted = {(c.group_id, c.kind, c.value) for c in changes}
    due = [c for c in buffer.read_due(now, 1000)[0] if (c.group_id, c.kind, c.value) in wanted]
    plan = plan_batches(due, now_ms=now, max_identifiers=50)
    [(batch_id, size)] = take_each(buffer, plan, 60_000)
    assert size == len(changes)
    return batch_id


def keys_on_node(cluster, port: int) -> set[str]:
    return {name.decode() for name in cluster.node(port).scan_iter(count=1000)}


def test_the_fixture_is_three_masters_each_with_a_synchronised_replica(redis_cluster):
    shards = redis_cluster.shards()
    assert len(shards) == 3 and all(len(replicas) == 1 for replicas in shards.values())
    for port in redis_cluster.alive_ports():
        assert redis_cluster.info(port)["cluster_state"] == "ok"


def test_the_two_workspaces_hash_tags_live_on_different_masters(cluster):
    us, eu = (services(name).keys for name in WORKSPACES)
    client = services("us").redis
    assert isinstance(client, RedisCluster)
    slots = {name: client.keyslot(services(name).keys.pending) for name in WORKSPACES}
    assert slots["us"] != slots["eu"]
    assert cluster.master_of(us.pending) != cluster.master_of(eu.pending)
    # Every key of a workspace is in its tag's slot (CLUSTER KEYSLOT, asked of a node).
    node = cluster.node(cluster.alive_ports()[0])
    for keys in (us, eu):
        names = [keys.pending, keys.due, keys.batch("b"), keys.history("email", email(1))]
        found = {int(node.execute_command("CLUSTER KEYSLOT", name)) for name in names}
        assert found == {client.keyslot(keys.pending)}


def test_each_workspace_delivers_on_its_own_master(cluster):
    for name in WORKSPACES:
        group = cluster_group(cluster, name)
        batch_id = take_one_batch(name, [change(group, email(n)) for n in range(3)])
        report = services(name).poster().post(batch_id)
        assert report.status.value == "delivered", report
        assert sim_states(cluster.sims[name]) == {
            (group, "email", email(n)): "subscribed" for n in range(3)
        }
        master = cluster.master_of(services(name).keys.pending)
        on_node = keys_on_node(cluster, master)
        tag = services(name).keys.tag
        assert any(key.startswith(tag) for key in on_node)
        others = [port for port in cluster.shards() if port != master]
        elsewhere = {key for port in others for key in keys_on_node(cluster, port)}
        assert not any(key.startswith(tag) for key in elsewhere)


def test_dead_letter_replay_purge_and_history_per_workspace(cluster):
    for name in WORKSPACES:
        group = cluster_group(cluster, name)
        found = services(name)
        batch_id = take_one_batch(name, [change(group, email(1)), change(group, email(2))])
        found.batches.claim(batch_id, "t", 60_000)
        assert found.batches.dead_letter(batch_id, "t", "refused").members == 2
        store = DeadLetters(found.redis, found.keys)
        [entry] = store.list()
        assert store.replay([entry.id]).requeued == 2
        assert found.redis.hlen(found.keys.pending) == 2
        batch_id = take_one_batch(name, [change(group, email(1), "unsubscribed")])
        found.batches.claim(batch_id, "t", 60_000)
        found.batches.dead_letter(batch_id, "t", "refused")
        assert store.purge(None).entries == 1
        history = ConsentHistory(found.redis, found.keys)
        events = [e.event for e in history.events("email", email(1))]
        assert "enqueued" in events and "dead_lettered" in events
    # Neither workspace saw the other's entries.
    assert all(not DeadLetters(services(n).redis, services(n).keys).list() for n in WORKSPACES)


def test_forget_erases_an_identifier_from_its_workspace_slot(cluster):
    for name in WORKSPACES:
        group = cluster_group(cluster, name)
        found = services(name)
        take_one_batch(name, [change(group, email(7))])
        found.buffer.enqueue([change(group, email(7), "unsubscribed")])
        report = forget(found.redis, found.keys, "email", email(7), grace_ms=60_000)
        assert report.pending == 1 and report.in_flight == 1
        assert ConsentHistory(found.redis, found.keys).events("email", email(7))[-1].event == (
            "erased"
        )
        assert found.redis.hlen(found.keys.pending) == 0


def test_the_limiter_and_its_state_read_on_the_budgets_master(cluster):
    for name in WORKSPACES:
        limiter = services(name).limiter
        assert limiter.acquire().granted
        before = limiter.state().tokens_left
        assert all(limiter.acquire().granted for _ in range(40))
        # The budget spent, read with the clock of the node holding it (tokens come back
        # one per interval, 20 ms at the default 100 per 2 s: a loaded machine sees some).
        assert limiter.state().tokens_left < before
        assert limiter.paused_for() == 0.0
        assert limiter.pause_until(server_time_ms(services(name).redis) / 1000 + 30, "test")
        assert 25 < limiter.paused_for() <= 30


def test_the_coalescers_clock_is_the_time_of_its_workspaces_master(cluster):
    """On a cluster TIME goes to the master whose scripts wrote the due times the tick
    compares it with (nodes on different hosts keep different clocks), not to whichever
    node the client picks: counted in each master's INFO commandstats."""

    def time_calls() -> dict[int, int]:
        stats = {port: cluster.node(port).info("commandstats") for port in cluster.shards()}
        return {
            port: int(found.get("cmdstat_time", {}).get("calls", 0))
            for port, found in stats.items()
        }

    for name in WORKSPACES:
        found = services(name)
        key = found.keys.pending
        before = time_calls()
        for _ in range(25):
            server_time_ms(found.redis, near=key)
        after = time_calls()
        grown = {port: after[port] - before[port] for port in after}
        assert grown[cluster.master_of(key)] >= 25, grown
        assert sum(grown.values()) - grown[cluster.master_of(key)] < 25, grown


def test_scripts_run_on_a_node_that_forgot_them(cluster):
    """A replica promoted by a failover has an empty script cache (Redis does not
    replicate it): a direct call reloads it (NOSCRIPT -> SCRIPT LOAD on every master), a
    call queued on a pipeline is sent with its source (no NOSCRIPT mid-pipeline)."""
    name = "us"
    group = cluster_group(cluster, name)
    services(name).buffer.enqueue([change(group, email(1))])
    for master in cluster.shards():
        cluster.node(master).script_flush()
    services(name).buffer.enqueue([change(group, email(2))])  # EVALSHA, NOSCRIPT, reload
    for master in cluster.shards():
        cluster.node(master).script_flush()
    take_one_batch(name, [change(group, email(3))])  # take_batch on a cluster pipeline
    keys = services(name).keys
    assert services(name).redis.hlen(keys.pending) == 2
    assert services(name).redis.hlen(keys.inflight) == 1


def cluster_group(cluster, workspace: str) -> str:
    return TwoWorkspaces.groups[workspace][0]


# --------------------------------------------------------------------------------------
# Reads that span the workspaces, so the masters: status, the exporter, dlq list
# --------------------------------------------------------------------------------------


def test_status_exporter_and_dlq_read_every_workspace_across_the_masters(cluster, tmp_path):
    """RedisCluster splits a pipeline without a transaction by node, so the admin helpers'
    per-workspace reads run unchanged; the persistence check reads every node."""
    from tests.integration.test_admin_workspaces import EU, US, dead_letter, exporter, scrape
    from tests.integration.test_admin_workspaces import enqueue as enqueue_rows
    from tests.integration.test_admin_workspaces import row as row_of

    dead_letter("eu", EU, [email(90), email(91)])
    enqueue_rows("us", [row_of(US, email(n)) for n in range(2)])
    enqueue_rows("eu", [row_of(EU, email(n)) for n in range(3)])
    result = run_cli("status", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["pending"] == 5
    assert {name: shown["workspaces"][name]["pending"] for name in WORKSPACES} == {
        "us": 2,
        "eu": 3,
    }
    # The fixture's nodes run without persistence: every node named once per finding.
    findings = " ".join(shown["redis_findings"])
    assert "persistence is off" in findings
    assert all(f"127.0.0.1:{port}" in findings for port in cluster.alive_ports()), findings
    listed = run_cli("dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert "eu" in listed.stdout
    with exporter(tmp_path) as url:
        found = scrape(url)
    assert found["braze_subs_buffer_pending"] == {
        (("workspace", "us"),): 2,
        (("workspace", "eu"),): 3,
    }
    assert found["braze_subs_dead_letter_identifiers"][(("workspace", "eu"),)] == 2


def test_an_unreachable_cluster_is_one_line_without_the_password():
    """RedisCluster asks a seed for the slot map as it is made: no seed answering is the
    one line every command prints for an unreachable Redis, not redis-py's traceback."""
    environ = {
        "REDIS_URL": "redis+cluster://:s3cret-pw@127.0.0.1:1,127.0.0.1:2",
        "BROKER_URL": "redis://127.0.0.1:3/0",
        "BRAZE_API_KEY": "sim-key",
        "BRAZE_REST_ENDPOINT": "http://127.0.0.1:4",
    }
    result = run_real("status", extra_env=environ, timeout=60)
    assert result.returncode != 0
    assert_one_line_error(result, "cannot reach Redis at redis+cluster://:***@127.0.0.1:1")
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_import_enqueues_a_file_on_the_cluster(redis_cluster, tmp_path):
    """`braze-subs import FILE` with REDIS_URL=redis+cluster://, as an operator runs it."""
    path = tmp_path / "changes.jsonl"
    rows = [
        {"subscription_group_id": "news", "subscription_state": "subscribed", "email": email(n)}
        for n in range(20)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_real("import", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20 changes enqueued" in result.stdout + result.stderr
