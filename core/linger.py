"""How long a partial batch waits for company: pure arithmetic over the budget's load.

A partial batch spends a whole request on a few identifiers. When the shared budget is
idle that costs nothing and the change reaches Braze at once; when the budget is the
bottleneck every such request displaces up to 50 identifiers' worth of a full one. So the
linger follows the pressure on the budget, from 0 (send at the next tick) to the configured
maximum:

    pressure  = max(recent use, committed ahead, due work, arrivals)   each in [0, 1]
    linger    = max_linger * ramp(pressure; low, high)**2         0 below low, max above high

- recent use: our requests over the last few seconds, as a share of what the budget allows
  in that time (it smooths bursts and feeds back our own partial requests, so a steady
  light stream settles where the linger makes its own requests cost about `low`..`high` of
  the budget);
- committed ahead: how far into the future the shared budget is already promised (our
  reservations, and Braze's own X-RateLimit-Remaining, which the limiter syncs in: the
  workspace's other clients spending it), relative to the longest linger. A request that
  would wait for its turn anyway may as well wait for company;
- due work: the requests the due changes need, as a share of what the budget allows over
  one longest linger. A backlog or a bulk import fills it at once, so batches stay full
  from the first tick, before any request has been counted;
- arrivals: the full requests the changes arriving per second need, as a share of the
  budget's rate. A producer feeding thousands of changes a second in small calls shows
  here before the due work piles up, while a light stream stays near 0.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Load:
    """What the coalescer reads from Redis once per tick."""

    recent_requests: int  # our requests in the last `recent_seconds`
    recent_seconds: float
    committed_ahead_ms: float  # how far the shared budget is spent into the future
    due_changes: int  # changes due now (pending, not in a batch)
    more_due: bool  # more were due than one tick reads
    arrivals_per_second: float = 0.0  # changes enqueued per second lately, fleet-wide


@dataclass(frozen=True, slots=True)
class BudgetRate:
    """The budget's sustained rate, in requests per second (after its headroom)."""

    requests_per_second: float


def clamp01(value: float) -> float:
    return min(1.0, max(0.0, value))


def pressure(load: Load, rate: BudgetRate, *, max_linger_ms: float, max_identifiers: int) -> float:
    """The pressure on the shared budget, in [0, 1] (see the module's docstring)."""
    if load.more_due:
        return 1.0
    per_second = max(rate.requests_per_second, 1e-9)
    recent = load.recent_requests / (per_second * max(load.recent_seconds, 1e-3))
    horizon_s = max(max_linger_ms, 1.0) / 1000
    ahead = load.committed_ahead_ms / (horizon_s * 1000)
    needed = -(-load.due_changes // max(1, max_identifiers))  # full requests' worth
    due = needed / (per_second * horizon_s)
    arriving = load.arrivals_per_second / max(1, max_identifiers) / per_second
    return clamp01(max(recent, ahead, due, arriving))


def linger_ms(pressure_now: float, *, max_linger_ms: float, low: float, high: float) -> int:
    """The linger for this pressure: 0 up to `low`, `max_linger_ms` from `high`, growing
    with the square of the way between. The square keeps the wait short while the budget
    has room (a quarter of the way up: 1/16 of the longest linger) and lets it climb
    steeply as the budget nears its limit, so a light stream is not held by the jitter of
    its own load."""
    if high <= low:
        return round(max_linger_ms) if pressure_now >= high else 0
    return round(max_linger_ms * clamp01((pressure_now - low) / (high - low)) ** 2)
