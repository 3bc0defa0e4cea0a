"""Map a function over a stream of work items in worker processes, results in input order.

`ordered_map` is `map` with a process pool behind it, made for inputs that do not fit in
memory: it reads the next item only when fewer than `in_flight` items are submitted and not
yet handed back, so a slow consumer or a huge input holds at most `in_flight` items and
results at once (`Pool.imap` and `Executor.map` would read the whole input up front).

Worker processes ignore SIGINT: Ctrl-C reaches the consumer alone, which stops reading, and
the pool is shut down with its queued items cancelled. Closing the generator (or leaving a
`with contextlib.closing(...)` block) does the same.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.context import BaseContext
from typing import TextIO, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _start_context() -> BaseContext:
    # Linux: fork. A worker is ready in milliseconds with every module already imported,
    # where a fork server or spawn costs 0.3-1.5 s of interpreter start and imports before
    # the first result. The workers only validate: they never touch the parent's other
    # threads (a progress bar's refresher), its sockets or its open files, and they leave
    # through os._exit, flushing nothing but stdout and stderr (flushed before the fork).
    # Elsewhere (macOS, Windows) fork is unsafe or absent: spawn, the platform default.
    if sys.platform == "linux":
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the parent's sys.stdout and sys.stderr objects, buffers and
    # locks included, and flushes them when it exits: had another thread of the parent (a
    # progress bar's refresher) been writing at the fork, that flush would wait forever on
    # a lock no thread of the worker holds. Fresh objects on the same descriptors cannot.
    sys.stdout = _fresh_stream(1)
    sys.stderr = _fresh_stream(2)


def _fresh_stream(fd: int) -> TextIO | None:
    try:
        return open(fd, "w", errors="backslashreplace", buffering=1, closefd=False)
    except OSError:  # no such descriptor (a daemon): nothing to write to
        return None


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, jobs: int, in_flight: int
) -> Iterator[R]:
    """Yield `fn(item)` for each item, in order, computed by `jobs` worker processes.

    At most `in_flight` items are submitted and not yet yielded; the next item is read only
    when a result has been handed back. `fn` and the items must be picklable; an exception
    raised by `fn` is re-raised here, at its item's turn.
    """
    if jobs < 1 or in_flight < 1:
        raise ValueError("jobs and in_flight must be at least 1")
    iterator = iter(items)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=_start_context(), initializer=_start_worker
    )
    pending: deque[Future[R]] = deque()
    try:
        for item in iterator:
            pending.append(pool.submit(fn, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Queued items are dropped; running ones (at most `jobs`) are waited for.
        pool.shutdown(wait=True, cancel_futures=True)
