"""The coalescer's resend of a take, dispatch or sweep whose reply may have been lost
(`delivery.coalescer._sent_again_after_lost_reply`): bounded, and only for the errors a
lost reply raises. What a resend answers is tested against real Redis
(integration/test_buffer.py, integration/test_batches.py: `..._on_a_plain_client_...`)."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from delivery import coalescer
from delivery.coalescer import LOST_REPLY_TRIES, _sent_again_after_lost_reply


class Flaky:
    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "answer"


def test_a_call_whose_connection_dropped_is_sent_again_until_it_answers() -> None:
    call = Flaky([ConnectionError("closed"), TimeoutError("timed out")])
    assert _sent_again_after_lost_reply(call, "take") == "answer"
    assert call.calls == 3


def test_it_gives_up_after_its_tries() -> None:
    call = Flaky([ConnectionError(str(n)) for n in range(LOST_REPLY_TRIES + 2)])
    with pytest.raises(ConnectionError):
        _sent_again_after_lost_reply(call, "take")
    assert call.calls == LOST_REPLY_TRIES


def test_it_gives_up_once_its_time_is_spent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coalescer, "LOST_REPLY_SECONDS", 0)
    call = Flaky([ConnectionError("closed")])
    with pytest.raises(ConnectionError):
        _sent_again_after_lost_reply(call, "sweep")
    assert call.calls == 1


def test_an_error_redis_answered_is_not_sent_again() -> None:
    call = Flaky([ResponseError("ERR bad")])
    with pytest.raises(ResponseError):
        _sent_again_after_lost_reply(call, "dispatch")
    assert call.calls == 1
