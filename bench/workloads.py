"""The workloads every system runs: which writes, when, on how many workers. Pure: a
workload is a list of writes with their offsets in seconds, built from a seeded RNG, so
every system gets exactly the same one."""

from __future__ import annotations

import random
from dataclasses import dataclass

Key = tuple[str, str, str]  # group, identifier kind, value
KINDS = ("external_id", "email", "phone")
STATES = ("subscribed", "unsubscribed")


@dataclass(frozen=True, slots=True)
class Write:
    """One subscription change: `at` seconds after the stream starts (0 for a backlog)."""

    group_id: str
    state: str
    kind: str
    value: str
    at: float = 0.0

    @property
    def key(self) -> Key:
        return (self.group_id, self.kind, self.value)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    writes: tuple[Write, ...]
    workers: int
    backlog: bool = False  # everything is enqueued before the workers start
    # Seconds allowed after the last write (a stream) or after the workers are ready (a
    # backlog) before the run is cut and whatever has not arrived is counted as such.
    timebox: float = 20.0
    # Seconds into the stream (a backlog: after the workers are ready) at which worker 0 gets
    # SIGKILL.
    kill_at: float | None = None
    allows_packing: bool = False  # identifiers in several groups: v2 can pack them
    # A backlog workload's stream of further writes, started when the workers are ready
    # (a steady stream arriving while the backlog drains); its latency is reported apart.
    during: tuple[Write, ...] = ()

    @property
    def keys(self) -> int:
        return len({w.key for w in self.writes})

    @property
    def duration(self) -> float:
        return max((w.at for w in self.writes), default=0.0)


def identity(n: int, group: int) -> tuple[str, str, str]:
    """Identifier `n` as (group id, kind, value): kinds rotate; phones go to SMS groups,
    emails and external ids to email groups."""
    kind = KINDS[n % 3]
    if kind == "email":
        return f"email-{group}", kind, f"user{n}@example.com"
    if kind == "phone":
        return f"sms-{group}", kind, f"+1415{2_000_000 + n:07d}"
    return f"email-{group}", kind, f"user-{n}"


def stream_of_unique(
    rate: float, duration: float, groups: int, seed: int, first: int = 0
) -> list[Write]:
    """`rate` changes per second for `duration` seconds, each a new identifier (numbered
    from `first`)."""
    rng = random.Random(seed)
    writes = []
    for n in range(round(rate * duration)):
        group_id, kind, value = identity(first + n, n % groups)
        writes.append(Write(group_id, rng.choice(STATES), kind, value, at=n / rate))
    return writes


def backlog_across_groups(users: int, groups: int, seed: int) -> list[Write]:
    """Each user changes in all `groups` groups of its channel, to one state (a user who
    unsubscribes from everything): users x groups unique changes, user by user."""
    rng = random.Random(seed)
    writes = []
    for n in range(users):
        state = rng.choice(STATES)
        for group in range(groups):
            group_id, kind, value = identity(n, group)
            writes.append(Write(group_id, state, kind, value))
    return writes


def flipping_stream(
    rate: float, duration: float, population: int, groups: int, seed: int
) -> list[Write]:
    """`rate` changes per second over `population` identifiers, in bursts of 2-3 flips of
    one identifier 10 ms apart (a user toggling a checkbox), alternating its state."""
    rng = random.Random(seed)
    current: dict[int, str] = {}
    writes: list[Write] = []
    total = round(rate * duration)
    while len(writes) < total:
        at = len(writes) / rate
        n = rng.randrange(population)
        group_id, kind, value = identity(n, n % groups)
        for flip in range(min(rng.choice((2, 3)), total - len(writes))):
            state = "unsubscribed" if current.get(n) == "subscribed" else "subscribed"
            current[n] = state
            writes.append(Write(group_id, state, kind, value, at=at + flip * 0.01))
    return writes


@dataclass(frozen=True)
class Sizes:
    """How big each workload is: the default run and `--quick`."""

    stream_rate: float  # changes per second, under every system's capacity
    stream_seconds: float
    backlog_users: int
    backlog_groups: int
    backlog_timebox: float
    flip_population: int
    flip_seconds: float
    kill_seconds: float
    grace: float
    kill_grace: float
    # Kill a worker this many seconds after the workers are ready, while the backlog drains
    # (braze-subs' first request comes ~1.5 s after ready and it drains for ~3.5 s); None
    # leaves the workload out.
    kill_backlog_at: float | None = None
    kill_backlog_timebox: float = 18.0
    # Seconds of the steady stream that arrives while the backlog drains (0: left out).
    mixed_stream_seconds: float = 0.0


