"""What the fleet is doing, read from Redis for `status` and the Prometheus exporter:
the batches waiting in the schedule (by reason), the batches being posted now, the worker
processes alive, when beat was last seen and when the coalescer last ticked. Read-only: the
workers, beat and the coalescer write these keys (`Keys.schedule`, `Keys.schedule_reasons`,
`Keys.claims`, `Keys.workers`, `Keys.heartbeat`, `Keys.beat_seen`,
`Keys.coalesce_last_tick`).

Cheap by construction, so a scrape every few seconds costs nothing against a busy Redis:
no SCAN or KEYS; the schedule and its reasons hold at most the batches in flight
(MAX_BATCHES_IN_FLIGHT, a few hundred), read with ZCARD, the schedule's first entry and
one HVALS; the workers list is read at most `WORKERS_READ` entries deep, newest
heartbeat first, and their heartbeat keys with one MGET. Two round trips in all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.client import Pipeline

from core.waiting import WaitReason
from stores.keys import Keys

# Every reason, in the order `status` lists them.
WAIT_REASONS: tuple[str, ...] = tuple(reason.value for reason in WaitReason)
# How many entries of the workers list are read, most recent heartbeat first. An alive
# worker renews its heartbeat every few seconds, so it is always among the most recent:
# the alive count is exact up to this many alive workers.
WORKERS_READ = 200
# How many alive worker ids `status --json` lists.
ALIVE_IDS_SHOWN = 20
# "Seen lately": in the workers list with a beat in the last day: the alive, and the dead
# the coalescer's tick has not yet taken back from (take_back.lua removes a dead worker
# from the list once it holds nothing, so this is not a day's history of the fleet).
SEEN_WINDOW_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Waiting:
    """The batches waiting in the schedule for their next try."""

    total: int
    # Every `WaitReason` value -> batches waiting for it (zero-filled). A reason this
    # version does not know (written by a newer one) is counted in `total` only.
    by_reason: dict[str, int]
    # Seconds from now to the soonest due entry; negative: overdue by that much; None:
    # nothing waits.
    next_due_seconds: float | None


@dataclass(frozen=True, slots=True)
class Workers:
    """The worker processes, by their heartbeats."""

    alive: int  # heartbeat key present now
    seen_last_day: int  # alive, or dead and still holding something (see SEEN_WINDOW_MS)
    alive_ids: list[str] = field(default_factory=list)  # sorted, at most ALIVE_IDS_SHOWN


@dataclass(frozen=True, slots=True)
class Fleet:
    waiting: Waiting
    posting: int  # batches claimed by a worker now (posting, or its lease not yet ended)
    workers: Workers
    beat_seen_ms: int | None = None  # beat's last heartbeat (Redis clock); None: never
    last_tick_ms: int | None = None  # the last finished coalescer tick; None: never


def _queue_waiting(pipe: Pipeline, keys: Keys) -> None:
    pipe.zcard(keys.schedule)
    pipe.zrange(keys.schedule, 0, 0, withscores=True)
    pipe.hvals(keys.schedule_reasons)


def _waiting(replies: list[Any], now_ms: int) -> Waiting:
    total, soonest, reasons = replies
    found = Counter(reason.decode() for reason in reasons)
    return Waiting(
        total=int(total),
        by_reason={reason: found.get(reason, 0) for reason in WAIT_REASONS},
        next_due_seconds=round((soonest[0][1] - now_ms) / 1000, 3) if soonest else None,
    )


def _queue_workers(pipe: Pipeline, keys: Keys, now_ms: int) -> None:
    pipe.zrevrange(keys.workers, 0, WORKERS_READ - 1)
    pipe.zcount(keys.workers, now_ms - SEEN_WINDOW_MS, "+inf")


def _workers(client: Redis, keys: Keys, replies: list[Any]) -> Workers:
    listed, seen = replies
    ids = [worker.decode() for worker in listed]
    beats = client.mget([keys.heartbeat(worker) for worker in ids]) if ids else []
    alive = sorted(worker for worker, beat in zip(ids, beats, strict=True) if beat is not None)
    return Workers(alive=len(alive), seen_last_day=int(seen), alive_ids=alive[:ALIVE_IDS_SHOWN])


def waiting_by_reason(client: Redis, keys: Keys, now_ms: int) -> Waiting:
    """The schedule: how many batches wait, for what, and when the soonest is due."""
    pipe = client.pipeline(transaction=False)
    _queue_waiting(pipe, keys)
    return _waiting(pipe.execute(), now_ms)


def batches_posting(client: Redis, keys: Keys) -> int:
    """Batches a worker holds a claim on now."""
    return int(client.zcard(keys.claims))


def workers_alive(client: Redis, keys: Keys, now_ms: int) -> Workers:
    """The worker processes whose heartbeat key exists, and those seen in the last day."""
    pipe = client.pipeline(transaction=False)
    _queue_workers(pipe, keys, now_ms)
    return _workers(client, keys, pipe.execute())


def read_fleet(client: Redis, keys: Keys, now_ms: int) -> Fleet:
    """All of the above in two round trips (`now_ms`: Redis's clock, `server_time_ms`)."""
    pipe = client.pipeline(transaction=False)
    _queue_waiting(pipe, keys)
    pipe.zcard(keys.claims)
    _queue_workers(pipe, keys, now_ms)
    pipe.get(keys.beat_seen)
    pipe.get(keys.coalesce_last_tick)
    replies = pipe.execute()
    beat_seen, last_tick = replies[6:8]
    return Fleet(
        waiting=_waiting(replies[0:3], now_ms),
        posting=int(replies[3]),
        workers=_workers(client, keys, replies[4:6]),
        beat_seen_ms=int(float(beat_seen)) if beat_seen else None,
        last_tick_ms=int(float(last_tick)) if last_tick else None,
    )
