"""docker-compose.yml's `cluster` profile run for real in podman (issue 24): six Redis
Cluster nodes (3 masters, 3 replicas) created by the one-shot `redis-cluster-create`,
RabbitMQ as Celery's broker, the processes on `REDIS_URL=redis+cluster://...`, the
simulator of the `local` profile; then a master is killed mid-drain.

The images are those of tests/e2e/test_containers.py (the debootstrap base image standing in
for `redis:7`, the project's image built from the Dockerfile) plus a local RabbitMQ image,
`deploy/rabbitmq-image.sh` (the base image and Debian's rabbitmq-server, standing in for
`rabbitmq:3.13.7-alpine`: no registry is reachable here). Everything else is what an
operator runs: `podman-compose --profile local --profile cluster up -d`, the HTTP API on its
published port, `braze-subs import` and `status` in containers, `podman kill` of a master.

Skipped, with the reason, where podman cannot run (as test_containers.py).
"""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import identifier, wait_for
from tests.e2e.test_containers import (  # noqa: F401  (images: the fixture, shared)
    COMPOSE,
    ROOT,
    Slot,
    Stack,
    images,
    podman_compose,
    run,
    settled,
    wrong,
)

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(1200)]

GROUPS = {"email": "news", "phone": "sms-promos", "external_id": "news"}
STATES = ("subscribed", "unsubscribed")
NODES = [f"redis-node-{n}" for n in range(1, 7)]
CLUSTER_URL = "redis+cluster://redis-node-1:6379,redis-node-2:6379,redis-node-3:6379"
# The cluster's own volumes beside `redis-data` and `rabbitmq-data`.
VOLUMES = 2 + len(NODES)


@pytest.fixture(scope="module")
def rabbitmq_image(images: dict[str, Any]) -> str:  # noqa: F811
    """deploy/rabbitmq-image.sh on the base image (cached by a hash of what goes in)."""
    start = time.monotonic()
    name = run([str(ROOT / "deploy" / "rabbitmq-image.sh"), images["base"]], timeout=900)
    images["timings"]["rabbitmq image"] = time.monotonic() - start
    return name.stdout.strip()


