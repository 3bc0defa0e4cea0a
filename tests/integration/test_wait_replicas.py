"""WAIT-acknowledged enqueues (REDIS_WAIT_REPLICAS=1, README "State on a Redis Cluster",
"Failover"), on a real plain Redis with one replica (`redis-server --replicaof`, as under
Sentinel) and on the session's real 3-master, 3-replica cluster: every enqueue path (the
Python API, the record_change task, the CLI's enqueue and import, the HTTP API) issues
WAIT on the node that took the write and is acknowledged while the replica is up; with the
replica stopped (SIGSTOP, then SIGCONT) each one is refused in its own clear way."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis import Redis

from delivery.services import reset_services, services
from devtools.redis_replica import RedisWithReplica
from stores.keys import split_field
from stores.replication import NotReplicated, ReplicaWait, replicas_short
from tasks.bulk_import import ImportInterrupted, enqueue_file
from tasks.producer import enqueue_changes
from tasks.subscriptions import record_change
from tests.api_process import running_api
from tests.cli_runs import assert_one_line_error, run_cli
from tests.conftest import email


@dataclass
class Target:
    """Where the workspace's writes go (`master`), the replica that must acknowledge them,
    and on a cluster the other masters (which must see no WAIT of ours)."""

    url: str
    master: Redis
    replica: Redis
    pause: object
    resume: object
    others: list[Redis] = field(default_factory=list)


def wait_on(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    env["REDIS_WAIT_REPLICAS"] = "1"
    monkeypatch.setenv("REDIS_WAIT_REPLICAS", "1")
    reset_services()


@pytest.fixture
def pair(env, tmp_path, monkeypatch) -> Iterator[Target]:
    """A plain master and its replica of this test's own, REDIS_URL on the master."""
    nodes = RedisWithReplica(tmp_path / "pair").start()
    env["REDIS_URL"] = nodes.url
    monkeypatch.setenv("REDIS_URL", nodes.url)
    wait_on(monkeypatch, env)
    yield Target(nodes.url, nodes.master, nodes.replica, nodes.pause_replica, nodes.resume_replica)
    reset_services()
    nodes.stop()


@pytest.fixture
def on_cluster(redis_cluster, env, monkeypatch) -> Iterator[Target]:
    """The session's cluster; the replica paused is the one of the workspace's master."""
    wait_on(monkeypatch, env)
    master = redis_cluster.master_of(services().keys.pending)
    replica = redis_cluster.shards()[master][0]
    process = redis_cluster.processes[replica]

    def resume() -> None:
        process.send_signal(signal.SIGCONT)
        redis_cluster.wait_healthy()

    others = [redis_cluster.node(port) for port in redis_cluster.shards() if port != master]
    # A cluster replica answers reads (rather than MOVED) on a READONLY connection.
    reader = Redis(port=replica, socket_timeout=5, single_connection_client=True)
    reader.execute_command("READONLY")
    yield Target(
        redis_cluster.url,
        redis_cluster.node(master),
        reader,
        lambda: process.send_signal(signal.SIGSTOP),
        resume,
        others,
    )
    process.send_signal(signal.SIGCONT)  # whatever happened


def row(n: int, state: str = "subscribed") -> dict[str, str]:
    return {"subscription_group_id": "newsletter", "subscription_state": state, "email": email(n)}


def jsonl(path: Path, first: int, count: int) -> Path:
    path.write_text("".join(json.dumps(row(n)) + "\n" for n in range(first, first + count)))
    return path


