"""Local processes for the demo, the tests and the benchmarks: a throw-away redis-server,
Celery processes as the Procfile runs them, free ports and polling.

Each Celery process runs in its own process group (`start_new_session`), so a kill (SIGKILL,
as when a container dies) takes the worker and its pool children together, and nothing
outlives the run that started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
# The app every process is started with: the name the Procfile, compose and Kubernetes use.
CELERY_APP = "worker.app"

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(
    condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `condition` until it returns something truthy, and return that; raise
    `TimeoutError` naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def local_redis(workdir: Path, *extra_args: str) -> Iterator[str]:
    """A throw-away redis-server on a free port (no persistence unless `extra_args` ask);
    yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found; ./dev install installs it")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(
        [binary, *args, "--dir", str(workdir), *extra_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except Exception:
            return False

    try:
        wait_until(answers, timeout=10, what="redis-server to start")
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


@dataclass
class CeleryProcess:
    """One `celery -A worker.app ROLE` process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def ready(self) -> bool:
        """A worker logged Celery's `ready.` line."""
        try:
            return b" ready." in self.log_path.read_bytes()
        except FileNotFoundError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the process and its pool children."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)


def spawn_celery(
    role: str,
    args: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    name: str = "",
    app: str = CELERY_APP,
) -> CeleryProcess:
    """Start `celery -A APP ROLE ARGS` from the repository root, output to `log_path`
    (appended), in a process group of its own. `app` differs only for the benchmark's
    alternatives."""
    with open(log_path, "ab") as handle:
        popen = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, role, *args],
            cwd=ROOT,
            env=dict(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return CeleryProcess(name or role, popen, log_path)


def worker_args(name: str, *extra: str) -> list[str]:
    # Gossip and mingle (worker-to-worker chatter, start-up sync) only slow the start on a
    # small machine; nothing here relies on them.
    return ["--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", *extra]


@dataclass
class ProcessGroup:
    """Every Celery process started for one run; all are stopped on exit, come what may."""

    workdir: Path
    env: Mapping[str, str]
    started: list[CeleryProcess] = field(default_factory=list)

    def start(
        self,
        role: str,
        name: str,
        args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        loglevel: str = "INFO",
        app: str = CELERY_APP,
    ) -> CeleryProcess:
        process = spawn_celery(
            role,
            ["--loglevel", loglevel, *args],
            {**self.env, **(extra_env or {})},
            self.workdir / f"{name}.log",
            name,
            app,
        )
        self.started.append(process)
        return process

    def worker(
        self,
        name: str,
        extra: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        app: str = CELERY_APP,
    ) -> CeleryProcess:
        return self.start("worker", name, worker_args(name, *extra), extra_env, app=app)

    def beat(self, name: str = "beat") -> CeleryProcess:
        return self.start("beat", name)

    def wait_ready(self, processes: Sequence[CeleryProcess], timeout: float = 60) -> None:
        """Wait for every worker's `ready.`; fail at once with the log of one that exited."""

        def all_ready() -> bool:
            dead = [p for p in processes if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited: {dead[0].log()[-3000:]}")
            return all(p.ready() for p in processes)

        wait_until(all_ready, timeout=timeout, what="workers to be ready")

    @staticmethod
    def kill(process: CeleryProcess, sig: int = signal.SIGKILL) -> None:
        process.signal_group(sig)

    def stop_all(self, grace: float = 0.5) -> None:
        """SIGTERM every group, then SIGKILL whatever is left after `grace` seconds."""
        for process in self.started:
            if process.alive():
                process.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.started:
            # The leader may be gone while pool children linger: kill the group regardless.
            process.signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


@contextmanager
def celery_process(
    role: str, env: Mapping[str, str], log_path: Path, *options: str
) -> Iterator[CeleryProcess]:
    """`celery -A worker.app ROLE` as the Procfile runs it, stopped warmly (SIGTERM: running
    tasks finish) on exit; `options` replace the log level."""
    process = spawn_celery(role, options or ("--loglevel", "INFO"), env, log_path)
    try:
        yield process
    finally:
        process.popen.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.signal_group(signal.SIGKILL)
            process.wait()