class ClusterStack(Stack):
    """The compose project with `--profile local --profile cluster`."""

    def __init__(self, base: str, rabbitmq: str, tmp_path: Path) -> None:
        super().__init__(base, tmp_path)
        password = secrets.token_hex(16)
        self.env.update(
            {
                "RABBITMQ_IMAGE": rabbitmq,
                "RABBITMQ_PASSWORD": password,
                # The compose file's header, as an operator exports it.
                "BROKER_URL": f"amqp://braze-subs:{password}@rabbitmq:5672/",
                "REDIS_URL": CLUSTER_URL,
            }
        )
        self.api = f"http://127.0.0.1:{self.env['API_PUBLISH'].rsplit(':', 1)[1]}"

    def compose(self, *args: str, timeout: float = 300) -> str:
        command = [podman_compose() or "podman-compose", "-f", str(COMPOSE), "-p", self.project]
        command += ["--profile", "local", "--profile", "cluster", *args]
        done = run(command, timeout=timeout, env=self.env)
        return done.stdout + done.stderr

    def node(self, name: str) -> str:
        return f"{self.project}_{name}_1"

    def cli(self, node: str, *args: str) -> str:
        """redis-cli against `node` (a service name), from a node's container that runs."""
        for via in NODES:
            done = subprocess.run(
                ["podman", "exec", self.node(via), "redis-cli", "-h", node, *args],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=60,
            )
            if done.returncode == 0 and "Could not connect" not in done.stdout + done.stderr:
                return done.stdout
        raise AssertionError(f"redis-cli -h {node} {' '.join(args)}: no node container answers")

    def cluster_nodes(self, asked: str) -> dict[str, tuple[str, str, str]]:
        """`CLUSTER NODES` as `asked` sees it: hostname -> (role, flags, its master's
        hostname or "-")."""
        lines = [line.split() for line in self.cli(asked, "cluster", "nodes").splitlines()]
        lines = [fields for fields in lines if len(fields) >= 8]
        names = {f[0]: f[1].split(",", 1)[1] if "," in f[1] else f[1] for f in lines}
        out: dict[str, tuple[str, str, str]] = {}
        for fields in lines:
            flags = fields[2].replace("myself,", "")
            role = "master" if flags.startswith("master") else "replica"
            out[names[fields[0]]] = (role, flags, names.get(fields[3], "-"))
        return out

    def one_any(self, service: str) -> str:
        (name,) = self.containers(service, running=False)
        return name

    def formed(self) -> bool:
        """3 masters with a replica each, every node healthy, state ok, as node-1 sees it."""
        try:
            info = self.cli("redis-node-1", "cluster", "info")
            nodes = self.cluster_nodes("redis-node-1")
        except AssertionError:
            return False
        roles = sorted(role for role, flags, _ in nodes.values() if "fail" not in flags)
        return "cluster_state:ok" in info and roles == ["master"] * 3 + ["replica"] * 3

    def addresses(self) -> dict[str, str]:
        """Each node's container address on the project's network."""
        fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        return {n: self.podman("inspect", self.node(n), "--format", fmt).strip() for n in NODES}

    def masters(self) -> list[str]:
        return sorted(h for h, (role, flags, _) in self.cluster_nodes("redis-node-1").items()
                      if role == "master" and "fail" not in flags)  # fmt: skip

    def post(self, rows: list[dict[str, Any]]) -> int:
        """Through the HTTP API, 1,000 rows a request (its limit)."""
        headers = {"Authorization": f"Bearer {self.env['API_TOKENS']}"}
        accepted = 0
        for start in range(0, len(rows), 1000):
            answer = httpx.post(
                f"{self.api}/v1/changes", json=rows[start : start + 1000], headers=headers,
                timeout=60,
            )  # fmt: skip
            assert answer.status_code == 202, (answer.status_code, answer.text)
            accepted += answer.json()["accepted"]
        return accepted

    def save_logs(self) -> Path:
        services = ["redis", "rabbitmq", *NODES, "redis-cluster-create", "worker", "beat"]
        for service in [*services, "flower", "metrics", "api", "simulator"]:
            for name in self.containers(service, running=False):
                self.save_log(name)
        return self.tmp_path / "logs"

    def remove(self) -> None:
        subprocess.run(
            [str(ROOT / "deploy" / "podman-down.sh"), self.project],
            capture_output=True,
            env=self.env,
            timeout=300,
        )
        super().remove()


@pytest.fixture
def cluster_stack(
    images: dict[str, Any],  # noqa: F811
    rabbitmq_image: str,
    tmp_path: Path,
) -> Iterator[ClusterStack]:
    running = ClusterStack(images["base"], rabbitmq_image, tmp_path)
    try:
        yield running
    finally:
        print(f"container logs: {running.save_logs()}")
        running.remove()


