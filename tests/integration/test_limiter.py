"""The shared rate budget: the arithmetic (pure) and the Lua scripts (real Redis)."""

from __future__ import annotations

import itertools
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.outcome import RateLimit
from simulator.ratelimit import sliding_window_max
from stores.clock import server_time_ms
from stores.limiter import Budget, RateLimiter
from tests.conftest import wait_for

# --- the arithmetic ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=100_000),
    window=st.floats(min_value=0.1, max_value=3600),
    headroom=st.floats(min_value=0.0, max_value=0.2),
    burst_fraction=st.floats(min_value=0.0, max_value=0.1),
)
def test_no_window_can_hold_more_than_the_limit(limit, window, headroom, burst_fraction):
    budget = Budget.for_limit(limit, window, headroom=headroom, burst_fraction=burst_fraction)
    assert budget.burst >= 1
    assert budget.max_per_window <= limit + 1e-9


@pytest.mark.parametrize("limit, window", [(5000, 60), (100, 2), (1000, 10), (250_000, 3600)])
def test_default_budget_sustains_97_percent(limit, window):
    budget = Budget.for_limit(limit, window, headroom=0.02, burst_fraction=0.01)
    assert budget.sustained_per_window >= 0.97 * limit - 1e-6
    assert budget.max_per_window <= 0.98 * limit + 1e-6


def test_tiny_limits_are_under_used_rather_than_exceeded():
    for limit in range(1, 10):
        budget = Budget.for_limit(limit, 1, headroom=0.02, burst_fraction=0.01)
        assert budget.max_per_window <= limit


# --- the scripts, on a real Redis ----------------------------------------------------------


@pytest.fixture
def limiter_for(redis_client):
    def build(limit: int, window: float, max_wait: float = 1000.0) -> RateLimiter:
        budget = Budget.for_limit(limit, window, headroom=0.02, burst_fraction=0.01)
        return RateLimiter(redis_client, "{test}:limiter", budget, max_wait_seconds=max_wait)

    return build


def reserve(limiter: RateLimiter, count: int) -> list[float]:
    """Reserve `count` requests; return their send times (ms, server clock)."""
    sends = []
    for _ in range(count):
        grant = limiter.acquire()
        assert grant.granted and grant.send_at_ms is not None
        sends.append(grant.send_at_ms)
    return sends


def test_reservations_keep_every_window_under_the_limit(limiter_for):
    limiter = limiter_for(limit=500, window=10)
    sends = reserve(limiter, 2000)  # four windows' worth, asked for at once
    assert sliding_window_max(sends, 10_000) <= 500 * 0.98 + 1


def test_sustained_rate_after_the_burst_is_the_budgets(limiter_for):
    limiter = limiter_for(limit=500, window=10)
    budget = limiter.budget
    sends = reserve(limiter, 600)
    steady = sends[budget.burst :]
    gaps = [b - a for a, b in itertools.pairwise(steady)]
    assert all(abs(gap - budget.interval_ms) <= 0.01 for gap in gaps), (min(gaps), max(gaps))
    assert budget.interval_ms <= 10_000 / (0.97 * 500) + 1e-9


def test_many_threads_share_one_budget(limiter_for):
    limiter = limiter_for(limit=300, window=5)
    sends: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = reserve(limiter, 100)
        with lock:
            sends.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sends) == 800
    assert sliding_window_max(sends, 5000) <= 300 * 0.98 + 1


def test_a_turn_too_far_off_is_not_reserved(limiter_for):
    limiter = limiter_for(limit=100, window=10, max_wait=0.5)
    granted = [limiter.acquire() for _ in range(20)]
    assert [g.granted for g in granted[:5]] == [True] * 5
    refused = [g for g in granted if not g.granted]
    assert refused, "turns more than 0.5 s away must not be reserved"
    # Refused callers are told when to ask again: one interval apart in the order they
    # were refused, each when its turn will be within reach; not all at once.
    backs = [g.wait_seconds for g in refused]
    interval = limiter.budget.interval_ms / 1000
    assert all(b - a >= interval * 0.8 for a, b in itertools.pairwise(backs)), backs
    # A refusal reserves no turn: the budget is spent exactly as far as before.
    tat = limiter.client.hget(limiter.key, "tat")
    assert not limiter.acquire().granted
    assert limiter.client.hget(limiter.key, "tat") == tat


def test_yields_when_braze_reports_less_left(limiter_for):
    limiter = limiter_for(limit=1000, window=10)
    now_s = server_time_ms(limiter.client) / 1000
    # Another client spent most of the window: Braze says 20 left until the reset in 5 s.
    assert limiter.observe(RateLimit(limit=1000, remaining=20, reset_epoch=now_s + 5))
    sends = reserve(limiter, 40)
    before_reset = [t for t in sends if t < (now_s + 5) * 1000]
    assert len(before_reset) <= 20 - limiter.budget.burst + 1


