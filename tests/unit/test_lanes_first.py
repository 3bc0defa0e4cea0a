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
    order.update([POST_QUEUE, RECORD_QUEUE, LIVE_POST_QUEUE, COALESCE_QUEUE])
    return order


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
