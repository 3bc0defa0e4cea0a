"""core/linger.py: the adaptive linger, as pure arithmetic."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from core.linger import BudgetRate, Load, linger_ms, pressure

RATE = BudgetRate(5000 * 0.98 / 60)  # Braze's default limit after the 2 % headroom


def load(**overrides: object) -> Load:
    values: dict[str, object] = {
        "recent_requests": 0,
        "recent_seconds": 5.0,
        "committed_ahead_ms": 0.0,
        "due_changes": 0,
        "more_due": False,
    }
    values.update(overrides)
    return Load(**values)  # type: ignore[arg-type]


def p(**overrides: object) -> float:
    return pressure(load(**overrides), RATE, max_linger_ms=2000, max_identifiers=50)


def test_an_idle_budget_is_no_pressure() -> None:
    assert p() == 0.0
    assert p(due_changes=3) < 0.01


def test_each_signal_alone_reaches_full_pressure() -> None:
    assert p(more_due=True) == 1.0
    assert p(recent_requests=math.ceil(RATE.requests_per_second * 5)) == 1.0
    assert p(committed_ahead_ms=2000) == 1.0
    assert p(due_changes=50 * math.ceil(RATE.requests_per_second * 2)) == 1.0
    assert p(arrivals_per_second=50 * RATE.requests_per_second) == 1.0


def test_a_light_stream_of_arrivals_is_little_pressure() -> None:
    assert p(arrivals_per_second=40) < 0.01


def test_half_the_budget_spent_recently_is_half_the_pressure() -> None:
    assert abs(p(recent_requests=round(RATE.requests_per_second * 2.5)) - 0.5) < 0.01


def test_linger_ramps_between_low_and_high() -> None:
    kwargs = {"max_linger_ms": 2000, "low": 0.25, "high": 0.75}
    assert linger_ms(0.0, **kwargs) == 0
    assert linger_ms(0.25, **kwargs) == 0
    assert linger_ms(0.5, **kwargs) == 500  # half way up: a quarter of the longest
    assert linger_ms(0.375, **kwargs) == 125
    assert linger_ms(0.75, **kwargs) == 2000
    assert linger_ms(1.0, **kwargs) == 2000


def test_equal_thresholds_are_a_step() -> None:
    assert linger_ms(0.0, max_linger_ms=2000, low=0.0, high=0.0) == 2000
    assert linger_ms(0.49, max_linger_ms=2000, low=0.5, high=0.5) == 0


@given(
    recent=st.integers(0, 10_000),
    seconds=st.floats(0.001, 60),
    ahead=st.floats(0, 1e7),
    due=st.integers(0, 10**7),
    more=st.booleans(),
)
def test_pressure_is_a_fraction(
    recent: int, seconds: float, ahead: float, due: int, more: bool
) -> None:
    value = pressure(
        Load(recent, seconds, ahead, due, more), RATE, max_linger_ms=2000, max_identifiers=50
    )
    assert 0.0 <= value <= 1.0


@given(
    a=st.floats(0, 1),
    b=st.floats(0, 1),
    low=st.floats(0, 1),
    high=st.floats(0, 1),
    longest=st.floats(0, 10_000),
)
def test_linger_grows_with_pressure_and_stays_in_bounds(
    a: float, b: float, low: float, high: float, longest: float
) -> None:
    low, high = min(low, high), max(low, high)
    small, large = sorted((a, b))
    first = linger_ms(small, max_linger_ms=longest, low=low, high=high)
    second = linger_ms(large, max_linger_ms=longest, low=low, high=high)
    assert 0 <= first <= second <= round(longest)
