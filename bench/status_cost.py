"""What `braze-subs status` costs against a busy Redis: the time of one status read, and of
the Redis commands it sends, with a large buffer, many batches in flight and dead letters.

    .venv/bin/python -m bench.status_cost --pending 500000 --waiting 500 --workers 50

Fills a private redis-server through the real code paths (producer enqueue, coalescer
take, dead-letter), writes a schedule of waiting batches, claims and worker heartbeats the
way the workers do (`fill_fleet`), then reads the status N times and prints p50/p99 of the
read, of its fleet part alone (`stores/fleet.py`), and the slowest command Redis logged for
it (SLOWLOG, threshold 0). A read that scanned a big key would grow with the buffer; this
one should not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

from admin.status import read_status
from config.settings import load_settings
from core.changes import Change, IdentifierKind, SubscriptionState
from core.planning import plan_batches
from core.waiting import WaitReason
from delivery.services import Services
from devtools.processes import local_redis
from stores.buffer import server_time_ms
from stores.fleet import read_fleet

RESULTS = Path(__file__).resolve().parent / "results"


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


def run(args: argparse.Namespace) -> dict[str, float | int]:
    with ExitStack() as stack:
        workdir = stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-"))
        url = stack.enter_context(local_redis(Path(workdir)))
        found = Services(
            load_settings(
                redis_url=url,
                braze_api_key="bench-key",
                braze_rest_endpoint="http://127.0.0.1:9",
            )
        )
        client, keys, limiter = found.redis, found.keys, found.limiter
        started = time.perf_counter()
        fill(found, args.pending)
        fill_fleet(found, args.waiting, args.workers)
        filled = time.perf_counter() - started
        client.config_set("slowlog-log-slower-than", 0)
        client.config_set("slowlog-max-len", 100_000)
        client.slowlog_reset()
        timings = []
        for _ in range(args.reads):
            began = time.perf_counter()
            status = read_status(client, keys, limiter)
            timings.append((time.perf_counter() - began) * 1000)
        fleet_timings = []
        for _ in range(args.reads):
            began = time.perf_counter()
            read_fleet(client, keys, server_time_ms(client))
            fleet_timings.append((time.perf_counter() - began) * 1000)
        slowest = max(entry["duration"] for entry in client.slowlog_get(100_000))
        timings.sort()
        fleet_timings.sort()
        return {
            "pending": status.pending,
            "in_flight": status.in_flight,
            "waiting_batches": status.waiting_batches,
            "workers_alive": status.workers_alive,
            "fill_seconds": round(filled, 1),
            "reads": args.reads,
            "read_ms_p50": round(statistics.median(timings), 2),
            "read_ms_p99": round(timings[int(len(timings) * 0.99) - 1], 2),
            "fleet_read_ms_p50": round(statistics.median(fleet_timings), 2),
            "fleet_read_ms_p99": round(fleet_timings[int(len(fleet_timings) * 0.99) - 1], 2),
            "slowest_redis_command_us": int(slowest),
            "used_memory_mib": round(client.info("memory")["used_memory"] / 2**20, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pending", type=int, default=500_000)
    parser.add_argument("--waiting", type=int, default=500, help="batches in the schedule")
    parser.add_argument("--workers", type=int, default=50, help="workers listed (4/5 alive)")
    parser.add_argument("--reads", type=int, default=200)
    figures = run(parser.parse_args())
    for name, value in figures.items():
        print(f"{name:>26}  {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "status-cost.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
