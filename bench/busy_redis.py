"""A private redis-server filled like a busy deployment, for the benchmarks of what a read
costs (`bench.status_cost`, `bench.metrics_cost`): the same fill, so their figures compare.

`fill` goes through the real code paths (producer enqueue, coalescer take); `fill_fleet`
writes a schedule of waiting batches, claims and worker heartbeats the way workers do.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

from pydantic import SecretStr
from redis import Redis

from config.settings import load_settings
from config.workspaces import Workspace
from core.changes import Change, IdentifierKind, SubscriptionState
from core.planning import plan_batches
from core.waiting import WaitReason
from delivery.services import Services
from devtools.processes import local_redis
from stores.clock import server_time_ms


def add_fill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pending", type=int, default=500_000)
    parser.add_argument("--waiting", type=int, default=500, help="batches in the schedule")
    parser.add_argument("--workers", type=int, default=50, help="workers listed (4/5 alive)")


@contextmanager
def busy_services(args: argparse.Namespace) -> Iterator[tuple[Services, float]]:
    """The services of a private redis-server filled as `args` say (`add_fill_arguments`),
    and the seconds the fill took."""
    with (
        TemporaryDirectory(prefix="braze-subs-bench-") as workdir,
        local_redis(Path(workdir)) as url,
    ):
        found = Services(
            load_settings(
                redis_url=url, braze_api_key="bench-key", braze_rest_endpoint="http://127.0.0.1:9"
            )
        )
        started = time.perf_counter()
        fill(found, args.pending)
        fill_fleet(found, args.waiting, args.workers)
        yield found, time.perf_counter() - started


def other_workspace(found: Services, name: str) -> Services:
    """The services of another workspace (issue 23) on the same Redis as `found`: its own
    key space (`{prefix/NAME}`), endpoint and key, as BRAZE_WORKSPACES_FILE would give."""
    workspace = Workspace(
        name=name,
        rest_endpoint=found.settings.rest_endpoint,
        api_key=SecretStr(f"bench-key-{name}"),
    )
    return Services(found.settings.for_workspace(workspace), redis=found.redis)


def fill(found: Services, pending: int) -> None:
    buffer = found.buffer
    chunk = 50_000
    for start in range(0, pending, chunk):
        buffer.enqueue(
            [
                Change(
                    f"group-{n % 8}",
                    SubscriptionState.SUBSCRIBED,
                    IdentifierKind.EMAIL,
                    f"user{n}@example.com",
                )
                for n in range(start, min(start + chunk, pending))
            ]
        )
    # 500 batches in flight (25,000 identifiers), as MAX_BATCHES_IN_FLIGHT allows.
    now = server_time_ms(found.redis)
    due, _ = buffer.read_due(now, 25_000)
    plan = plan_batches(due, now_ms=now, max_identifiers=50)
    buffer.take([[batch] for batch in plan], 600_000)


def fill_fleet(found: Services, waiting: int, workers: int) -> None:
    """`waiting` batches in the schedule (reasons in turn, due over the next minute), one
    claim per ten of them, `workers` in the workers list with four in five alive."""
    client, keys = found.redis, found.keys
    now = server_time_ms(client)
    reasons = list(WaitReason)
    batches = {f"bench-batch-{n}": now + (n * 997) % 60_000 for n in range(waiting)}
    pipe = client.pipeline(transaction=False)
    if batches:
        pipe.zadd(keys.schedule, batches)
        pipe.hset(
            keys.schedule_reasons,
            mapping={batch: str(reasons[n % len(reasons)]) for n, batch in enumerate(batches)},
        )
        pipe.zadd(keys.claims, {f"bench-posting-{n}": now + 30_000 for n in range(waiting // 10)})
    for n in range(workers):
        worker = f"bench-host-{n % 5}:{1000 + n}:{n:08x}"
        pipe.zadd(keys.workers, {worker: now - n * 1000})
        if n % 5:
            pipe.set(keys.heartbeat(worker), "1", px=600_000)
    pipe.execute()


def log_every_command(client: Redis) -> None:
    """SLOWLOG from now on logs every command (threshold 0), the log emptied."""
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 100_000)
    client.slowlog_reset()


def logged_commands(client: Redis) -> list[dict[str, float]]:
    """What SLOWLOG holds since `log_every_command` (or the last reset)."""
    entries: list[dict[str, float]] = client.slowlog_get(100_000)
    return entries
