"""This worker process's liveness: its heartbeat, the claims it is posting, its stop signal.

One `Liveness` per process (`services().liveness`). A daemon thread beats every
`HEARTBEAT_INTERVAL_SECONDS` and extends the leases of the claims registered with `hold`
while their post is in progress; when the process dies or freezes the beats stop, the key
expires after `HEARTBEAT_TTL_SECONDS`, and the coalescer's tick takes its batches back.

`stopping` is set when the worker begins a warm shutdown (SIGTERM): a post that has not
sent yet hands its batches back at once instead of waiting for a turn in the budget.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from redis.exceptions import RedisError

from stores.heartbeats import Heartbeats

logger = logging.getLogger("braze_subs.liveness")


def new_worker_id() -> str:
    """host:pid:random - unique per process start, readable in `status`."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Liveness:
    def __init__(
        self,
        heartbeats: Heartbeats,
        *,
        interval_seconds: float,
        ttl_seconds: float,
        lease_seconds: float,
        worker_id: str | None = None,
    ) -> None:
        self.heartbeats = heartbeats
        self.worker_id = worker_id or new_worker_id()
        self.interval = interval_seconds
        self.ttl_ms = round(ttl_seconds * 1000)
        self.lease_ms = round(lease_seconds * 1000)
        self.stopping = threading.Event()
        self._held: dict[str, str] = {}  # batch id -> claim token
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # --- beating --------------------------------------------------------------------------

    def beat(self) -> int:
        """Beat now; returns the leases extended."""
        with self._lock:
            held = list(self._held.items())
        extended = self.heartbeats.beat(
            self.worker_id, self.ttl_ms, claims=held, lease_ms=self.lease_ms
        )
        return extended

    def ensure_started(self) -> None:
        """Beat before the first claim (so no tick finds the claim's holder unknown), and
        start the beating thread once."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            thread = threading.Thread(target=self._run, name="braze-subs-heartbeat", daemon=True)
            self._thread = thread
        self.beat()
        thread.start()

    def _run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.beat()
            except RedisError as exc:
                # The key expires and the batches go to other workers: the safe side.
                logger.warning("heartbeat failed: %s", exc)

    # --- the claims in progress -----------------------------------------------------------

    def hold(self, batch_id: str, token: str) -> None:
        """Extend this claim's lease with every beat until `release_token`."""
        with self._lock:
            self._held[batch_id] = token

    def release_token(self, token: str) -> None:
        """Stop extending the claims of one post (all taken with `token`)."""
        with self._lock:
            for batch_id in [b for b, held in self._held.items() if held == token]:
                del self._held[batch_id]

    def held(self) -> dict[str, str]:
        with self._lock:
            return dict(self._held)

    # --- stopping -------------------------------------------------------------------------

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds` unless the worker begins to stop; True if the whole wait passed."""
        if seconds <= 0:
            return not self.stopping.is_set()
        return not self.stopping.wait(seconds)

    def begin_stop(self) -> None:
        """Warm shutdown began: posts not yet sent hand their batches back."""
        self.stopping.set()

    def stop(self) -> None:
        """The process exits: stop beating and remove the heartbeat at once, so whatever it
        still held goes to other workers on the next tick."""
        self.stopping.set()
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        try:
            self.heartbeats.stop(self.worker_id)
        except RedisError as exc:
            logger.warning("could not remove the heartbeat: %s", exc)
