"""A worker's start-up heap is frozen from the garbage collector's full collections once it
is ready (tasks/celery_app.py `freeze_start_up_heap`, issue 26's seventh step): a tick's
cut makes 10,000-20,000 tracked objects, which started full collections that walked the
whole start-up heap (~50-70 ms each, the GIL held)."""

from __future__ import annotations

import gc
import weakref

from celery.signals import worker_ready

from tasks import celery_app


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_a_ready_worker_freezes_its_start_up_heap_and_still_collects_new_cycles():
    assert celery_app.freeze_start_up_heap in worker_ready._live_receivers(None)
    before = gc.get_freeze_count()
    old = Node()
    old.other = Node()
    old.other.other = old  # a cycle made before the freeze: frozen with the rest
    try:
        celery_app.freeze_start_up_heap()
        assert gc.get_freeze_count() > before
        assert not gc.get_objects(generation=2)  # none left for a full collection to walk
        frozen = weakref.ref(old)
        del old
        new = Node()
        new.other = Node()
        new.other.other = new  # a cycle made after it: collected as before
        collected = weakref.ref(new)
        del new
        gc.collect()
        assert collected() is None
        assert frozen() is not None
    finally:
        gc.unfreeze()
    gc.collect()
    assert frozen() is None
