"""Each workspace's share of this worker process's threads (issue 23: an outage, a refused
key or a 429 in one workspace never slows the others).

A post holds its thread from its turn's reservation until Braze answers: it sleeps until
its turn (up to `TOKEN_WAIT_MAX_SECONDS`), then waits for the answer (up to
`HTTP_TIMEOUT_SECONDS`). One workspace with a wave of batches (its retries coming due
together after an outage, a backfill) would otherwise put every thread of the process to
sleep on its own budget's turns, and the other workspaces' messages would queue behind its
messages in the broker while their budgets went unspent: measured, eu reached 0.67 of its
budget beside us's outage before this (bench/workspaces.py).

So a post first takes a seat of its workspace. A workspace may hold at most
`seats_for(...)` of the process's threads at once: all of them while it is the only
workspace served; while others are served but idle, all but a few kept free for them (so
that their first messages are taken at once, behind whatever else is queued); while others
have work too, an equal share. A post that finds its workspace's seats taken puts its
batch back into the schedule (no attempt spent, `WaitReason.BUDGET`), due when a seat is
likely free; its thread takes the next message at once.

A workspace "has work" while one of its posts holds a turn (it sleeps until the turn or
waits for Braze's answer), for `ACTIVE_SECONDS` after such a post, and while its posts find
its seats taken. A post that held its seat only to find no turn to take — the workspace's
key refused, posting paused after a 429, its budget reserved too far ahead — goes back into
the schedule and holds no thread: it does not count. It did (any seat taken counted), so
a workspace refusing its key held the others to an equal share for ACTIVE_SECONDS after
each of its batches went by on its way to the schedule (its whole first cut, each probe):
the others' messages beyond that share went round the schedule, a tick's wait each, while
threads stood free.

Why not a queue per workspace: Celery gives one worker's queues one pool, so a queue of its
own does not keep a workspace's posts from holding every thread; and a worker per
workspace means a fleet per workspace, which is what the issue takes away. Why not a
shorter token wait: the coalescer's tick comes every second, so a turn reserved less than
about a second ahead leaves the budget unspent between ticks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# How long after its last post a workspace still counts as having work: a little more than
# a beat interval and a token wait, the longest a draining workspace goes without a post.
ACTIVE_SECONDS = 3.0


def reserve_for_others(threads: int, served: int) -> int:
    """Threads kept free for each other served workspace while only one has work."""
    return max(1, threads // (4 * served))


def seats_for(threads: int, served: int, others_active: int) -> int:
    """The most threads one workspace may hold in posts at once.

    `threads`: the process's pool; `served`: workspaces this process serves;
    `others_active`: how many of the others posted lately. One workspace served: every
    thread. Others served but idle: all but `reserve_for_others` each. Others active: an
    equal share. Never less than one."""
    if served <= 1:
        return max(1, threads)
    if others_active <= 0:
        return max(1, threads - (served - 1) * reserve_for_others(threads, served))
    return max(1, threads // (1 + min(others_active, served - 1)))


@dataclass(slots=True)
class _Workspace:
    held: int = 0
    # When it last had work: a post with a turn ended, or a post found its seats taken.
    last_seen: float = float("-inf")
    releases: dict[int, float] = field(default_factory=dict)  # seat -> expected release
    turns: set[int] = field(default_factory=set)  # seats whose post holds a turn

    def has_work(self, now: float) -> bool:
        return bool(self.turns) or now - self.last_seen < ACTIVE_SECONDS


class Seat:
    """One post's place in its workspace's share; `release` when its post is over."""

    def __init__(self, share: ThreadShare | None, workspace: str, number: int) -> None:
        self._share = share
        self._workspace = workspace
        self._number = number

    def expect_release_in(self, seconds: float) -> None:
        """The post's turn is this far off: others learn when a seat is likely free, and
        that the workspace has work (a post with a turn)."""
        if self._share is not None:
            self._share._expect(self._workspace, self._number, seconds)

    def release(self) -> None:
        if self._share is not None:
            self._share._release(self._workspace, self._number)
            self._share = None


class ThreadShare:
    """Thread-safe; one per worker process (`process_share`)."""

    def __init__(
        self, threads: int, served: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threads = threads
        self.served = served
        self._clock = clock
        self._lock = threading.Lock()
        self._workspaces: dict[str, _Workspace] = {}
        self._next = 0

    def take(self, workspace: str) -> Seat | None:
        """A seat for one post of `workspace`, or None when its share is taken."""
        if self.served <= 1:
            return Seat(None, workspace, 0)
        with self._lock:
            now = self._clock()
            mine = self._workspaces.setdefault(workspace, _Workspace())
            others = sum(
                1
                for name, other in self._workspaces.items()
                if name != workspace and other.has_work(now)
            )
            if mine.held >= seats_for(self.threads, self.served, others):
                mine.last_seen = now  # more work than its share: it has work
                return None
            mine.held += 1
            self._next += 1
            mine.releases[self._next] = now
            return Seat(self, workspace, self._next)

    def free_in(self, workspace: str) -> float:
        """Seconds until the first of `workspace`'s seats is expected to be free (0: now)."""
        with self._lock:
            mine = self._workspaces.get(workspace)
            if mine is None or not mine.releases:
                return 0.0
            return max(0.0, min(mine.releases.values()) - self._clock())

    def held(self, workspace: str) -> int:
        with self._lock:
            mine = self._workspaces.get(workspace)
            return mine.held if mine else 0

    def _expect(self, workspace: str, number: int, seconds: float) -> None:
        with self._lock:
            mine = self._workspaces[workspace]
            if number in mine.releases:
                mine.releases[number] = self._clock() + seconds
                mine.turns.add(number)

    def _release(self, workspace: str, number: int) -> None:
        with self._lock:
            mine = self._workspaces[workspace]
            if mine.releases.pop(number, None) is not None:
                mine.held -= 1
                if number in mine.turns:  # a post with a turn: work, not a way to the schedule
                    mine.turns.discard(number)
                    mine.last_seen = self._clock()


_process: tuple[int, ThreadShare] | None = None
_process_lock = threading.Lock()
_pool_size: int | None = None


def set_pool_size(threads: int | None) -> None:
    """The worker's pool size as Celery started it (`--concurrency` or WORKER_CONCURRENCY),
    told by the worker at start; `process_share` counts the threads from it."""
    global _pool_size
    _pool_size = threads if threads and threads > 0 else None


def process_share(threads: int, served: int) -> ThreadShare:
    """This process's share (built again in a forked child, or when the numbers change);
    `threads`: the pool's size when the worker did not tell it (WORKER_CONCURRENCY)."""
    global _process
    threads = _pool_size or threads
    with _process_lock:
        pid = os.getpid()
        if (
            _process is None
            or _process[0] != pid
            or (_process[1].threads, _process[1].served) != (threads, served)
        ):
            _process = (pid, ThreadShare(threads, served))
        return _process[1]
