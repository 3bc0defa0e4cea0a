"""Shared fixtures: a real redis-server (pytest-redis, free port), the Braze simulator over
real HTTP, and real Celery worker and beat processes.

Unit tests use none of these. Integration tests take `env`, which points the settings of
this process (and of any process started with `processes`) at the session's Redis and
simulator, and flushes Redis afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from simulator import SimulatorConfig, SimulatorServer
from worker.batching import PlannedBatch
from worker.buffer import Buffer
from worker.services import reset_services

ROOT = Path(__file__).resolve().parent.parent
SIM_KEY = "sim-key"

# Settings every integration test starts from: a fast coalescer, short linger and backoff.
BASE_ENV = {
    "BRAZE_API_KEY": SIM_KEY,
    "COALESCE_INTERVAL_SECONDS": "0.2",
    "BATCH_LINGER_SECONDS": "0.3",
    "RETRY_BACKOFF_BASE_SECONDS": "0.1",
    "RETRY_BACKOFF_MAX_SECONDS": "1",
    "BATCH_CLAIM_SECONDS": "15",
    "HTTP_TIMEOUT_SECONDS": "5",
    "BATCH_REDISPATCH_SECONDS": "20",
    "CREDENTIALS_PROBE_SECONDS": "1",
    "LOG_LEVEL": "INFO",
}


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


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


def drained() -> bool:
    """Nothing pending, nothing in flight, no batch left: the pipeline has finished."""
    from worker.services import services
    from worker.status import read_status

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
def redis_client(env: dict[str, str]) -> Redis:
    return Redis.from_url(env["REDIS_URL"])


class Processes:
    """Real `celery` processes started for one test; killed (hard) at its end."""

    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, name: str, extra_env: dict[str, str] | None = None) -> Any:
        log = open(self.tmp_path / f"{name}.log", "ab")  # noqa: SIM115 (closed with process)
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", *args],
            cwd=ROOT,
            env={**self.env, **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process.log_path = self.tmp_path / f"{name}.log"  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    def worker(
        self, name: str = "w1", concurrency: int = 8, extra_env: dict[str, str] | None = None
    ) -> Any:
        process = self.start(
            "worker",
            "--loglevel",
            "INFO",
            "--hostname",
            f"{name}@%h",
            "--concurrency",
            str(concurrency),
            "--without-gossip",
            "--without-mingle",
            name=name,
            extra_env=extra_env,
        )
        wait_for(
            lambda: b"ready." in Path(process.log_path).read_bytes() or process.poll() is not None,
            timeout=60,
            what=f"worker {name} to be ready",
        )
        assert process.poll() is None, Path(process.log_path).read_text()
        return process

    def beat(self, name: str = "beat") -> Any:
        return self.start("beat", "--loglevel", "INFO", name=name)

    def kill(self, process: Any, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                self.kill(process)


@pytest.fixture
def processes(env: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    running = Processes(env, tmp_path)
    yield running
    running.stop_all()
