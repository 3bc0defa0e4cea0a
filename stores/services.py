"""The Redis half of a process's long-lived objects, and the one per-process registry.

`StoreServices` holds what enqueuing needs: the settings, the key names, a pooled Redis
client, its scripts, the retention and the change buffer. A producer (`tasks.producer`, the
HTTP API) needs nothing more, so it never loads httpx, the poster or the coalescer.
`delivery.services.Services` extends it with the worker's parts (Braze client, limiter,
poster, ...). Both live in the registry here, one object per process (built again after a
fork): a process that first enqueued and then needs the worker's parts gets them by one
upgrade, and `delivery.services.reset_services` forgets whichever is there.
"""

from __future__ import annotations

import os
import threading
from functools import cached_property
from typing import TypeVar

from redis import Redis

from config.settings import Settings, get_settings
from stores.buffer import Buffer
from stores.connection import redis_client
from stores.history import Retention
from stores.keys import Keys
from stores.scripts import Scripts


class StoreServices:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_key_prefix)

    @cached_property
    def redis(self) -> Redis:
        return redis_client(self.settings, health_check_interval=30)

    @cached_property
    def scripts(self) -> Scripts:
        return Scripts(self.redis)

    @cached_property
    def retention(self) -> Retention:
        return Retention.from_settings(self.settings)

    @cached_property
    def buffer(self) -> Buffer:
        return self.new_buffer()

    def new_buffer(self) -> Buffer:
        """A buffer of its own over the shared client, whose `stale` counts only the
        enqueues made through it (the HTTP API answers each request with its own)."""
        return Buffer(self.redis, self.keys, self.scripts, self.retention)

    def close(self) -> None:
        """Release what this process holds open (subclasses add theirs)."""


Found = TypeVar("Found", bound=StoreServices)

_lock = threading.Lock()
_current: dict[int, StoreServices] = {}


def process_services(kind: type[Found]) -> Found:
    """This process's services, at least of `kind` (threads share them; a forked child
    builds its own). A `StoreServices` found where a subclass is asked for is replaced
    once by the subclass, built from the same settings."""
    pid = os.getpid()
    found = _current.get(pid)
    if not isinstance(found, kind):
        with _lock:
            found = _current.get(pid)
            if not isinstance(found, kind):
                settings = found.settings if found is not None else get_settings()
                _current.clear()  # a parent's, after a fork: never used here
                found = _current[pid] = kind(settings)
    return found


def store_services() -> StoreServices:
    """This process's services for enqueuing (the worker's, when it has them)."""
    return process_services(StoreServices)


def forget_services() -> None:
    """Close and forget this process's services and settings (tests that change settings,
    through `delivery.services.reset_services`)."""
    with _lock:
        for found in _current.values():
            found.close()
        _current.clear()
    get_settings.cache_clear()
