"""Fixed-window request counting, windows aligned to epoch multiples of the window length."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """The budget after a request was counted (or refused); values of the X-RateLimit headers."""

    allowed: bool
    limit: int
    remaining: int
    reset: int  # UTC epoch seconds at which the current window ends

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


class FixedWindowCounter:
    """Counts requests in the current fixed window. Not thread-safe: the owner locks."""

    def __init__(self, limit: int, window_seconds: float) -> None:
        self._limit = limit
        self._window_seconds = window_seconds
        self._index: int | None = None
        self._count = 0
        self.max_in_window = 0

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def window_seconds(self) -> float:
        return self._window_seconds

    def configure(self, limit: int, window_seconds: float) -> None:
        """Change the limit and window length live; a new window length starts a new window."""
        if window_seconds != self._window_seconds:
            self._index = None
            self._count = 0
        self._window_seconds = window_seconds
        self._limit = limit

    def consume(self, now: float) -> WindowStatus:
        """Count one request if the window has room; a refused request consumes nothing."""
        index = self._roll(now)
        allowed = self._count < self._limit
        if allowed:
            self._count += 1
            self.max_in_window = max(self.max_in_window, self._count)
        return self._status(index, allowed)

    def spend(self, now: float, requests: int) -> WindowStatus:
        """Consume up to `requests` from the window, as another client of the workspace would."""
        index = self._roll(now)
        self._count += max(0, min(requests, self._limit - self._count))
        self.max_in_window = max(self.max_in_window, self._count)
        return self._status(index, True)

    def peek(self, now: float) -> WindowStatus:
        return self._status(self._roll(now), True)

    def count(self, now: float) -> int:
        self._roll(now)
        return self._count

    def reset(self) -> None:
        self._index = None
        self._count = 0
        self.max_in_window = 0

    def _roll(self, now: float) -> int:
        index = math.floor(now / self._window_seconds)
        if index != self._index:
            self._index = index
            self._count = 0
        return index

    def _status(self, index: int, allowed: bool) -> WindowStatus:
        return WindowStatus(
            allowed=allowed,
            limit=self._limit,
            remaining=max(0, self._limit - self._count),
            reset=math.ceil(round((index + 1) * self._window_seconds, 6)),
        )


def sliding_window_max(times: list[float], window: float) -> int:
    """Most events in any half-open window [t, t + window) (any start, not only aligned)."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best
