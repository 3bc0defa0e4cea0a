"""Task events sent from the worker's pool threads without losing any (what Flower shows).

Celery's worker buffers task events when it runs an event loop (`buffer_group=['task']`,
the Redis and AMQP transports) and flushes them from that loop. `EventDispatcher.send`
appends to the buffer without a lock while `flush` publishes the buffer (network I/O,
the GIL released) and then empties it: an event a pool thread appends meanwhile is
emptied unsent. With the threads pool this lost a post's `task-succeeded`, and Flower
showed the post RECEIVED for ever (tests/e2e/test_flower.py, about 1 run in 12 under
load). Here the append and the taking of the buffer share a lock, and what is taken is
published under Celery's own mutex; nothing else changes.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.app.events import Events as CeleryEvents
from celery.events.dispatcher import EventDispatcher as CeleryEventDispatcher
from celery.events.event import group_from


class EventDispatcher(CeleryEventDispatcher):
    """Celery's dispatcher, its buffered events appended and taken under one lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._buffer_lock = threading.RLock()
        super().__init__(*args, **kwargs)

    def send(self, type: str, *args: Any, **fields: Any) -> Any:  # `type`: Celery's name
        if not (self.enabled and group_from(type) in self.buffer_group):
            return super().send(type, *args, **fields)
        with self._buffer_lock:
            # Celery's own buffered branch, its append under the lock; its flush at the
            # buffer's limit takes the (reentrant) lock again in this thread.
            return super().send(type, *args, **fields)

    def flush(self, errors: bool = True, groups: bool = True) -> None:
        super().flush(errors=errors, groups=False)
        if not groups:
            return
        with self._buffer_lock:
            taken = [(group, list(events)) for group, events in self._group_buffer.items()]
            for _group, events in self._group_buffer.items():
                events.clear()
        with self.mutex:
            for group, events in taken:
                if events:
                    self._publish(events, self.producer, f"{group}.multi")


class Events(CeleryEvents):
    """The app's events, sent through `EventDispatcher` above."""

    dispatcher_cls = "tasks.celery_events:EventDispatcher"