def waits(node: Redis) -> int:
    return int(node.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def pending_on(node: Redis) -> int:
    return int(node.hlen(services().keys.pending))


def enqueue_cli(n: int):
    return run_cli("enqueue", "--group", "newsletter", "--state", "subscribed", "--email", email(n))


def each_path_is_acknowledged(target: Target, tmp_path: Path) -> None:
    before = waits(target.master)
    elsewhere = [waits(node) for node in target.others]
    assert enqueue_changes([row(n) for n in range(2500)]) == 2500  # 3 calls
    assert record_change(**row(2500))["state"] == "subscribed"
    assert enqueue_cli(2501).returncode == 0
    imported = run_cli("import", str(jsonl(tmp_path / "in.jsonl", 3000, 2500)))  # 3 calls
    assert imported.returncode == 0, imported.stderr
    # Each returned once the replica had it: it holds every change already.
    assert pending_on(target.replica) == 5002
    assert waits(target.master) - before >= 8  # one WAIT per call, on the writing node
    assert [waits(node) for node in target.others] == elsewhere
    key = services().keys.pending
    assert replicas_short(services().redis, key, ReplicaWait(1)) is None
    short = replicas_short(services().redis, key, ReplicaWait(2))
    assert short is not None and "has 1 replica(s) connected" in short


def each_path_is_refused_while_the_replica_is_stopped(target: Target, tmp_path: Path) -> None:
    assert enqueue_changes([row(0)]) == 1
    target.pause()  # type: ignore[operator]
    try:
        with pytest.raises(NotReplicated, match="REDIS_WAIT_REPLICAS=1: 0 replica"):
            enqueue_changes([row(1)])
        with pytest.raises(NotReplicated, match="REDIS_WAIT_TIMEOUT_MS=500"):
            record_change(**row(2))
        assert_one_line_error(enqueue_cli(3), "REDIS_WAIT_REPLICAS=1", "sending them again")
        imported = run_cli("import", str(jsonl(tmp_path / "in.jsonl", 10, 2500)))
        # One line after the progress bar's (as any import Redis stops), exit 2.
        assert imported.returncode == 2 and "Traceback" not in imported.stderr
        last = imported.stderr.strip().splitlines()[-1]
        assert last.startswith("braze-subs: ") and "NotReplicated: REDIS_WAIT_REPLICAS=1" in last
        assert "sending them again is safe" in last and last.endswith("--from-line 1"), last
    finally:
        target.resume()  # type: ignore[operator]
    # The refused writes may still be on the master (and reach the replica now): WAIT
    # refuses to vouch for them, it does not undo them. Sending again is acknowledged.
    assert enqueue_changes([row(1), row(2)]) == 2


def test_each_enqueue_path_is_acknowledged_by_the_replica(pair, tmp_path):
    each_path_is_acknowledged(pair, tmp_path)


def test_each_enqueue_path_is_acknowledged_on_the_cluster_by_the_slots_master(on_cluster, tmp_path):
    each_path_is_acknowledged(on_cluster, tmp_path)


def test_a_stopped_replica_refuses_each_enqueue_path_in_one_clear_way(pair, tmp_path):
    each_path_is_refused_while_the_replica_is_stopped(pair, tmp_path)


def test_a_stopped_replica_on_the_cluster_refuses_each_enqueue_path(on_cluster, tmp_path):
    each_path_is_refused_while_the_replica_is_stopped(on_cluster, tmp_path)


def test_without_the_setting_a_stopped_replica_goes_unnoticed(pair, monkeypatch, env):
    """Today's default (REDIS_WAIT_REPLICAS=0): the producer is told "accepted" whether or
    not the replica has the change, which is what a crash of the master can lose."""
    monkeypatch.setenv("REDIS_WAIT_REPLICAS", "0")
    reset_services()
    pair.pause()
    try:
        assert enqueue_changes([row(n) for n in range(10)]) == 10
        assert pending_on(pair.master) == 10
    finally:
        pair.resume()


def import_stopped_midway(target: Target, tmp_path: Path) -> None:
    """The replica stops after the import's first call was acknowledged: the import
    stops with the resume point after the acknowledged rows and before the first call
    that was not; resumed there once the replica is back, every row is in."""
    path = jsonl(tmp_path / "in.jsonl", 0, 10_000)
    paused: list[int] = []

    def progress(phase: str, done: int) -> None:
        if phase == "enqueuing" and done >= 1000 and not paused:
            target.pause()  # type: ignore[operator]
            paused.append(done)

    buffers = services().new_buffer
    try:
        with pytest.raises(ImportInterrupted, match="REDIS_WAIT_REPLICAS=1") as stopped:
            enqueue_file(path, lambda _w: buffers(), progress=progress, chunk_lines=1000)
    finally:
        target.resume()  # type: ignore[operator]
    line = int(str(stopped.value).rsplit("--from-line ", 1)[1])
    assert 1001 <= line <= 9001, stopped.value
    on_replica = {
        split_field(raw.decode())[2] for raw in target.replica.hkeys(services().keys.pending)
    }
    assert {email(n) for n in range(line - 1)} <= on_replica  # every row before the line
    result = enqueue_file(path, lambda _w: buffers(), from_line=line, chunk_lines=1000)
    assert result.rejected == 0
    assert pending_on(target.master) == 10_000


def test_an_import_stopped_midway_resumes_after_the_acknowledged_rows(pair, tmp_path):
    import_stopped_midway(pair, tmp_path)


def test_an_import_on_the_cluster_stopped_midway_resumes_after_the_acknowledged_rows(
    on_cluster, tmp_path
):
    import_stopped_midway(on_cluster, tmp_path)


def the_http_api_answers_503_while_the_replica_is_stopped(target: Target, tmp_path: Path):
    with running_api(target.url, tmp_path) as api:
        assert api.post([row(n) for n in range(100)]).status_code == 202
        assert pending_on(target.replica) == 100
        target.pause()  # type: ignore[operator]
        try:
            refused = api.post([row(n) for n in range(100, 200)])
        finally:
            target.resume()  # type: ignore[operator]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        message = refused.json()["error"]
        assert "\n" not in message and message.startswith("REDIS_WAIT_REPLICAS=1:"), message
        again = api.post([row(n) for n in range(100, 200)])
        assert again.status_code == 202, again.text
        assert pending_on(target.replica) == 200


def test_the_http_api_answers_503_while_the_replica_is_stopped(pair, tmp_path):
    the_http_api_answers_503_while_the_replica_is_stopped(pair, tmp_path)


def test_the_http_api_on_the_cluster_answers_503_while_the_replica_is_stopped(on_cluster, tmp_path):
    the_http_api_answers_503_while_the_replica_is_stopped(on_cluster, tmp_path)


def test_an_import_on_the_cluster_goes_to_the_workspaces_master(redis_cluster, tmp_path):
    """Without the setting too: the import's pipelined enqueue takes its connection from
    the master of the workspace's slot (it asked RedisCluster for a connection pool it
    does not have, and `braze-subs import` failed on a cluster)."""
    imported = run_cli("import", str(jsonl(tmp_path / "in.jsonl", 0, 2500)))
    assert imported.returncode == 0, imported.stderr[-2000:]
    master = redis_cluster.node(redis_cluster.master_of(services().keys.pending))
    assert pending_on(master) == 2500


def test_acknowledged_enqueues_follow_a_failover_on_the_cluster(on_cluster, redis_cluster):
    """The WAIT goes to the master this process's slot map names; after a failover that
    master answers MOVED, and the map is learnt again (fails with MovedError without)."""
    assert enqueue_changes([row(0)]) == 1
    old = redis_cluster.master_of(services().keys.pending)
    new = redis_cluster.failover(old)
    assert enqueue_changes([row(1)]) == 1  # acknowledged by the old master, a replica now
    assert pending_on(redis_cluster.node(new)) == 2


def test_the_api_names_a_wait_no_enqueue_can_meet_at_start(pair, tmp_path):
    """REDIS_WAIT_REPLICAS=2 with one replica: one WARNING line as the API starts (every
    enqueue would be refused), and the first request's 503 says why."""
    with running_api(pair.url, tmp_path, REDIS_WAIT_REPLICAS="2") as api:
        refused = api.post(row(1))
        assert refused.status_code == 503
        assert refused.json()["error"].startswith("REDIS_WAIT_REPLICAS=2: 1 replica(s)")
        warned = [line for line in api.log.read_text().splitlines() if "has 1 replica(s)" in line]
    assert len(warned) == 1 and "REDIS_WAIT_REPLICAS=2" in warned[0], warned


def test_the_api_waits_out_a_wait_timeout_longer_than_its_redis_timeout(pair, tmp_path):
    """REDIS_WAIT_TIMEOUT_MS (the setting under test) at 6 s, past the API's 5 s Redis
    timeout: the refusal is the replicas', not a timeout of the connection."""
    with running_api(pair.url, tmp_path, REDIS_WAIT_TIMEOUT_MS="6000") as api:
        pair.pause()
        try:
            refused = api.post(row(1))
        finally:
            pair.resume()
    assert refused.status_code == 503
    assert refused.json()["error"].startswith("REDIS_WAIT_REPLICAS=1: 0 replica(s)"), refused.text
