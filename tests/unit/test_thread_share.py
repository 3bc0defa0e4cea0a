"""Each workspace's share of a worker process's threads (delivery/thread_share.py)."""

from __future__ import annotations

import threading

import pytest

from delivery.thread_share import (
    ACTIVE_SECONDS,
    ThreadShare,
    process_share,
    reserve_for_others,
    seats_for,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 8, 16, 17, 64])
def test_one_workspace_served_may_hold_every_thread(threads: int) -> None:
    assert seats_for(threads, 1, 0) == threads


@pytest.mark.parametrize("threads", range(1, 70))
@pytest.mark.parametrize("served", range(2, 6))
def test_the_shares_never_starve_a_workspace(threads: int, served: int) -> None:
    for others in range(served):
        seats = seats_for(threads, served, others)
        assert 1 <= seats <= threads
        if others:
            # active workspaces together never need more than the pool (when it can split)
            if threads >= others + 1:
                assert seats * (others + 1) <= threads
        else:
            # idle workspaces keep a reserve each, when the pool is big enough for it
            if threads > (served - 1) * reserve_for_others(threads, served):
                assert threads - seats >= (served - 1) * reserve_for_others(threads, served)
    # more active others never give one workspace more
    assert [seats_for(threads, served, n) for n in range(1, served)] == sorted(
        (seats_for(threads, served, n) for n in range(1, served)), reverse=True
    )


def test_the_default_pool_with_two_workspaces() -> None:
    assert seats_for(16, 2, 0) == 14
    assert seats_for(16, 2, 1) == 8


def test_a_workspace_alone_leaves_a_reserve_and_gets_a_seat_back_on_release() -> None:
    clock = Clock()
    share = ThreadShare(16, 2, clock=clock)
    seats = [share.take("us") for _ in range(14)]
    assert all(seat is not None for seat in seats)
    assert share.take("us") is None
    assert share.held("us") == 14
    seats[0].release()
    seats[0].release()  # twice is once
    assert share.held("us") == 13
    assert share.take("us") is not None


def test_another_workspace_with_work_gets_an_equal_share_at_once() -> None:
    clock = Clock()
    share = ThreadShare(16, 2, clock=clock)
    us = [share.take("us") for _ in range(14)]
    for seat in us:  # posts with their turns: us has work
        assert seat is not None
        seat.expect_release_in(1.0)
    # eu's first message finds a reserved thread free, and from its turn on us's share is 8
    eu = [share.take("eu") for _ in range(8)]
    assert all(seat is not None for seat in eu)
    for seat in eu:
        assert seat is not None
        seat.expect_release_in(0.2)
    assert share.take("eu") is None
    assert share.take("us") is None
    for seat in us[:6]:
        assert seat is not None
        seat.release()
    assert share.held("us") == 8
    assert share.take("us") is None  # still its equal share while eu has work
    for seat in eu:
        assert seat is not None
        seat.release()
    # eu posted a moment ago: it still counts as having work
    assert share.take("us") is None
    clock.now += ACTIVE_SECONDS + 0.01
    assert share.take("us") is not None


def test_a_workspace_whose_posts_find_no_turn_leaves_the_others_their_share() -> None:
    """us's key refused (or us paused, or its budget reserved far ahead): each of its
    posts takes a seat, finds no turn and goes back into the schedule. It holds no thread,
    so eu keeps all but the reserve; fails when taking a seat counted as having work (eu
    held to an equal share for ACTIVE_SECONDS after each of us's messages)."""
    clock = Clock()
    share = ThreadShare(8, 2, clock=clock)
    eu = [share.take("eu") for _ in range(7)]
    assert all(seat is not None for seat in eu)
    for seat in eu:
        assert seat is not None
        seat.expect_release_in(0.5)
    for _ in range(50):  # us's first cut, each batch on its way to the schedule
        seat = share.take("us")
        assert seat is not None  # us always gets its own seat
        clock.now += 0.001
        seat.release()
    clock.now += 0.01
    assert share.take("eu") is None  # eu holds all but the reserve
    eu[0].release()
    assert share.take("eu") is not None  # and gets its seventh back at once, not its half
    # A post with a turn is work: us's probe halves eu's share for ACTIVE_SECONDS.
    probe = share.take("us")
    assert probe is not None
    probe.expect_release_in(0.0)
    probe.release()
    assert share.take("eu") is None
    assert share.held("eu") == 7
    for seat in eu[1:4]:
        assert seat is not None
        seat.release()
    assert share.take("eu") is None  # 4 held: its equal share while us has work
    clock.now += ACTIVE_SECONDS + 0.01
    assert share.take("eu") is not None


def test_a_workspace_whose_posts_find_their_share_taken_has_work() -> None:
    clock = Clock()
    share = ThreadShare(4, 2, clock=clock)
    us = [share.take("us") for _ in range(3)]
    assert all(seat is not None for seat in us) and share.take("us") is None
    for seat in us:
        assert seat is not None
        seat.release()  # no turn taken (e.g. refused): yet us's last post found no seat
    assert share.take("eu") is not None and share.take("eu") is not None
    assert share.take("eu") is None  # us has work: eu's equal share is 2


def test_one_workspace_served_is_never_refused() -> None:
    share = ThreadShare(2, 1)
    assert all(share.take("default") is not None for _ in range(100))


def test_free_in_tells_the_first_expected_release() -> None:
    clock = Clock()
    share = ThreadShare(4, 2, clock=clock)
    assert share.free_in("us") == 0.0
    first, second = share.take("us"), share.take("us")
    assert first is not None and second is not None
    first.expect_release_in(1.5)
    second.expect_release_in(0.4)
    assert share.free_in("us") == pytest.approx(0.4)
    third = share.take("us")  # its turn not known yet: counted as free now
    assert third is not None
    assert share.free_in("us") == pytest.approx(0.0)
    third.expect_release_in(0.7)
    assert share.free_in("us") == pytest.approx(0.4)
    second.release()
    assert share.free_in("us") == pytest.approx(0.7)
    clock.now += 0.5
    assert share.free_in("us") == pytest.approx(0.2)


def test_threads_taking_and_releasing_together_never_exceed_the_share() -> None:
    share = ThreadShare(8, 2)
    peak = {"us": 0, "eu": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def run(workspace: str) -> None:
        while not stop.is_set():
            seat = share.take(workspace)
            if seat is None:
                continue
            with lock:
                peak[workspace] = max(peak[workspace], share.held(workspace))
            seat.release()

    threads = [threading.Thread(target=run, args=(w,)) for w in ("us", "eu") * 4]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    assert 1 <= peak["us"] <= seats_for(8, 2, 0)
    assert 1 <= peak["eu"] <= seats_for(8, 2, 0)
    assert share.held("us") == share.held("eu") == 0


def test_the_process_share_is_built_again_when_its_numbers_change() -> None:
    first = process_share(16, 2)
    assert process_share(16, 2) is first
    assert process_share(8, 2) is not first