FULL = Sizes(
    stream_rate=40,
    stream_seconds=20,
    backlog_users=2_000,
    backlog_groups=4,
    backlog_timebox=15,
    flip_population=100,
    flip_seconds=15,
    kill_seconds=20,
    grace=10,
    kill_grace=12,
    kill_backlog_at=3.0,
    mixed_stream_seconds=6,
)
QUICK = Sizes(
    stream_rate=40,
    stream_seconds=5,
    backlog_users=400,
    backlog_groups=4,
    backlog_timebox=6,
    flip_population=40,
    flip_seconds=5,
    kill_seconds=6,
    grace=5,
    kill_grace=10,
)


def build(sizes: Sizes, worker_counts: list[int], seed: int = 6) -> list[Workload]:
    """The workloads of one comparison: steady stream, backlog (at each worker count),
    flips, a worker killed mid-stream and (unless `sizes` leaves it out) one killed while
    the backlog drains; the first worker count is used for all but the backlog."""
    workers = worker_counts[0]
    rate = sizes.stream_rate
    steady = tuple(stream_of_unique(rate, sizes.stream_seconds, 4, seed))
    backlog = tuple(backlog_across_groups(sizes.backlog_users, sizes.backlog_groups, seed))
    flips = tuple(flipping_stream(rate, sizes.flip_seconds, sizes.flip_population, 4, seed))
    killed = tuple(stream_of_unique(rate, sizes.kill_seconds, 4, seed + 1))
    workloads = [
        Workload(
            "steady",
            f"Steady stream: {rate:g} new identifiers/s for {sizes.stream_seconds:g} s, "
            f"{workers} workers",
            steady,
            workers,
            timebox=sizes.grace,
        )
    ]
    for count in worker_counts:
        workloads.append(
            Workload(
                f"backlog-{count}w",
                f"Backlog: {len(backlog):,} unique changes ({sizes.backlog_users:,} identifiers "
                f"x {sizes.backlog_groups} groups), {count} workers",
                backlog,
                count,
                backlog=True,
                timebox=sizes.backlog_timebox,
                allows_packing=True,
            )
        )
    workloads.append(
        Workload(
            "flips",
            f"Flips: {rate:g} changes/s for {sizes.flip_seconds:g} s over "
            f"{sizes.flip_population} identifiers, in bursts of 2-3 flips, {workers} workers",
            flips,
            workers,
            timebox=sizes.grace,
        )
    )
    workloads.append(
        Workload(
            "kill-stream",
            f"Worker killed mid-stream: steady {rate:g}/s for {sizes.kill_seconds:g} s, "
            f"{workers} workers, worker 1 gets SIGKILL at {sizes.kill_seconds * 0.4:g} s",
            killed,
            workers,
            timebox=sizes.kill_grace,
            kill_at=sizes.kill_seconds * 0.4,
        )
    )
    if sizes.mixed_stream_seconds:
        during = stream_of_unique(rate, sizes.mixed_stream_seconds, 4, seed + 2, first=10**6)
        workloads.append(
            Workload(
                "mixed",
                f"Stream during a backlog: the backlog above, and {rate:g} new identifiers/s "
                f"for {sizes.mixed_stream_seconds:g} s from when the workers are ready, "
                f"{workers} workers",
                backlog,
                workers,
                backlog=True,
                timebox=sizes.backlog_timebox,
                during=tuple(during),
            )
        )
    if sizes.kill_backlog_at is not None:
        workloads.append(
            Workload(
                "kill-backlog",
                f"Worker killed while draining: the backlog above, {workers} workers, worker 1 "
                f"gets SIGKILL {sizes.kill_backlog_at:g} s after the workers are ready",
                backlog,
                workers,
                backlog=True,
                timebox=sizes.kill_backlog_timebox,
                kill_at=sizes.kill_backlog_at,
            )
        )
    return workloads
