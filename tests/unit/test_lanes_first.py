"""The workers' queue order (tasks/celery_app.py `LanesFirst`): live posts first, but the bulk
queue gets a look first after every 1 / BULK_FLOOR_SHARE - 1 live posts in a row, so a live
flood that never empties the live queue still hands bulk the messages its floor needs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tasks import celery_app
from tasks.celery_app import COALESCE_QUEUE, LIVE_POST_QUEUE, POST_QUEUE, RECORD_QUEUE, LanesFirst


def cycle(monkeypatch: pytest.MonkeyPatch, share: float) -> LanesFirst:
    monkeypatch.setattr(celery_app, "get_settings", lambda: SimpleNamespace(bulk_floor_share=share))
    order = LanesFirst()
    order.clock = Clock()  # type: ignore[assignment]
    order.update([POST_QUEUE, RECORD_QUEUE, LIVE_POST_QUEUE, COALESCE_QUEUE])
    return order


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bulk_gets_a_first_look_after_nine_live_posts_in_a_row(monkeypatch):
    order = cycle(monkeypatch, 0.1)
    usual = [LIVE_POST_QUEUE, COALESCE_QUEUE, RECORD_QUEUE, POST_QUEUE]
    for _ in range(9):
        assert order.consume(4) == usual
        order.rotate(LIVE_POST_QUEUE)
    assert order.consume(4) == [POST_QUEUE, LIVE_POST_QUEUE, COALESCE_QUEUE, RECORD_QUEUE]
    order.rotate(COALESCE_QUEUE)  # a tick taken meanwhile changes nothing
    assert order.consume(4)[0] == POST_QUEUE
    order.rotate(POST_QUEUE)  # bulk had its turn: live first again
    assert order.consume(4) == usual


def test_without_a_floor_bulk_comes_last_however_much_live(monkeypatch):
    order = cycle(monkeypatch, 0.0)
    for _ in range(50):
        order.rotate(LIVE_POST_QUEUE)
    assert order.consume(4) == [LIVE_POST_QUEUE, COALESCE_QUEUE, RECORD_QUEUE, POST_QUEUE]


def test_a_tick_gets_the_first_look_half_a_beat_after_the_last_one_taken(monkeypatch):
    """A flood of live posts (two workspaces' first cuts: a thousand messages) never keeps
    the ticks waiting: the tick queue is looked at first once TICK_TURN_SECONDS have passed
    since this process took a tick; an empty one costs nothing (BRPOP falls through)."""
    order = cycle(monkeypatch, 0.1)
    clock = order.clock
    usual = [LIVE_POST_QUEUE, COALESCE_QUEUE, RECORD_QUEUE, POST_QUEUE]
    ticks_first = [COALESCE_QUEUE, LIVE_POST_QUEUE, RECORD_QUEUE, POST_QUEUE]
    assert order.consume(4) == usual  # the start: a tick was just sent
    clock.now += celery_app.TICK_TURN_SECONDS
    for _ in range(3):  # live posts taken meanwhile do not take the tick's turn away
        assert order.consume(4) == ticks_first
        order.rotate(LIVE_POST_QUEUE)
    order.rotate(COALESCE_QUEUE)  # a tick taken: live first again for half a beat
    assert order.consume(4) == usual
    clock.now += celery_app.TICK_TURN_SECONDS / 2
    assert order.consume(4) == usual
    clock.now += celery_app.TICK_TURN_SECONDS / 2
    assert order.consume(4)[0] == COALESCE_QUEUE


def test_the_ticks_turn_and_bulks_turn_together_put_the_tick_first(monkeypatch):
    order = cycle(monkeypatch, 0.1)
    order.consume(4)
    for _ in range(9):
        order.rotate(LIVE_POST_QUEUE)
    order.clock.now += celery_app.TICK_TURN_SECONDS
    assert order.consume(4) == [COALESCE_QUEUE, POST_QUEUE, LIVE_POST_QUEUE, RECORD_QUEUE]
