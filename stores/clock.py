"""Redis's clock: the one clock every process agrees on.

Every timestamp braze-subs stores or compares (due times, leases, heartbeats, refusals,
per-second counters) is Redis server time, never a worker's own clock. The Lua scripts read
it with `TIME` (`_prelude.lua`: `now_ms()`, `now_ms_exact()`); Python reads it here, at the
same two precisions.
"""

from __future__ import annotations

from redis import Redis


def server_time_ms(client: Redis) -> int:
    """Redis server time in whole milliseconds (`now_ms()` in the scripts)."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def server_time_exact_ms(client: Redis) -> float:
    """Redis server time in fractional milliseconds (`now_ms_exact()`: the limiter's)."""
    return exact_ms(client.time())


def exact_ms(reply: tuple[int, int]) -> float:
    """A `TIME` reply (seconds, microseconds), e.g. from a pipeline, in fractional ms."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) / 1000
