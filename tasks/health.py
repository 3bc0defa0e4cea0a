"""Liveness heartbeats of worker and beat processes, and the checks the probes run.

A daemon thread in each worker and beat process rewrites `<HEALTH_DIR>/<role>.alive` every
fifth of `LIVENESS_MAX_AGE_SECONDS` with the process id. `braze-subs probe live --role R`
passes while that file is fresh and its process exists: a frozen process (SIGSTOP, a
stuck container) stops the writes and fails within `LIVENESS_MAX_AGE_SECONDS`, a killed
one fails at once. It costs a file write a second and a `stat` per probe, unlike
`celery inspect ping`, which broadcasts over the broker and waits for every worker.

Liveness deliberately does not touch Redis: a Redis outage must not make Kubernetes
restart every worker (they reconnect by themselves); readiness (`probe ready`) is where
Redis is checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("braze_subs.health")

ROLES = ("worker", "beat")


def heartbeat_path(health_dir: str | Path, role: str) -> Path:
    return Path(health_dir) / f"{role}.alive"


def beat_once(path: Path) -> None:
    """Write this process's id to `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(str(os.getpid()))
    os.replace(scratch, path)


class Heartbeat:
    """A daemon thread that beats every `interval` seconds until `stop()`."""

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="braze-subs-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        beat_once(self.path)  # fail loudly at start if the folder is not writable
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                beat_once(self.path)
            except OSError as exc:  # a full disk must not kill the thread; the probe fails
                logger.warning("cannot write the heartbeat %s: %s", self.path, exc)

    def stop(self) -> None:
        """Stop beating and remove the file: a process shutting down is not alive."""
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)
        with contextlib.suppress(OSError):
            if self.path.read_text() == str(os.getpid()):
                self.path.unlink()


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    message: str


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def check_live(path: Path, max_age_seconds: float, now: float | None = None) -> Verdict:
    """Whether the heartbeat at `path` is fresh and its process exists."""
    try:
        written = path.stat().st_mtime
        pid = int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return Verdict(False, f"no heartbeat at {path} (not started, or stopped)")
    except (OSError, ValueError) as exc:
        return Verdict(False, f"unreadable heartbeat {path}: {exc}")
    age = (time.time() if now is None else now) - written
    if age > max_age_seconds:
        return Verdict(False, f"heartbeat {age:.1f} s old (limit {max_age_seconds:g} s): frozen?")
    if pid and not _process_exists(pid):
        return Verdict(False, f"process {pid} of the heartbeat is gone")
    return Verdict(True, f"alive: pid {pid}, heartbeat {max(age, 0.0):.1f} s old")
