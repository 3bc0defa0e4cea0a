"""Tests for `tasks.parallel.ordered_map`: order, bounded reading ahead, errors, Ctrl-C."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from tasks.parallel import cpu_count, ordered_map


def late_for_small(x: int) -> int:
    """Small items finish last, so completion order is the reverse of input order."""
    time.sleep((10 - x % 10) * 0.003)
    return x * x


def square(x: int) -> int:
    return x * x


class Pulled:
    """The numbers 0 to `count` - 1, counting how many the consumer has pulled so far."""

    def __init__(self, count: int) -> None:
        self._numbers = iter(range(count))
        self.pulled = 0

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        number = next(self._numbers)
        self.pulled += 1
        return number


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def sigint_ignored(_: int) -> bool:
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def pid(_: int) -> int:
    time.sleep(0.01)
    return os.getpid()


def test_results_come_in_input_order() -> None:
    assert list(ordered_map(late_for_small, range(30), jobs=3, in_flight=6)) == [
        x * x for x in range(30)
    ]


def test_work_is_done_in_other_processes() -> None:
    pids = set(ordered_map(pid, range(20), jobs=2, in_flight=4))
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


@pytest.mark.parametrize(("jobs", "in_flight"), [(1, 1), (2, 3), (2, 4), (3, 2)])
def test_reads_at_most_in_flight_items_ahead(jobs: int, in_flight: int) -> None:
    items = Pulled(40)
    seen = []
    for consumed, result in enumerate(ordered_map(square, items, jobs=jobs, in_flight=in_flight)):
        # Submitted and not yet handed back, counting the one in hand: at most in_flight.
        assert items.pulled - consumed <= in_flight
        seen.append(result)
    assert seen == [x * x for x in range(40)]
    assert items.pulled == 40


def test_an_error_is_raised_at_its_items_turn() -> None:
    results = ordered_map(fail_on_three, range(10), jobs=2, in_flight=4)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="three"):
        next(results)
    assert multiprocessing.active_children() == []


def test_workers_ignore_sigint() -> None:
    assert all(ordered_map(sigint_ignored, range(4), jobs=2, in_flight=2))


def test_closing_early_cancels_queued_items_and_stops_the_workers() -> None:
    items = Pulled(1000)
    results = ordered_map(square, items, jobs=2, in_flight=4)
    assert next(results) == 0
    results.close()
    assert items.pulled <= 4
    assert multiprocessing.active_children() == []


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        next(ordered_map(square, [1], jobs=0, in_flight=1))
    with pytest.raises(ValueError):
        next(ordered_map(square, [1], jobs=1, in_flight=0))
    assert cpu_count() >= 1


def say(x: int) -> bool:
    print(f"worker says {x}", file=sys.stderr)
    return sys.stderr is not sys.__stderr__


def test_workers_write_to_the_same_stderr_through_fresh_objects(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # A fresh stderr object per worker (see _start_worker), on the same descriptor.
    assert all(ordered_map(say, range(3), jobs=2, in_flight=2))
    err = capfd.readouterr().err
    assert all(f"worker says {x}" in err for x in range(3))


def die_on_two(x: int) -> int:
    if x == 2:
        os._exit(1)
    return x


def test_a_worker_that_dies_breaks_the_pool_loudly() -> None:
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        list(ordered_map(die_on_two, range(6), jobs=2, in_flight=2))
    assert multiprocessing.active_children() == []
