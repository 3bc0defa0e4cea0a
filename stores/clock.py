"""Redis's clock: the one clock every process agrees on.

Every timestamp braze-subs stores or compares (due times, leases, heartbeats, refusals,
per-second counters) is Redis server time, never a worker's own clock. The Lua scripts read
it with `TIME` (`_prelude.lua`: `now_ms()`, `now_ms_exact()`); Python reads it here, at the
same two precisions.
"""

from __future__ import annotations

from redis import Redis

from stores.replication import on_write_node


def server_time_ms(client: Redis, near: str | None = None) -> int:
    """Redis server time in whole milliseconds (`now_ms()` in the scripts). `near`: a key
    whose scripts' clock this must be; on a Redis Cluster TIME then goes to the master
    serving that key's slot (the node whose TIME those scripts read), not to whichever
    node the client picks: the coalescer compares this with the due times its workspace's
    scripts wrote, and nodes on different hosts keep different clocks."""
    if near is None:
        seconds, micros = client.time()
    else:
        seconds, micros = on_write_node(client, near, lambda node: node.time())
    return int(seconds) * 1000 + int(micros) // 1000


def server_time_exact_ms(client: Redis) -> float:
    """Redis server time in fractional milliseconds (`now_ms_exact()`: the limiter's)."""
    return exact_ms(client.time())


def exact_ms(reply: tuple[int, int]) -> float:
    """A `TIME` reply (seconds, microseconds), e.g. from a pipeline, in fractional ms."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) / 1000
