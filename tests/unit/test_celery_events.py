"""Task events sent from pool threads while the worker flushes its buffer are not lost
(tasks/celery_events.py): a post's `task-succeeded` reaches Flower."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from celery.events.dispatcher import EventDispatcher as CeleryEventDispatcher
from kombu import Connection

from tasks.celery_events import EventDispatcher


def published_after_a_send_during_the_flush(dispatcher_cls: type) -> list[str]:
    """The uuids published when a pool thread sends a task event while the buffer is being
    published (network I/O, the GIL released), after a second flush."""
    published: list[str] = []

    class Probe(dispatcher_cls):  # type: ignore[misc, valid-type]
        def _publish(self, event: Any, producer: Any, routing_key: str, **kwargs: Any) -> None:
            events = event if isinstance(event, list) else [event]
            first = not published
            published.extend(e["uuid"] for e in events)  # serialized: now on the wire
            if first:  # another thread's send, meanwhile
                thread = threading.Thread(
                    target=self.send, args=("task-succeeded",), kwargs={"uuid": "during"}
                )
                thread.start()
                thread.join(timeout=10)
                assert not thread.is_alive()

    with Connection("memory://") as connection:
        dispatcher = Probe(connection, hostname="w1@test", buffer_group=["task"])
        dispatcher.send("task-received", uuid="before")
        dispatcher.flush()
        dispatcher.flush()  # the next flush of the worker's loop
        dispatcher.close()
    return published


def test_an_event_sent_while_the_buffer_is_published_goes_out_with_the_next_flush() -> None:
    assert published_after_a_send_during_the_flush(EventDispatcher) == ["before", "during"]


def test_celerys_own_dispatcher_loses_it_which_is_why_ours_is_used() -> None:
    """If Celery fixes its race this fails: then tasks/celery_events.py can go."""
    if published_after_a_send_during_the_flush(CeleryEventDispatcher) != ["before"]:
        pytest.fail("Celery's EventDispatcher no longer loses the event: drop ours")


def test_the_apps_workers_send_events_through_ours() -> None:
    from config.settings import get_settings
    from tasks.celery_app import create_app

    assert issubclass(create_app(get_settings()).events.Dispatcher, EventDispatcher)
