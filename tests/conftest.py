"""Shared fixtures: a real redis-server (pytest-redis, free port), the Braze simulator over
real HTTP, and real Celery worker and beat processes.

Unit tests use none of these. Integration tests take `env`, which points the settings of
this process (and of any process started with `processes`) at the session's Redis and
simulator, and flushes Redis afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from redis import Redis

from core.changes import Lane, parse_change
from core.planning import PlannedBatch, plan_batches
from delivery.services import reset_services, services
from devtools.processes import CeleryProcess, ProcessGroup, wait_until
from devtools.rabbitmq import RabbitMQ
from devtools.rabbitmq import unavailable as rabbitmq_unavailable
from devtools.redis_cluster import RedisCluster
from devtools.redis_cluster import unavailable as redis_cluster_unavailable
from simulator import SimulatorConfig, SimulatorServer
from simulator.order_check import Enqueued, Key, applied_from_document, check_order
from simulator.order_check import enqueued_from_rows as rows_by_key
from stores.buffer import Buffer
from stores.clock import server_time_ms

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("unit", "integration", "e2e")
SIM_KEY = "sim-key"
SIM_KEY_B = "sim-key-b"  # the second simulator's (`second_simulator`, workspace eu)

# Settings every integration test starts from: a fast coalescer, short linger and backoff.
BASE_ENV = {
    "BRAZE_API_KEY": SIM_KEY,
    "COALESCE_INTERVAL_SECONDS": "0.2",
    "BATCH_LINGER_SECONDS": "0.3",
    "RETRY_BACKOFF_BASE_SECONDS": "0.1",
    "RETRY_BACKOFF_MAX_SECONDS": "1",
    "CREDENTIALS_PROBE_SECONDS": "1",
    "LOG_LEVEL": "INFO",
}


def cut_one_batch(rows: list[dict[str, Any]], lane: Lane = Lane.BULK) -> str:
    """Enqueue the rows (the services' settings) and take them into one batch of `lane`,
    as the coalescer's tick would; returns its id."""
    buffer: Buffer = services().buffer
    buffer.enqueue([parse_change(r) for r in rows], lane=lane)
    now = server_time_ms(buffer.client)
    changes = buffer.read_due(now, 1000)[0]
    [batch] = plan_batches(changes, now_ms=now, max_identifiers=50)
    [[(batch_id, _size)]] = buffer.take([[batch]], 60_000, lane)
    return batch_id


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    try:
        return wait_until(
            condition, timeout=timeout, what=what or str(condition), interval=interval
        )
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def email(n: int) -> str:
    """A valid, distinct email address for test data."""
    return f"user{n}@example.com"


def identifier(kind: str, n: int) -> str:
    """A valid, distinct identifier of the given kind for test data."""
    if kind == "email":
        return email(n)
    if kind == "phone":
        return f"+1415555{n:04d}"
    return f"user-{n}"


class EnqueuedLog(dict[Key, list[Enqueued]]):
    """What a test enqueued, per (group, kind, value) in enqueue order: the order oracle's
    input. `add(rows)` records import-format rows (values spelled as posted, i.e. already
    normalised) and returns them, so a test writes `enqueue_changes(sent.add(rows))`."""

    def add(self, rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        listed = list(rows)
        for key, changes in rows_by_key(listed).items():
            self.setdefault(key, []).extend(changes)
        return listed


def order_violations(
    sim_url: str, enqueued: Mapping[Key, list[Enqueued]], *, allow_repeats: bool = True
) -> list[str]:
    """The order oracle against the simulator's `/_sim/applied` log: one line per key whose
    applied states are not a subsequence of what was enqueued for it (masked identifier and
    the two states). Refuses an incomplete log."""
    document = httpx.get(f"{sim_url}/_sim/applied", timeout=60).json()
    applied = applied_from_document(document)
    return [str(v) for v in check_order(enqueued, applied, allow_repeats=allow_repeats)]


def assert_applied_in_order(
    sim_url: str, enqueued: Mapping[Key, list[Enqueued]], *, allow_repeats: bool = True
) -> None:
    """No identifier received an older state after a newer one (and nothing never enqueued
    was applied): the end-of-test check of every end-to-end and fault test."""
    violations = order_violations(sim_url, enqueued, allow_repeats=allow_repeats)
    shown = "\n".join(violations[:20])
    assert not violations, f"{len(violations)} key(s) applied out of order:\n{shown}"


def come_due(*batch_ids: str) -> list[str]:
    """What the coalescer's tick does once a waiting batch's time has come, without waiting
    for it: make it due now and take it out of the schedule (its message would be sent).
    Returns the ids taken; the caller then posts them, as a worker would."""
    found = services()
    for batch_id in batch_ids:
        found.redis.zadd(found.keys.schedule, {batch_id: 0}, xx=True)
    return found.batches.dispatch_due(1000, 120_000)


def turn_a_moment_off(ms: int = 300) -> None:
    """Promise the rate budget `ms` ahead: the next post's turn is granted with a short
    wait, so its claim does not fence the batch (claim_batch.lua fences only a turn for
    now; issue 26) and the poster fences it right before the first byte (fence_batch.lua):
    for tests of what may happen between the claim and that fence."""
    found = services()
    now = float(found.redis.time()[0]) * 1000 + float(found.redis.time()[1]) / 1000
    found.redis.hset(found.limiter.key, "tat", now + found.limiter.budget.tolerance_ms + ms)


def drained() -> bool:
    """Nothing pending, nothing in flight, no batch left: the pipeline has finished."""
    from admin.status import read_status
    from delivery.services import services

    found = services()
    status = read_status(found.redis, found.keys)
    return status.pending == 0 and status.in_flight == 0 and status.batches_in_flight == 0


def take_each(
    buffer: Buffer, plan: list[PlannedBatch], redispatch_ms: int
) -> list[tuple[str, int]]:
    """Take planned batches, each in a pack of its own; (batch id, members taken) each."""
    return [
        pair for pack in buffer.take([[batch] for batch in plan], redispatch_ms) for pair in pack
    ]


@pytest.fixture(scope="session")
def redis_url(redis_proc: Any) -> str:
    return f"redis://{redis_proc.host}:{redis_proc.port}/0"


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorServer]:
    server = SimulatorServer(SimulatorConfig(api_keys={SIM_KEY}, auto_groups=True))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sim(simulator: SimulatorServer) -> Iterator[SimulatorServer]:
    httpx.post(f"{simulator.url}/_sim/reset").raise_for_status()
    yield simulator
    httpx.post(f"{simulator.url}/_sim/reset").raise_for_status()


@pytest.fixture(scope="session")
def second_simulator() -> Iterator[SimulatorServer]:
    """Another simulator instance (another Braze workspace: its own key, budget, state)."""
    server = SimulatorServer(SimulatorConfig(api_keys={SIM_KEY_B}, auto_groups=True))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sim_b(second_simulator: SimulatorServer) -> Iterator[SimulatorServer]:
    httpx.post(f"{second_simulator.url}/_sim/reset").raise_for_status()
    yield second_simulator
    httpx.post(f"{second_simulator.url}/_sim/reset").raise_for_status()


class TwoWorkspaces(dict[str, str]):
    """`env` with BRAZE_WORKSPACES_FILE naming two workspaces, `us` on `sim` (key SIM_KEY)
    and `eu` on `sim_b` (SIM_KEY_B), each owning its `groups`; keys from the variables
    BRAZE_KEY_US / BRAZE_KEY_EU; BRAZE_API_KEY and BRAZE_REST_ENDPOINT unset."""

    file: Path
    names: ClassVar[tuple[str, str]] = ("us", "eu")
    groups: ClassVar[Mapping[str, tuple[str, str]]] = {
        "us": ("us-email", "us-sms"),
        "eu": ("eu-email", "eu-sms"),
    }
    keys: ClassVar[Mapping[str, str]] = {"us": SIM_KEY, "eu": SIM_KEY_B}
    sims: dict[str, SimulatorServer]

    def write(self, **fields: Mapping[str, Any]) -> None:
        """(Re)write the file; `us={"rate_limit": 40}` adds fields to a workspace's table."""
        tables = []
        for name in self.names:
            table = {
                "rest_endpoint": self.sims[name].url,
                "api_key_env": f"BRAZE_KEY_{name.upper()}",
                "groups": list(self.groups[name]),
                **fields.get(name, {}),
            }
            lines = [f"{field} = {json.dumps(value)}" for field, value in table.items()]
            tables.append(f"[workspaces.{name}]\n" + "\n".join(lines) + "\n")
        self.file.write_text("\n".join(tables))


@pytest.fixture
def workspaces_env(
    env: dict[str, str],
    sim: SimulatorServer,
    sim_b: SimulatorServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> TwoWorkspaces:
    """Two workspaces on two simulators (`TwoWorkspaces`). Request it (and `default_env`,
    if wanted) before `processes` so the processes started see it."""
    values = TwoWorkspaces()
    values.sims = {"us": sim, "eu": sim_b}
    values.file = tmp_path / "workspaces.toml"
    values.write()
    for name in ("BRAZE_API_KEY", "BRAZE_REST_ENDPOINT"):
        env.pop(name, None)
        monkeypatch.delenv(name, raising=False)
    env["BRAZE_WORKSPACES_FILE"] = str(values.file)
    for name in values.names:
        env[f"BRAZE_KEY_{name.upper()}"] = values.keys[name]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    values.update(env)
    reset_services()
    return values


@pytest.fixture
def env(
    redis_url: str, sim: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """Environment for this process and its children; Redis is flushed after the test."""
    values = {**BASE_ENV, "REDIS_URL": redis_url, "BRAZE_REST_ENDPOINT": sim.url}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_services()
    yield values
    reset_services()
    Redis.from_url(redis_url).flushall()


@pytest.fixture
def default_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`env` without the shortened timings of BASE_ENV: every setting at the default users
    run (only the key, Redis and the simulator's address set). Request it before
    `processes` so the processes started see it."""
    for name in BASE_ENV:
        if name not in ("BRAZE_API_KEY", "LOG_LEVEL"):
            env.pop(name, None)
            monkeypatch.delenv(name, raising=False)
    reset_services()
    return env


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    """A private rabbitmq-server for the session (devtools/rabbitmq.py), started on first
    use; the tests that need it skip with the reason where it is not installed."""
    reason = rabbitmq_unavailable()
    if reason:
        pytest.skip(reason)
    server = RabbitMQ(tmp_path_factory.mktemp("rabbitmq")).start()
    yield server
    server.stop()


class Broker(str):
    """A test's BROKER_URL on the private RabbitMQ, with its own virtual host."""

    server: RabbitMQ
    vhost: str

    def queues(self) -> dict[str, dict[str, Any]]:
        return self.server.queues(self.vhost)


@pytest.fixture
def rabbitmq(
    rabbitmq_server: RabbitMQ, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Broker]:
    """`env` with BROKER_URL on a fresh virtual host of the private RabbitMQ (deleted after
    the test). Request it before `processes` so the processes started see it."""
    vhost = rabbitmq_server.add_vhost()
    url = Broker(rabbitmq_server.url(vhost))
    url.server, url.vhost = rabbitmq_server, vhost
    env["BROKER_URL"] = url
    monkeypatch.setenv("BROKER_URL", url)
    reset_services()
    yield url
    rabbitmq_server.delete_vhost(vhost)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, env: dict[str, str]) -> str:
    """Run a test on each broker: REDIS_URL's Redis (as by default) and RabbitMQ
    (BROKER_URL, `rabbitmq`). Request it before `processes`."""
    if request.param == "rabbitmq":
        request.getfixturevalue("rabbitmq")
    return str(request.param)


@pytest.fixture(scope="session")
def redis_cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private 3-master, 3-replica Redis Cluster for the session (devtools/redis_cluster.py),
    started on first use; skipped with the reason where redis-server cannot run one."""
    reason = redis_cluster_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(
    redis_cluster_server: RedisCluster,
    env: dict[str, str],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RedisCluster]:
    """`env` with braze-subs' state on the session's Redis Cluster (REDIS_URL
    redis+cluster://) and Celery's broker on the session's plain Redis (BROKER_URL);
    every master flushed after the test. Request it before `processes`."""
    state_on(env, monkeypatch, redis_cluster_server.url, broker_url=redis_url)
    yield redis_cluster_server
    reset_services()
    redis_cluster_server.flush()


def state_on(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, redis_url: str, *, broker_url: str
) -> None:
    """braze-subs' state on `redis_url` and Celery's broker on `broker_url`, for this
    process (its services built again) and the processes it starts."""
    values = {"REDIS_URL": redis_url, "BROKER_URL": broker_url}
    env.update(values)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_services()


@pytest.fixture
def own_cluster(
    redis_cluster_server: RedisCluster,
    redis_url: str,
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RedisCluster]:
    """A cluster of this test's own (its masters fail over and die), REDIS_URL on it and
    BROKER_URL on the session's plain Redis; stopped after the test. (It asks for
    `redis_cluster_server` only to skip where no cluster can run.) Request it before
    `processes`."""
    cluster = RedisCluster(tmp_path / "cluster").start()
    state_on(env, monkeypatch, cluster.url, broker_url=redis_url)
    yield cluster
    reset_services()
    cluster.stop()


@pytest.fixture
def redis_client(env: dict[str, str]) -> Redis:
    return Redis.from_url(env["REDIS_URL"])


class Processes(ProcessGroup):
    """Real `celery -A worker.app` processes started for one test; killed (hard) at its end."""

    def worker(  # type: ignore[override]
        self, name: str = "w1", concurrency: int = 8, extra_env: dict[str, str] | None = None
    ) -> CeleryProcess:
        process = super().worker(name, ["--concurrency", str(concurrency)], extra_env)
        self.wait_ready([process])
        return process

    def kill(self, process: CeleryProcess, sig: int = signal.SIGKILL) -> None:  # type: ignore[override]
        process.signal_group(sig)
        process.wait(timeout=30)

    def stop_all(self, grace: float = 0.0) -> None:
        super().stop_all(grace)


@pytest.fixture
def processes(env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path, {**os.environ, **env})
    yield running
    running.stop_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its kind, from its folder: `pytest -m unit` runs the pure tests
    alone, `-m "not e2e"` everything without Celery processes. Then the order and the
    groups of a parallel run (see "Running in parallel" below)."""
    for item in items:
        kind = Path(str(item.fspath)).parent.name
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))
        group = xdist_group_of(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # The `alone` tests last (a stable sort keeps the rest in their order): they run while
    # the other workers are idle anyway, at the end, rather than holding them up midway.
    items.sort(key=lambda item: item.get_closest_marker("alone") is not None)


# --------------------------------------------------------------------------------------
# Running in parallel: `./dev test` runs pytest-xdist (`-n 2 --dist loadgroup`). Each
# xdist worker is a process with its own session fixtures: its own redis-server
# (pytest-redis picks a free port per worker), simulator (port 0), rabbitmq-server and
# temporary folders, so tests of two workers share no state. What they do share is the
# machine's two cores: a test whose assertion rests on time or throughput (a p99, a budget's
# utilisation, "within N seconds") is marked `alone` and runs with no other test running.
# --------------------------------------------------------------------------------------

# Tests that share something costly or global run on one worker, one after the other:
# the RabbitMQ tests share one rabbitmq-server and the cluster tests one Redis Cluster (a
# worker's session starts its own on first use: an Erlang VM; six redis-servers), the
# podman tests one image store and build, the packaging tests one wheel (a module-scoped
# fixture, built once per worker).
XDIST_GROUPS = {
    "tests/e2e/test_containers.py": "podman",
    "tests/e2e/test_deploy.py": "podman",
    "tests/e2e/test_containers_cluster.py": "podman",
    "tests/integration/test_packaging.py": "packaging",
}
XDIST_GROUP_FIXTURES = {
    "rabbitmq_server": "rabbitmq",
    "tls_rabbitmq": "rabbitmq",  # tests/e2e/test_rabbitmq_tls.py's node
    "rabbitmq_cluster": "rabbitmq",  # tests/e2e/test_rabbitmq_cluster.py's three nodes
    "redis_cluster_server": "redis-cluster",
}


def xdist_group_of(item: pytest.Item) -> str | None:
    """The xdist group `item` must run in (`--dist loadgroup`), if any."""
    path = Path(str(item.fspath)).resolve().relative_to(ROOT).as_posix()
    if path in XDIST_GROUPS:
        return XDIST_GROUPS[path]
    for fixture in getattr(item, "fixturenames", ()):
        if fixture in XDIST_GROUP_FIXTURES:
            return XDIST_GROUP_FIXTURES[fixture]
    callspec = getattr(item, "callspec", None)  # `broker` asks for RabbitMQ at run time
    if callspec is not None and callspec.params.get("broker") == "rabbitmq":
        return "rabbitmq"
    return None


_ROOM_LOCKS: tuple[int, int] | None = None


def _room_locks() -> tuple[int, int] | None:
    """The two lock files the xdist workers of this run share (None outside xdist): the
    gate, held shared for an instant by a test about to start and exclusively by an
    `alone` test from before it waits until it ends (so no new test starts meanwhile),
    and the room, held shared by every running test and exclusively by an `alone` one."""
    global _ROOM_LOCKS
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run or not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    if _ROOM_LOCKS is None:
        base = Path(tempfile.gettempdir()) / f"braze-subs-tests-{run}"
        flags = os.O_RDWR | os.O_CREAT
        _ROOM_LOCKS = (os.open(f"{base}.gate", flags, 0o600), os.open(f"{base}.room", flags))
    return _ROOM_LOCKS


@contextlib.contextmanager
def _turn(alone: bool) -> Iterator[None]:
    """A test's turn in the room: shared with the other workers' tests, or alone. Writer
    first: once an `alone` test holds the gate, the others finish their current test and
    wait; flock(2) itself would let a stream of shared holders starve it."""
    locks = _room_locks()
    if locks is None:
        yield
        return
    gate, room = locks
    if alone:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(room, fcntl.LOCK_EX)
    else:
        fcntl.flock(gate, fcntl.LOCK_SH)
        fcntl.flock(room, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
    try:
        yield
    finally:
        fcntl.flock(room, fcntl.LOCK_UN)
        if alone:
            fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Setup, call and teardown of each test inside its turn. tryfirst: outside
    pytest-timeout's wrapper, so the wait for a turn is not counted in the test's timeout."""
    with _turn(alone=item.get_closest_marker("alone") is not None):
        return (yield)


def keyspace_traces(client: Redis, needle: str) -> list[str]:
    """Every key whose name or value holds `needle` (SCAN of the whole keyspace, every
    type read whole): where an identifier still lives in Redis."""
    target = needle.encode()
    found: list[str] = []
    for name in client.scan_iter(count=1000):
        kind = client.type(name).decode()
        if kind == "string":
            parts = [client.get(name) or b""]
        elif kind == "hash":
            parts = [p for pair in client.hgetall(name).items() for p in pair]
        elif kind == "list":
            parts = client.lrange(name, 0, -1)
        elif kind == "set":
            parts = list(client.smembers(name))
        elif kind == "zset":
            parts = [member for member, _ in client.zrange(name, 0, -1, withscores=True)]
        elif kind == "stream":
            parts = [
                p for _, fields in client.xrange(name) for pair in fields.items() for p in pair
            ]
        else:
            parts = []
        parts += [body for part in parts if (body := _message_body(part))]
        if target in name or any(target in part for part in parts):
            found.append(f"{name.decode(errors='replace')} ({kind})")
    return found


def _message_body(raw: bytes) -> bytes | None:
    """The decoded body of a Celery message (kombu stores it base64-encoded in JSON)."""
    if not raw.startswith(b"{") or b'"body"' not in raw:
        return None
    try:
        return base64.b64decode(json.loads(raw)["body"])
    except (ValueError, KeyError, TypeError):
        return None