def test_headers_said_not_to_yield_leave_the_budget_as_the_script_would(limiter_for):
    """`may_yield` (issue 26: the poster skips the script when it is False) never says no
    where observe_rate_limit.lua would move the budget: for headers read after a request
    granted for `send_at` (Redis's now past it), every "no" is a script answering 0 with
    "tat" unchanged; a grid of what Braze may say and how far the budget is spent, the
    boundary included."""
    limiter = limiter_for(limit=1000, window=10)
    budget = limiter.budget
    client = limiter.client
    said_no = yielded = 0
    for spent in (0, budget.burst + 3):
        for remaining in (0, 1, budget.burst, budget.burst + 1, 20, 500, 990, 10**6):
            for reset_in_ms in (-1000, 0, 5, 300, 3_000, 9_999, 19_000, 10**6):
                client.delete(limiter.key)
                grant = limiter.acquire()
                for _ in range(spent):
                    grant = limiter.acquire()
                assert grant.send_at_ms is not None
                # The request went out at its turn and was answered: Redis's now is past it.
                wait_for(
                    lambda g=grant: server_time_ms(client) > g.send_at_ms, timeout=5, interval=0.002
                )
                now = server_time_ms(client)
                # The boundary: headers whose floor lands exactly at the send time.
                at_floor = (
                    grant.send_at_ms
                    + (remaining - budget.burst) * budget.interval_ms
                    - budget.tolerance_ms
                ) / 1000
                for reset_epoch in ((now + reset_in_ms) / 1000, at_floor):
                    tat = client.hget(limiter.key, "tat")
                    if limiter.may_yield(remaining, reset_epoch, grant.send_at_ms):
                        continue
                    said_no += 1
                    moved = limiter.observe(RateLimit(1000, remaining, reset_epoch))
                    assert not moved, (spent, remaining, reset_in_ms, reset_epoch)
                    assert client.hget(limiter.key, "tat") == tat
    # Both answers occur: the grid is not all "no".
    client.delete(limiter.key)
    grant = limiter.acquire()
    now_s = server_time_ms(client) / 1000
    assert limiter.may_yield(20, now_s + 5, grant.send_at_ms)
    yielded += limiter.observe(RateLimit(1000, 20, now_s + 5), sent_at_ms=grant.send_at_ms)
    assert said_no > 100 and yielded == 1


def test_ignores_headers_that_leave_room(limiter_for):
    limiter = limiter_for(limit=1000, window=10)
    now_s = server_time_ms(limiter.client) / 1000
    assert not limiter.observe(RateLimit(limit=1000, remaining=990, reset_epoch=now_s + 5))
    assert not limiter.observe(RateLimit(limit=1000, remaining=None, reset_epoch=None))
    # A reset in the past, or absurdly far ahead, is not trusted.
    assert not limiter.observe(RateLimit(limit=1000, remaining=0, reset_epoch=now_s - 1))
    assert not limiter.observe(RateLimit(limit=1000, remaining=0, reset_epoch=now_s + 3600))


def test_a_429_pauses_everyone_until_the_reset(limiter_for, redis_client):
    limiter = limiter_for(limit=1000, window=10)
    other = RateLimiter(redis_client, limiter.key, limiter.budget, max_wait_seconds=1000)
    now_s = server_time_ms(limiter.client) / 1000
    assert limiter.pause_until(now_s + 3, "429 from Braze")
    grant = other.acquire()
    assert not grant.granted
    assert 2.0 < grant.wait_seconds <= 3.01
    state = other.state()
    assert state.tokens_left == 0
    assert state.pause_reason == "429 from Braze"
    assert state.paused_until_ms == pytest.approx((now_s + 3) * 1000, abs=1)


def test_state_reports_tokens_left(limiter_for):
    limiter = limiter_for(limit=1000, window=1000)  # refills one per second: none in the test
    assert limiter.state().tokens_left == limiter.budget.burst
    reserve(limiter, 3)
    assert limiter.state().tokens_left == limiter.budget.burst - 3


def test_open_circuit_lets_one_probe_through_per_interval(redis_client):
    budget = Budget.for_limit(1000, 10, headroom=0.02, burst_fraction=0.01)
    limiter = RateLimiter(
        redis_client, "{test}:limiter", budget, max_wait_seconds=1000, probe_interval_seconds=0.3
    )
    assert limiter.open_circuit("HTTP 401: Invalid API key")
    assert not limiter.open_circuit("HTTP 401: again")  # already open: since stays
    state = limiter.state()
    assert state.circuit == "HTTP 401: again" and state.circuit_since_ms is not None
    first = limiter.acquire()
    assert not first.granted and 0 < first.wait_seconds <= 0.3

    probe = wait_for(lambda: (g := limiter.acquire()).granted and g, timeout=5, interval=0.02)
    assert probe.probe
    others = [limiter.acquire() for _ in range(5)]
    assert not any(g.granted for g in others), "one probe per interval, nobody else"

    assert limiter.close_circuit()
    assert limiter.state().circuit is None
    resumed = limiter.acquire()
    assert resumed.granted and not resumed.probe
