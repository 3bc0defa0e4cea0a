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
from config.workspaces import forget_workspaces, get_workspaces
from core.routing import DEFAULT_WORKSPACE
from stores.buffer import Buffer
from stores.connection import redis_client
from stores.history import Retention
from stores.keys import Keys
from stores.replication import ReplicaWait
from stores.scripts import Scripts


class StoreServices:
    """One workspace's Redis half (the workspace `settings` are for: `default` unless
    `Settings.for_workspace` made them); `redis`: a client to share (the registry gives
    every workspace of a process the first one's pool)."""

    def __init__(self, settings: Settings, *, redis: Redis | None = None) -> None:
        self.settings = settings
        self.workspace = settings.workspace_name
        self.keys = Keys(settings.redis_key_prefix, settings.workspace_name)
        if redis is not None:
            self.__dict__["redis"] = redis  # what the cached property would hold

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
        enqueues made through it (the HTTP API answers each request with its own); each
        enqueue acknowledged by REDIS_WAIT_REPLICAS replicas (`stores.replication`)."""
        return Buffer(self.redis, self.keys, self.scripts, self.retention, self.replica_wait)

    @cached_property
    def replica_wait(self) -> ReplicaWait:
        """REDIS_WAIT_REPLICAS and REDIS_WAIT_TIMEOUT_MS (`stores.replication`)."""
        return ReplicaWait.from_settings(self.settings)

    def close(self) -> None:
        """Release what this process holds open (subclasses add theirs)."""


Found = TypeVar("Found", bound=StoreServices)

_lock = threading.Lock()
# (process id, workspace name) -> that workspace's services in this process.
_current: dict[tuple[int, str], StoreServices] = {}


def workspace_names() -> tuple[str, ...]:
    """The workspaces this deployment serves, in BRAZE_WORKSPACES_FILE's order (`default`
    alone without the file)."""
    return get_workspaces().names


def resolve_workspace(workspace: str | None) -> str:
    """The name `workspace` stands for: itself if known; None is the only workspace, or
    `default`. A programming error otherwise (routing names the workspace of every change
    before anything reaches here)."""
    workspaces = get_workspaces()
    names = workspaces.names
    if workspace is None:
        if workspaces.default is not None:
            return workspaces.default
        raise LookupError(
            f"several workspaces ({', '.join(names)}) and none named {DEFAULT_WORKSPACE!r}: "
            "name the workspace"
        )
    if workspace not in names:
        raise LookupError(f"no workspace {workspace!r} (known: {', '.join(names)})")
    return workspace


def process_services(kind: type[Found], workspace: str | None = None) -> Found:
    """This process's services for one workspace (`resolve_workspace`), at least of `kind`
    (threads share them; a forked child builds its own). A `StoreServices` found where a
    subclass is asked for is replaced once by the subclass, built from the same settings."""
    pid = os.getpid()
    if workspace is None or (pid, workspace) not in _current:
        workspace = resolve_workspace(workspace)
    found = _current.get((pid, workspace))
    if not isinstance(found, kind):
        with _lock:
            found = _current.get((pid, workspace))
            if not isinstance(found, kind):
                if any(key[0] != pid for key in _current):
                    _current.clear()  # a parent's, after a fork: never used here
                if found is not None:
                    settings = found.settings
                else:
                    settings = get_settings()
                    settings = settings.for_workspace(get_workspaces(settings)[workspace])
                sibling = next(iter(_current.values()), None)
                shared = sibling.__dict__.get("redis") if sibling is not None else None
                found = _current[(pid, workspace)] = kind(settings, redis=shared)
    return found


def store_services(workspace: str | None = None) -> StoreServices:
    """This process's services for enqueuing into `workspace` (None: the only one, or
    `default`), the worker's when it has them."""
    return process_services(StoreServices, workspace)


def forget_services() -> None:
    """Close and forget this process's services, settings and workspaces (tests that
    change settings, through `delivery.services.reset_services`)."""
    with _lock:
        for found in _current.values():
            found.close()
        _current.clear()
    get_settings.cache_clear()
    forget_workspaces()