def wave(rng: random.Random, expected: dict[Slot, str], per_kind: int) -> list[dict[str, Any]]:
    """Every identifier of the first `per_kind` of each kind twice, shuffled: first one
    state, then the other; `expected` keeps the last write."""
    pairs = []
    for kind, group in GROUPS.items():
        for n in range(per_kind):
            value = identifier(kind, n)
            last = rng.choice(STATES)
            first = STATES[1 - STATES.index(last)]
            pairs.append(
                [{"subscription_group_id": group, "subscription_state": s, kind: value}
                 for s in (first, last)]
            )  # fmt: skip
            expected[(group, kind, value)] = last
    rng.shuffle(pairs)
    return [row for pair in pairs for row in pair]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_cluster_profile_in_podman_drains_through_a_master_kill(
    cluster_stack: ClusterStack,
) -> None:
    stack = cluster_stack
    rng = random.Random(24)
    expected: dict[Slot, str] = {}
    figures: dict[str, float] = {}

    # Start-up: `up` until the cluster is formed by the create job, every service's health
    # check passes and the API answers.
    started = time.monotonic()
    stack.up(workers=2)
    wait_for(stack.formed, timeout=300, interval=0.5, what="3 masters + 3 replicas, state ok")
    create = stack.one_any("redis-cluster-create")
    wait_for(
        lambda: stack.podman("inspect", create, "--format", "{{.State.Status}} {{.State.ExitCode}}")
        .split() == ["exited", "0"],
        timeout=120, interval=0.5, what="redis-cluster-create exited 0",
    )  # fmt: skip
    services = ["rabbitmq", *NODES, "worker", "beat", "flower", "metrics", "api", "simulator"]
    for name in [n for s in services for n in stack.containers(s)]:
        wait_for(lambda name=name: stack.healthy(name), timeout=180, interval=1.0, what=name)
    wait_for(lambda: _answers(f"{stack.api}/healthz"), timeout=120, interval=0.5, what="api")
    figures["start-up"] = time.monotonic() - started

    # Every node announces its service name: the slot map the processes follow names
    # redis-node-N, never a container's address.
    # (Polled: a replica that has just joined reaches another node's slot map by gossip, a
    # moment after the create job saw the cluster whole; once seen in CI.)
    def announced() -> set[str]:
        slots = stack.cli("redis-node-2", "cluster", "slots")
        return {line.strip() for line in slots.splitlines() if line.strip().startswith("redis-")}

    wait_for(
        lambda: announced() == set(NODES),
        timeout=60, interval=1.0, what="every node in redis-node-2's slot map by its name",
    )  # fmt: skip
    # The app's queues are quorum queues on RabbitMQ.
    rabbit = stack.one("rabbitmq")
    wait_for(
        lambda: "braze-subs.post" in stack.podman(
            "exec", rabbit, "rabbitmqctl", "-q", "list_queues", "name", "type"),
        timeout=120, interval=1.0, what="the post queue declared on RabbitMQ",
    )  # fmt: skip
    queues = stack.podman("exec", rabbit, "rabbitmqctl", "-q", "list_queues", "name", "type")
    types = dict(line.split()[:2] for line in queues.splitlines() if len(line.split()) == 2)
    app_queues = ("celery", "braze-subs.coalesce", "braze-subs.post", "braze-subs.post.live")
    # (Celery's own event and pidbox queues, for Flower and remote control, stay classic.)
    assert all(types.get(name) == "quorum" for name in app_queues), queues

    # Wave 1 through the HTTP API: 6,000 identifiers flipped twice, 12,000 changes.
    rows = wave(rng, expected, per_kind=2000)
    t0 = time.monotonic()
    assert stack.post(rows) == len(rows)
    figures["enqueue (API)"] = time.monotonic() - t0
    settled(stack, expected, timeout=300)
    figures["wave 1 drained"] = time.monotonic() - t0
    plain = stack.one("redis")
    assert stack.podman("exec", plain, "redis-cli", "dbsize").strip() == "0"

    # The default workspace's keys share one hash tag: one master holds them all.
    sizes = {m: int(stack.cli(m, "dbsize")) for m in stack.masters()}
    holding = [m for m, size in sizes.items() if size]
    assert len(holding) == 1, sizes
    (master,) = holding
    (replica,) = [
        h for h, (role, _, of) in stack.cluster_nodes("redis-node-1").items()
        if role == "replica" and of == master
    ]  # fmt: skip

    # Wave 2, the same identifiers flipped again; Braze holds its answers, so posts are on
    # the wire and the rest of the wave waits behind them when the state's master is killed.
    # Through `braze-subs import` in a container, as an operator feeds a file.
    stack.sim_faults(hold=True)
    out = stack.import_file(wave(rng, expected, per_kind=2000), "wave-2")
    assert "12000 changes enqueued" in out.replace(",", ""), out
    wait_for(
        lambda: stack.sim("/_sim/stats", log="0")["held"] >= 4,
        timeout=60, interval=0.2, what="wave 2 posted and held",
    )  # fmt: skip
    # Mid-drain: changes in flight (batches taken, posts held or queued), and not every
    # identifier at Braze in its wave-2 state yet.
    before = stack.status()
    assert before["in_flight"] > 0, before
    assert wrong(stack, expected)
    killed_at = time.monotonic()
    stack.podman("kill", "--signal", "KILL", stack.node(master))
    stack.sim_faults(hold=False)

    # Its replica is promoted (cluster-node-timeout, 15 s, then an election) and the drain
    # completes: every identifier holds its wave-2 state.
    wait_for(
        lambda: stack.cli(replica, "role").split()[0] == "master",
        timeout=120, interval=0.5, what=f"{replica} promoted",
    )  # fmt: skip
    figures["failover"] = time.monotonic() - killed_at
    settled(stack, expected, timeout=400)
    figures["drained after the kill"] = time.monotonic() - killed_at

    # The killed node comes back (at a new address, found again by gossip) as a replica of
    # the promoted one; a second `up` finds the cluster formed and changes nothing.
    stack.podman("start", stack.node(master))
    wait_for(
        lambda: (lambda seen: seen[:1] == ("replica",) and "fail" not in seen[1])(
            stack.cluster_nodes("redis-node-1").get(master, ("",))),
        timeout=120, interval=0.5, what=f"{master} back as a replica",
    )  # fmt: skip
    assert stack.cluster_nodes("redis-node-1")[master][2] == replica
    layout = stack.cluster_nodes("redis-node-1")
    stack.up(workers=2)
    wait_for(
        lambda: "nothing to do" in stack.podman("logs", create),
        timeout=180, interval=1.0, what="the create job's second run doing nothing",
    )  # fmt: skip
    assert stack.cluster_nodes("redis-node-1") == layout

    # Wave 3 through the API on the healed cluster.
    assert stack.post(wave(rng, expected, per_kind=200))
    settled(stack, expected, timeout=300)
    stats = stack.sim("/_sim/stats", log="0")
    assert stats["malformed"] == 0 and stats["rejected_400"] == 0, stats

    # `down` then `up`, the volumes kept: every node comes back at a new address, and the
    # nodes gossip by address. The create job introduces each to the first at its current
    # one, the cluster forms again with its state (the counters of `status`), and a fourth
    # wave is delivered.
    before_down = stack.addresses()
    delivered = stack.status()["delivered_total"]
    stack.compose("down", timeout=600)
    restarted = time.monotonic()
    stack.up(workers=2)
    wait_for(stack.formed, timeout=300, interval=0.5, what="the cluster formed again after down/up")
    figures["formed again after down/up"] = time.monotonic() - restarted
    moved = {n for n, ip in stack.addresses().items() if ip != before_down[n]}
    assert moved, f"no node came back at a new address: {before_down}"
    wait_for(lambda: _answers(f"{stack.api}/healthz"), timeout=180, interval=0.5, what="api")
    assert stack.status()["delivered_total"] == delivered
    # (The simulator's container is new too, its state empty: wave 4's identifiers only.)
    fourth: dict[Slot, str] = {}
    assert stack.post(wave(rng, fourth, per_kind=200))
    settled(stack, fourth, timeout=300)
    stats = stack.sim("/_sim/stats", log="0")
    assert stats["malformed"] == 0 and stats["rejected_400"] == 0, stats

    print("cluster profile: " + ", ".join(f"{k} {v:.1f} s" for k, v in figures.items()))
    print(
        f"cluster profile: wave 1 {len(rows)} changes / {len(rows) // 2} identifiers, "
        f"{len(rows) / figures['wave 1 drained']:.0f} changes/s enqueue to delivered"
    )
    done = run([str(ROOT / "deploy" / "podman-down.sh"), stack.project], env=stack.env)
    assert f"{VOLUMES} volumes" in done.stdout, done.stdout
    assert stack.leftovers() == {"containers": [], "pods": [], "volumes": [], "networks": []}
    print(json.dumps({k: round(v, 1) for k, v in figures.items()}))
