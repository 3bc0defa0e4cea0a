"""This worker process's liveness: its heartbeat, the claims it is posting, its stop signal.

One `Liveness` per process (`services().liveness`). A daemon thread beats every
`HEARTBEAT_INTERVAL_SECONDS` and extends the leases of the claims registered with `hold`
while their post is in progress; when the process dies or freezes the beats stop, the key
expires after `HEARTBEAT_TTL_SECONDS`, and the coalescer's tick takes its batches back.

`stopping` is set when the worker begins a warm shutdown (SIGTERM): a post that has not
sent yet hands its batches back at once instead of waiting for a turn in the budget.

A beat that fails (Redis did not answer: perhaps a failover) makes the next beat that
goes through check the claims this process ended in the seconds before: a master killed
before its replica had an end loses it, and on the new master the batch is still claimed
in a token no post holds; it is put back into the schedule at once (`recover_ended`),
not left for the lease to run out (BATCH_CLAIM_SECONDS). So does a beat that went through
only after SLOW_BEAT_SECONDS (redis-py's cluster client tries a command again for seconds,
following the slot map to the promoted replica: such a beat rode a failover out without
an error), and the ends of the posts in progress at either are checked once they end (an
end Redis acknowledged just before the master died may be released only after the post's
next Redis call, which waited out the outage).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from redis.exceptions import RedisError

from stores.heartbeats import Heartbeats

logger = logging.getLogger("braze_subs.liveness")

# Claims ended this long before a beat failed are checked once Redis answers again: far
# beyond a replica's lag behind its master (milliseconds; seconds on a starved host).
RECENT_ENDS_SECONDS = 10.0

# A beat that took this long went through only after Redis did not answer for a while (a
# beat takes milliseconds): checked as after a failed one. The outage of a failover is at
# least the cluster's failure detection (cluster-node-timeout: 15 s by default, 2 s in the
# tests) and the thread beats every HEARTBEAT_INTERVAL_SECONDS (1 s), so some beat waits
# out most of it. A false alarm costs one recover_orphans call, which changes only
# batches still claimed in a token this process let go of, or held by no one.
SLOW_BEAT_SECONDS = 0.5


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
        recover_ended: Callable[[list[tuple[str, str]]], list[str]] | None = None,
    ) -> None:
        self.heartbeats = heartbeats
        self.worker_id = worker_id or new_worker_id()
        self.interval = interval_seconds
        self.ttl_ms = round(ttl_seconds * 1000)
        self.lease_ms = round(lease_seconds * 1000)
        self.stopping = threading.Event()
        self._held: dict[str, str] = {}  # batch id -> claim token
        # (monotonic time, batch id, token) of the claims let go of lately, oldest first
        self._ended: deque[tuple[float, str, str]] = deque()
        self._to_check: dict[str, str] = {}  # ended claims to check once Redis answers
        # tokens of posts in progress when Redis failed: their ends are checked too
        self._watched: set[str] = set()
        self._beat_started: float | None = None  # a beat in progress keeps the ends before it
        self.recover_ended = recover_ended
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    # --- beating --------------------------------------------------------------------------

    def beat(self) -> int:
        """Beat now; returns the leases extended. Raises what Redis raises: then the claims
        ended lately are checked by the next beat that goes through (`redis_failed`, from
        the failed beat's start: redis-py tried it again for seconds). A beat that took
        SLOW_BEAT_SECONDS or more checks them at once."""
        started = time.monotonic()
        with self._lock:
            held = list(self._held.items())
            self._beat_started = started
        try:
            extended = self.heartbeats.beat(
                self.worker_id, self.ttl_ms, claims=held, lease_ms=self.lease_ms
            )
        except Exception:  # RedisError, and redis-py's cluster errors (not RedisErrors)
            self.redis_failed(since=started)
            raise
        finally:
            with self._lock:
                self._beat_started = None
        if time.monotonic() - started >= SLOW_BEAT_SECONDS:
            self.redis_failed(since=started)
        self._check_ended()
        return extended

    def redis_failed(self, since: float | None = None) -> None:
        """Redis did not answer a beat (or answered only after a while, from `since`): the
        claims ended in the RECENT_ENDS_SECONDS before may have ended only on a master that
        is gone, and so may those of the posts in progress; check them once it answers."""
        with self._lock:
            horizon = (time.monotonic() if since is None else since) - RECENT_ENDS_SECONDS
            self._to_check.update(
                (batch_id, token) for at, batch_id, token in self._ended if at >= horizon
            )
            self._watched = set(self._held.values())

    def _check_ended(self) -> None:
        with self._lock:
            pairs = list(self._to_check.items())
        if not pairs or self.recover_ended is None:
            return
        recovered = self.recover_ended(pairs)
        with self._lock:
            for batch_id, token in pairs:
                if self._to_check.get(batch_id) == token:
                    del self._to_check[batch_id]
        if recovered:
            logger.warning(
                "%d batches this worker had ended were still claimed after Redis came back "
                "(their end was lost with the master): back in the schedule, due now",
                len(recovered),
            )

    def _trim_ended(self) -> None:
        now = time.monotonic()
        horizon = min(now, self._beat_started or now) - RECENT_ENDS_SECONDS
        while self._ended and self._ended[0][0] < horizon:
            self._ended.popleft()

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
            except Exception as exc:  # RedisError, and redis-py's cluster errors (which
                # are not RedisErrors: a slot not covered mid-failover): the thread goes on.
                # The key expires and the batches go to other workers: the safe side.
                logger.warning("heartbeat failed: %s: %s", type(exc).__name__, exc)

    # --- the claims in progress -----------------------------------------------------------

    def hold(self, batch_id: str, token: str) -> None:
        """Extend this claim's lease with every beat until `release_token`."""
        with self._lock:
            self._held[batch_id] = token

    def release_token(self, token: str) -> None:
        """Stop extending the claims of one post (all taken with `token`): its batches ended,
        waited in the schedule or were lost; remembered a few seconds (`redis_failed`)."""
        now = time.monotonic()
        with self._lock:
            watched = token in self._watched
            self._watched.discard(token)
            for batch_id in [b for b, held in self._held.items() if held == token]:
                del self._held[batch_id]
                self._ended.append((now, batch_id, token))
                if watched:  # in progress when Redis failed: its end may be lost
                    self._to_check[batch_id] = token
            self._trim_ended()

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
