"""The poster's tries while Redis does not answer (delivery/poster.py `_until_answered`,
issue 24's failover stall): which errors are tried again, and what ends the tries. Pure:
the calls are functions of the test; the real thing through a cluster failover is
integration/test_cluster_failover.py."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.exceptions import ClusterDownError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from delivery.liveness import Liveness
from delivery.poster import Poster


def poster() -> Any:
    """A Poster with only what `_until_answered` reads: the liveness (its stop signal)."""
    found = Poster.__new__(Poster)
    found.liveness = Liveness(
        None,  # type: ignore[arg-type] - never beats here
        interval_seconds=1,
        ttl_seconds=5,
        lease_seconds=60,
    )
    return found


def failing(errors: list[Exception], answer: str = "answered") -> tuple[list[float], Any]:
    calls: list[float] = []

    def call() -> str:
        calls.append(time.monotonic())
        if errors:
            raise errors.pop(0)
        return answer

    return calls, call


def test_tried_again_while_redis_does_not_answer_then_its_answer():
    calls, call = failing([RedisConnectionError("refused"), ClusterDownError("CLUSTERDOWN")] * 2)
    assert poster()._until_answered(call, 60_000) == "answered"
    assert len(calls) == 5


def test_any_other_error_is_an_answer_and_raised_at_once():
    calls, call = failing([ResponseError("ERR a script's error")])
    with pytest.raises(ResponseError):
        poster()._until_answered(call, 60_000)
    assert len(calls) == 1


def test_no_try_after_the_bound():
    calls, call = failing([RedisConnectionError("refused")] * 1000)
    started = time.monotonic()
    with pytest.raises(RedisConnectionError):
        poster()._until_answered(call, 300)
    assert len(calls) > 1
    assert all(at - started <= 0.3 for at in calls)


def test_a_stopping_worker_stops_trying():
    found = poster()
    found.liveness.begin_stop()
    calls, call = failing([RedisConnectionError("refused")] * 10)
    with pytest.raises(RedisConnectionError):
        found._until_answered(call, 60_000)
    assert len(calls) == 1


def test_a_call_frozen_past_the_bound_is_still_tried_again():
    """The bound counts from the first error, not from the call: a worker frozen in the
    middle of a call for longer than the bound (SIGSTOP, a paused container) finds its
    connection closed by Redis's idle timeout when thawed; that first error is tried again.
    Before, the time frozen counted, and the thawed post raised at its first error."""
    frozen = [True]

    def call() -> str:
        if frozen:
            frozen.clear()
            time.sleep(0.4)  # the freeze, longer than the bound below
            raise RedisConnectionError("Connection closed by server.")
        return "answered"

    assert poster()._until_answered(call, 300) == "answered"
