"""Celery processes for the benchmark, each in its own process group, so that a kill
(SIGKILL, as when a container dies) takes the worker and its pool children together, and
so that nothing outlives the run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CeleryProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def ready(self) -> bool:
        """The worker logged Celery's `ready.` line."""
        try:
            return b" ready." in self.log.read_bytes()
        except FileNotFoundError:
            return False

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class ProcessGroup:
    """Every process started for one run; all of them are stopped on exit, come what may."""

    workdir: Path
    env: dict[str, str]
    started: list[CeleryProcess] = field(default_factory=list)

    def start(self, app: str, role: str, name: str, args: Sequence[str] = ()) -> CeleryProcess:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as handle:
            popen = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", app, role, "--loglevel", "INFO", *args],
                cwd=ROOT,
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = CeleryProcess(name, popen, log)
        self.started.append(process)
        return process

    def worker(self, app: str, name: str, extra: Sequence[str] = ()) -> CeleryProcess:
        # Gossip and mingle (worker-to-worker chatter, start-up sync) are off for every
        # system alike: they only slow the start on a small machine.
        args = ["--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", *extra]
        return self.start(app, "worker", name, args)

    def wait_ready(self, processes: Sequence[CeleryProcess], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(p.ready() for p in processes):
            dead = [p for p in processes if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited: {dead[0].log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready within {timeout}s")
            time.sleep(0.05)

    @staticmethod
    def kill(process: CeleryProcess, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, sig)

    def stop_all(self, grace: float = 0.5) -> None:
        """SIGTERM every group, then SIGKILL whatever is left after `grace` seconds (the run
        is over and its Redis is thrown away: nothing needs a warm shutdown)."""
        for process in self.started:
            if process.alive():
                self.kill(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.started:
            # The leader may be gone while pool children linger: kill the group regardless.
            self.kill(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=10)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
