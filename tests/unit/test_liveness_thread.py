"""The heartbeat thread (delivery/liveness.py) goes on through any error of a beat — redis-py's
cluster errors mid-failover are not RedisErrors — and a failed beat makes the next one that
goes through check the claims ended lately. Pure: the beats are a stub's."""

from __future__ import annotations

import threading
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import SlotNotCoveredError

from delivery.liveness import Liveness
from tests.conftest import wait_for


class Beats:
    def __init__(self, errors: list[Exception | None]) -> None:
        self.errors = errors
        self.beats = 0
        self.lock = threading.Lock()

    def beat(self, *_: Any, **__: Any) -> int:
        with self.lock:
            error = self.errors.pop(0) if self.errors else None
            if error is not None:
                raise error
            self.beats += 1
            return 0

    def stop(self, worker_id: str) -> None:
        pass


def test_the_thread_beats_on_after_cluster_and_connection_errors_and_checks_the_ends():
    beats = Beats(
        [None, SlotNotCoveredError("slot 42 not covered"), RedisConnectionError("refused")]
    )
    checked: list[list[tuple[str, str]]] = []
    live = Liveness(
        beats,  # type: ignore[arg-type]
        interval_seconds=0.01,
        ttl_seconds=5,
        lease_seconds=60,
        recover_ended=lambda pairs: checked.append(pairs) or [],
    )
    live.hold("batch-1", "me/1")
    live.release_token("me/1")
    live.ensure_started()  # its first beat goes through; the thread's next two fail
    try:
        wait_for(lambda: beats.beats >= 4, timeout=10, what="beats after the errors")
        assert checked == [[("batch-1", "me/1")]]  # once, after the beats went through
    finally:
        live.stop()
