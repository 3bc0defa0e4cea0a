"""A private plain Redis with one replica (a second `redis-server --replicaof`), for the
tests and benchmarks of WAIT-acknowledged enqueues (REDIS_WAIT_REPLICAS) outside a cluster:
what a Sentinel deployment runs, without the sentinels. `pause_replica`/`resume_replica`
(SIGSTOP/SIGCONT) make the replica stop acknowledging without the master noticing a broken
link; `kill_master` is a crash. Stopped, both, at the end.

Dev tooling: not on the product's import path.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from pathlib import Path

from redis import Redis

from devtools.processes import free_port, wait_until


class RedisWithReplica:
    """A master and its replica under `directory`; `url` is the master's REDIS_URL."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.master_port = free_port()
        self.replica_port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.master_port}/0"

    def node(self, port: int) -> Redis:
        return Redis(host="127.0.0.1", port=port, socket_timeout=5)

    @property
    def master(self) -> Redis:
        return self.node(self.master_port)

    @property
    def replica(self) -> Redis:
        return self.node(self.replica_port)

    def _start(self, name: str, port: int, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found; ./dev install installs it")
        folder = self.directory / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "redis.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                 "--save", "", "--appendonly", "no", *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    def start(self, timeout: float = 30.0) -> RedisWithReplica:
        """Both running, the replica's link to the master up (synchronised)."""
        self._start("master", self.master_port)
        self._start("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        try:
            self.wait_synchronised(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_synchronised(self, timeout: float = 30.0) -> None:
        def linked() -> bool:
            with contextlib.suppress(Exception):
                replication = self.replica.info("replication")
                return replication.get("master_link_status") == "up"
            return False

        wait_until(linked, timeout=timeout, what="the replica's link to its master")

    def pause_replica(self) -> None:
        """SIGSTOP the replica: its link stays open, it acknowledges nothing."""
        self.processes["replica"].send_signal(signal.SIGSTOP)

    def resume_replica(self) -> None:
        self.processes["replica"].send_signal(signal.SIGCONT)

    def kill_master(self) -> None:
        process = self.processes["master"]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)  # a paused one dies too
                    process.send_signal(signal.SIGKILL)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
