"""The Dockerfile and docker-compose.yml, built and run in a real container engine (podman).

No image registry is reachable where these tests run, so the two registry images are
replaced the way an air-gapped site replaces them (README, "Containers"): a base image built
from Debian's packages (`deploy/base-image.sh`, cached by a hash of what goes in) with
Python and redis-server, and a wheelhouse resolved by that image's own Python
(`deploy/wheels.sh`, cached by a hash of the base image and pyproject.toml). Everything else
is what an operator runs: `podman build` of the Dockerfile, `podman-compose` of
docker-compose.yml with the `local` profile, `braze-subs import` in a container.

Skipped, with the reason, only where podman cannot run (not installed, not root, no
working runtime); `./dev test` installs it where apt-get can.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.processes import free_port
from tests.conftest import SIM_KEY, identifier, wait_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
# Hosts that cannot raise rlimits and whose crun refuses the cgroup layout need these
# podman settings; harmless elsewhere (runc is installed beside podman by ./dev).
CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"
IMAGE = "braze-subs:latest"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "braze-subs"

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(900)]

Slot = tuple[str, str, str]  # (group, kind, value), as the simulator names a subscription
GROUPS = {"email": "news", "phone": "sms-promos", "external_id": "news"}
PER_KIND = 200  # 600 identifiers, 12 full batches per wave
STATES = ("subscribed", "unsubscribed")


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


def podman_compose() -> str | None:
    """podman-compose from this environment (the dev extra installs it), else from PATH."""
    beside = Path(sys.executable).parent / "podman-compose"
    return str(beside) if beside.exists() else shutil.which("podman-compose")


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def why_podman_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root: debootstrap and rootful podman build the base image"
    missing = [name for name in ("podman", "runc", "debootstrap") if not shutil.which(name)]
    if not podman_compose():
        missing.append("podman-compose")
    if missing:
        return f"not installed: {', '.join(missing)} (./dev installs them with apt-get and pip)"
    probe = subprocess.run(
        ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        capture_output=True,
        text=True,
        env=engine_env(),
        timeout=60,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"podman cannot run here: {last}"
    return None


def run(
    args: list[str], *, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output if it fails."""
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env or engine_env()
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {done.returncode}\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def timed(what: str, timings: dict[str, float], args: list[str], timeout: float) -> str:
    start = time.monotonic()
    out = run(args, timeout=timeout).stdout
    timings[what] = time.monotonic() - start
    return out


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, Any]]:
    """The base image, the wheelhouse and the project's image; how long each took."""
    reason = why_podman_cannot_run()
    if reason:
        pytest.skip(reason)
    timings: dict[str, float] = {}
    # The modules sharing this fixture may run at once in two pytest-xdist workers: one
    # builds while the other waits (once a dependency changes, both found no wheelhouse,
    # and one's rmtree pulled the other's wheels from under its pip).
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "images.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = timed(
            "base image", timings, [str(ROOT / "deploy" / "base-image.sh")], timeout=900
        ).strip()
        deps = hashlib.sha256(base.encode() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
        wheels = CACHE / f"wheels-{deps[:16]}"
        if not (wheels / ".complete").exists():
            shutil.rmtree(wheels, ignore_errors=True)
            timed("wheels", timings, [str(ROOT / "deploy" / "wheels.sh"), base, str(wheels)], 900)
            (wheels / ".complete").touch()
        # --format docker: the OCI format has no HEALTHCHECK.
        build = ["podman", "build", "--format", "docker", "--build-arg", f"BASE_IMAGE={base}"]
        build += ["-v", f"{wheels}:/wheels:ro", "--build-arg", "WHEELS=/wheels"]
        timed("image build", timings, [*build, "-t", IMAGE, str(ROOT)], timeout=900)
    yield {"base": base, "timings": timings}
    print("container timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


# --------------------------------------------------------------------------------------
# The compose stack
# --------------------------------------------------------------------------------------


class Stack:
    """One compose project, brought up with podman-compose as an operator would."""

    def __init__(self, base: str, tmp_path: Path) -> None:
        self.project = f"braze-subs-test-{os.getpid()}"
        self.flower_port, self.sim_port, self.metrics_port = free_port(), free_port(), free_port()
        self.flower_auth = ("admin", secrets.token_hex(8))
        self.tmp_path = tmp_path
        self.env = {
            **engine_env(),
            "REDIS_IMAGE": base,
            # The local profile: workers post to the simulator, never to Braze.
            "BRAZE_API_KEY": SIM_KEY,
            "BRAZE_REST_ENDPOINT": "http://simulator:8700",
            # The simulator is another container, not loopback: plain http must be allowed.
            "BRAZE_ALLOW_INSECURE_HTTP": "true",
            "FLOWER_BASIC_AUTH": ":".join(self.flower_auth),
            "FLOWER_PUBLISH": f"127.0.0.1:{self.flower_port}",
            "SIMULATOR_PUBLISH": f"127.0.0.1:{self.sim_port}",
            "METRICS_PUBLISH": f"127.0.0.1:{self.metrics_port}",
            "API_PUBLISH": f"127.0.0.1:{free_port()}",
            "API_TOKENS": secrets.token_hex(16),
        }
        for name in ("BRAZE_INSTANCE", "REDIS_URL", "REDIS_MAXMEMORY", "LOG_FORMAT"):
            self.env.pop(name, None)

    # --- commands -----------------------------------------------------------------------

    def compose(self, *args: str, timeout: float = 300) -> str:
        command = [podman_compose() or "podman-compose", "-f", str(COMPOSE)]
        command += ["-p", self.project, "--profile", "local", *args]
        done = run(command, timeout=timeout, env=self.env)
        return done.stdout + done.stderr

    def podman(self, *args: str, timeout: float = 120) -> str:
        return run(["podman", *args], timeout=timeout, env=self.env).stdout

    def up(self, workers: int) -> None:
        self.compose("up", "-d", "--scale", f"worker={workers}")

    def containers(self, service: str, *, running: bool = True) -> list[str]:
        args = ["ps", "--format", "{{.Names}}"] + ([] if running else ["--all"])
        args += ["--filter", f"label=com.docker.compose.project={self.project}"]
        args += ["--filter", f"label=com.docker.compose.service={service}"]
        return sorted(self.podman(*args).split())

    def one(self, service: str) -> str:
        names = self.containers(service)
        assert len(names) == 1, f"{service}: {names}"
        return names[0]

    def scale_down(self, workers: int) -> None:
        """What `docker compose up -d --scale worker=N` does to the extra workers (podman-
        compose only adds containers): stop them with the compose file's grace period, and
        remove them..."""
        names = self.containers("worker", running=False)
        for name in sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]))[workers:]:
            self.podman("stop", "--time", "30", name, timeout=60)
            self.save_log(name)
            self.podman("rm", name)
        # ... and `up` starts the ones kept if they had stopped (a killed one, say).
        self.up(workers)

    def import_file(self, rows: list[dict[str, Any]], name: str) -> str:
        """`braze-subs import` in a container of the worker's service."""
        path = self.tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        path.chmod(0o644)
        inside = f"/imports/{path.name}"
        return self.compose(
            "run", "--rm", "--no-deps", "-T", "-v", f"{path}:{inside}:ro",
            "worker", "braze-subs", "import", inside,
        )  # fmt: skip

    def status(self) -> dict[str, Any]:
        out = self.podman("exec", self.one("beat"), "braze-subs", "status", "--json")
        return json.loads(out)

    def healthy(self, name: str) -> bool:
        done = subprocess.run(
            ["podman", "healthcheck", "run", name],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        return done.returncode == 0

    def workers_posting(self, flower: str) -> list[str]:
        """Containers of workers that Flower shows in the middle of a post."""
        tasks = httpx.get(
            f"{flower}/api/tasks",
            params={"state": "STARTED", "taskname": "subscriptions.post_batch"},
            auth=self.flower_auth,
            timeout=30,
        ).json()
        hosts = {task["worker"].split("@", 1)[1] for task in tasks.values()}
        out = self.podman(
            "ps",
            "--format",
            "{{.ID}} {{.Names}}",
            "--filter",
            "label=com.docker.compose.service=worker",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
        )
        by_host = dict(line.split() for line in out.splitlines() if line.strip())
        return sorted(by_host[host] for host in hosts if host in by_host)

    # --- the simulator, over its published port --------------------------------------------

    def sim(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.sim_port}{path}"
        return httpx.get(url, params=params, timeout=30).json()

    def sim_states(self) -> dict[Slot, str]:
        data = self.sim("/_sim/state", log="0")
        return {(s["group"], s["kind"], s["value"]): s["state"] for s in data["subscriptions"]}

    def sim_faults(self, **switches: Any) -> None:
        url = f"http://127.0.0.1:{self.sim_port}/_sim/faults"
        httpx.post(url, json=switches, timeout=30).raise_for_status()

    # --- teardown -------------------------------------------------------------------------

    def save_logs(self) -> Path:
        for service in ("redis", "worker", "beat", "flower", "metrics", "simulator"):
            for name in self.containers(service, running=False):
                self.save_log(name)
        return self.tmp_path / "logs"

    def save_log(self, name: str) -> None:
        folder = self.tmp_path / "logs"
        folder.mkdir(exist_ok=True)
        done = subprocess.run(
            ["podman", "logs", name], capture_output=True, text=True, env=self.env, timeout=60
        )
        # A name comes back after a scale-down and up: keep the earlier container's log.
        path = folder / f"{name}.log"
        while path.exists():
            path = path.with_name(path.stem + "+.log")
        path.write_text(done.stdout + done.stderr)

    def remove(self) -> None:
        """Everything of the project: containers, its pod, network and volume."""
        label = f"label=com.docker.compose.project={self.project}"
        for args in (
            ["pod", "rm", "--force", f"pod_{self.project}"],
            ["rm", "--force", "--time", "2", *self.containers_all(label)],
            ["volume", "rm", "--force", f"{self.project}_redis-data"],
            ["network", "rm", "--force", f"{self.project}_default"],
        ):
            subprocess.run(["podman", *args], capture_output=True, env=self.env, timeout=120)

    def leftovers(self) -> dict[str, list[str]]:
        """What of the project is still there, by kind."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {
            kind: self.podman(kind, *(["ls"] if kind != "ps" else ["--all"]), "--quiet",
                              "--filter", label).split()
            for kind in ("ps", "volume", "network")
        }  # fmt: skip
        pods = self.podman("pod", "ps", "--quiet", "--filter", f"name=pod_{self.project}")
        return {
            "containers": found["ps"],
            "pods": pods.split(),
            "volumes": found["volume"],
            "networks": found["network"],
        }

    def containers_all(self, label: str) -> list[str]:
        out = subprocess.run(
            ["podman", "ps", "--all", "--quiet", "--filter", label],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        ).stdout
        return out.split()


@pytest.fixture
def stack(images: dict[str, Any], tmp_path: Path) -> Iterator[Stack]:
    running = Stack(images["base"], tmp_path)
    try:
        yield running
    finally:
        print(f"container logs: {running.save_logs()}")
        running.remove()


# --------------------------------------------------------------------------------------
# Waves of changes
# --------------------------------------------------------------------------------------


def wave(rng: random.Random, expected: dict[Slot, str]) -> list[dict[str, Any]]:
    """Every identifier twice, in shuffled order: first one state, then the other, so the
    file itself flips each one; `expected` keeps the last write."""
    rows = []
    for kind, group in GROUPS.items():
        for n in range(PER_KIND):
            value = identifier(kind, n)
            last = rng.choice(STATES)
            first = STATES[1 - STATES.index(last)]
            for state in (first, last):
                rows.append(
                    {"subscription_group_id": group, "subscription_state": state, kind: value}
                )
            expected[(group, kind, value)] = last
    # Shuffle whole identifiers, keep each one's two rows in order.
    pairs = [rows[i : i + 2] for i in range(0, len(rows), 2)]
    rng.shuffle(pairs)
    return [row for pair in pairs for row in pair]


def wrong(stack: Stack, expected: dict[Slot, str]) -> dict[Slot, tuple[str, str | None]]:
    held = stack.sim_states()
    return {
        slot: (state, held.get(slot)) for slot, state in expected.items() if held.get(slot) != state
    }


def settled(stack: Stack, expected: dict[Slot, str], timeout: float) -> None:
    wait_for(
        lambda: not wrong(stack, expected),
        timeout=timeout,
        interval=1.0,
        what="every identifier in its last-written state",
    )
    # Nothing left anywhere: not pending, not in flight, not dead-lettered.
    wait_for(
        lambda: (lambda s: (s["pending"], s["in_flight"], s["dead_letter"]) == (0, 0, 0))(
            stack.status()
        ),
        timeout=60,
        interval=1.0,
        what="an empty buffer, no batch in flight, no dead letter",
    )


# --------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------


def test_compose_stack_in_podman_keeps_every_last_write(stack: Stack) -> None:
    started = time.monotonic()
    rng = random.Random(16)
    expected: dict[Slot, str] = {}

    # Redis with its append-only file, beat, three workers, Flower, the simulator.
    stack.up(workers=3)
    workers = stack.containers("worker")
    assert len(workers) == 3, workers
    simulator = f"http://127.0.0.1:{stack.sim_port}"
    wait_for(lambda: _answers(f"{simulator}/_sim/health"), timeout=60, interval=0.5)
    redis = stack.one("redis")
    assert (
        stack.podman("exec", redis, "redis-cli", "config", "get", "appendonly").split()[1] == "yes"
    )
    policy = stack.podman("exec", redis, "redis-cli", "config", "get", "maxmemory-policy")
    assert policy.split()[1] == "noeviction"
    assert int(stack.podman("exec", redis, "redis-cli", "config", "get", "maxmemory").split()[1])

    # Flower: basic auth, and it sees the three workers.
    flower = f"http://127.0.0.1:{stack.flower_port}"
    wait_for(lambda: _answers(f"{flower}/healthcheck"), timeout=60, interval=0.5)
    assert httpx.get(f"{flower}/api/workers", timeout=30).status_code == 401
    seen = wait_for(
        lambda: (lambda found: found if len(found) == 3 else None)(
            httpx.get(
                f"{flower}/api/workers", params={"refresh": "1"}, auth=stack.flower_auth, timeout=30
            ).json()
        ),
        timeout=90,
        interval=1.0,
        what="Flower listing three workers",
    )
    assert len(seen) == 3

    # The image: a non-root user that cannot change the code, the commands on PATH, and
    # every service's health check passing.
    worker = workers[0]
    assert stack.podman("exec", worker, "id", "-u").strip() == "10001"
    package = stack.podman(
        "exec", worker, "python", "-c", "import worker, os; print(os.path.dirname(worker.__file__))"
    ).strip()
    denied = subprocess.run(
        ["podman", "exec", worker, "touch", f"{package}/changed"],
        capture_output=True,
        env=stack.env,
        timeout=60,
    )
    assert denied.returncode != 0
    others = [stack.one(service) for service in ("beat", "flower", "metrics", "api", "simulator")]
    for name in [redis, *others, *workers]:
        wait_for(lambda name=name: stack.healthy(name), timeout=90, interval=2.0, what=name)
    # The exporter, on its published port.
    metrics = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=30).text
    assert "braze_subs_redis_up 1" in metrics

    # Wave 1, through `braze-subs import` in a container: every last write arrives.
    out = stack.import_file(wave(rng, expected), "wave-1")
    assert "1200 changes enqueued" in out.replace(",", ""), out
    settled(stack, expected, timeout=120)

    # Faults, without waiting for the pipeline between them. Braze applies wave 2 but holds
    # its answers; one worker holding some of those posts is killed.
    stack.sim_faults(hold=True)
    stack.import_file(wave(rng, expected), "wave-2")
    wait_for(
        lambda: stack.sim("/_sim/stats", log="0")["held"] >= 4,
        timeout=60,
        interval=0.2,
        what="wave 2 posted and held",
    )
    holding = wait_for(
        lambda: stack.workers_posting(flower),
        timeout=30,
        interval=0.5,
        what="Flower naming a worker that is posting",
    )
    victim = holding[0]
    stack.podman("kill", "--signal", "KILL", victim)
    stack.sim_faults(hold=False)

    # Redis restarts (its append-only file brings everything back), then wave 3.
    stack.podman("restart", "--time", "10", redis)
    wait_for(lambda: stack.healthy(redis), timeout=60, interval=0.5, what="redis back")
    stack.import_file(wave(rng, expected), "wave-3")

    # Workers 3 -> 1, wave 4; 1 -> 4, wave 5.
    stack.scale_down(1)
    assert len(stack.containers("worker")) == 1
    stack.import_file(wave(rng, expected), "wave-4")
    stack.up(workers=4)
    assert len(stack.containers("worker")) == 4
    stack.import_file(wave(rng, expected), "wave-5")

    # Nothing lost, nothing out of order: each identifier holds its wave-5 state. A batch
    # the killed worker held comes back through the coalescer's sweep, at default timings
    # (BATCH_REDISPATCH_SECONDS=120).
    settled(stack, expected, timeout=300)
    stats = stack.sim("/_sim/stats", log="0")
    assert stats["malformed"] == 0 and stats["rejected_400"] == 0, stats
    print(f"container test: stack up to settled in {time.monotonic() - started:.1f} s")

    # The teardown README documents (issue 27: `podman-compose down -v` left the scaled
    # workers, Redis, the pod, the volume and the network behind): nothing of the project
    # is left, the four workers added by --scale included.
    stack.save_logs()
    assert len(stack.containers("worker")) == 4
    done = run([str(ROOT / "deploy" / "podman-down.sh"), stack.project], env=stack.env)
    assert f"{stack.project}: removed " in done.stdout, done.stdout
    assert stack.leftovers() == {"containers": [], "pods": [], "volumes": [], "networks": []}


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
