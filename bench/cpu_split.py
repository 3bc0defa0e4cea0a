"""CPU seconds per process over a drain (issue 26): what bounds the pipeline's ceiling.

bench/ceiling.py loads this file by its path into a drain run from either tree (the base's
bench/ has no copy of it) and wraps `bench.drain`'s process start and status poll with
`watch`: every Celery process `bench.drain` starts (two workers, beat), redis-server (from
its INFO) and the drain's own process (the simulator's thread, and the status poll every
0.1 s) are measured, without their start-up: a Celery process from the poll that finds its
start-up line in its log (imports and connections are over), redis-server and the drain's
process from the first poll that finds the backlog cut (the enqueue is over). The figures
are user + system CPU (psutil), a process's threads included; a poll is 0.1 s apart, so a
figure may miss at most that much of one process's CPU. Wall time on a shared machine
varies with the load; CPU seconds per identifier hardly do. "simulator thread" is the
simulator's own thread within the drain's process (`SimulatorServer` names it
`braze-simulator-PORT` in both trees), over the same span: the process's figure less the
drain's status poll and this module's own reads (issue 26); not a process of its own, so
not added to the total.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

# The log line after which a Celery process's start-up is over.
STARTED = {"worker": b" ready.", "beat": b"beat: Starting..."}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (its threads included)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU seconds one thread of this process has used (0 once it is gone)."""
    for thread in psutil.Process().threads():
        if thread.id == native_id:
            return float(thread.user_time + thread.system_time)
    return 0.0


def simulator_thread() -> int | None:
    """The native id of this process's simulator thread, None when there is none."""
    for thread in threading.enumerate():
        if thread.name.startswith("braze-simulator-") and thread.native_id is not None:
            return thread.native_id
    return None


class CpuSplit:
    """Per process, CPU seconds from the end of its start-up to the drain's end."""

    def __init__(self) -> None:
        self.celery: dict[str, tuple[int, Path, bytes]] = {}  # name -> pid, log, start line
        self.others: dict[str, int] = {"simulator": os.getpid()}
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.thread: int | None = None  # the simulator thread's native id, once found

    def add_celery(self, role: str, pid: int, log_path: Path) -> None:
        count = sum(1 for name in self.celery if name.startswith(role))
        self.celery[f"{role} {count + 1}"] = (pid, log_path, STARTED[role])

    def poll(self, redis_pid: int, cut: bool) -> None:
        """Start the count of each process whose start-up is over."""
        for name, (pid, log_path, line) in self.celery.items():
            if name in self.start:
                continue
            try:
                started = line in log_path.read_bytes()
            except FileNotFoundError:
                started = False
            if started:
                self.start[name] = cpu_seconds(pid)
        if cut:
            self.others.setdefault("redis-server", redis_pid)
            for name, pid in self.others.items():
                self.start.setdefault(name, cpu_seconds(pid))
            if "simulator thread" not in self.start and (native_id := simulator_thread()):
                self.thread = native_id
                self.start["simulator thread"] = thread_cpu_seconds(native_id)

    def stop(self) -> None:
        for name, (pid, _log, _line) in self.celery.items():
            self.end[name] = cpu_seconds(pid)
        for name, pid in self.others.items():
            self.end[name] = cpu_seconds(pid)
        if self.thread is not None:
            self.end["simulator thread"] = thread_cpu_seconds(self.thread)

    def figures(self) -> dict[str, float]:
        """CPU seconds per process; "workers" sums the workers."""
        found = {
            name: round(self.end[name] - self.start[name], 2)
            for name in self.end
            if name in self.start
        }
        found["workers"] = round(sum(v for k, v in found.items() if k.startswith("worker")), 2)
        return found


def watch(drain: Any, identifiers: int) -> CpuSplit:
    """Wrap `drain` (the `bench.drain` module of the tree measured) so that its next `run`
    measures its processes; read the figures from the returned split once it returns."""
    split = CpuSplit()
    started: Callable[..., Any] = drain.celery_process
    polled: Callable[..., Any] = drain.read_status

    @contextlib.contextmanager
    def celery_process(role: str, env: Any, log_path: Path, *options: str) -> Iterator[Any]:
        with started(role, env, log_path, *options) as process:
            split.add_celery(role, process.pid, log_path)
            yield process

    redis_pids: list[int] = []

    def read_status(client: Any, keys: Any) -> Any:
        status = polled(client, keys)
        if not split.end:
            if not redis_pids:
                redis_pids.append(int(client.info("server")["process_id"]))
            split.poll(redis_pids[0], cut=status.pending < identifiers or status.in_flight > 0)
            if status.pending == 0 and status.in_flight == 0:
                split.stop()
        return status

    drain.celery_process = celery_process
    drain.read_status = read_status
    return split
