"""What `braze-subs status` costs against a busy Redis: the time of one status read, and of
the Redis commands it sends, with a large buffer, many batches in flight and dead letters.

    .venv/bin/python -m bench.status_cost --pending 500000 --waiting 500 --workers 50

Fills a private redis-server through the real code paths (`bench/busy_redis.py`: producer
enqueue, coalescer take; a schedule of waiting batches, claims and worker heartbeats the
way the workers write them), then reads the status N times and prints p50/p99 of the
read, of its fleet part alone (`stores/fleet.py`), and the slowest command Redis logged for
it (SLOWLOG, threshold 0). A read that scanned a big key would grow with the buffer; this
one should not. Then (issue 23) a second workspace, filled the same way in its own key
space, and `status`'s read of both (`two_workspaces_read_ms_*`).
"""

from __future__ import annotations

import argparse
import time

from admin.status import Target, read_overview, read_status
from bench.busy_redis import (
    add_fill_arguments,
    busy_services,
    fill,
    fill_fleet,
    log_every_command,
    logged_commands,
    other_workspace,
)
from bench.figures import p50_p99, publish
from core.routing import DEFAULT_WORKSPACE
from stores.clock import server_time_ms
from stores.fleet import read_fleet


def run(args: argparse.Namespace) -> dict[str, float | int]:
    with busy_services(args) as (found, filled):
        client, keys, limiter = found.redis, found.keys, found.limiter
        log_every_command(client)
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
        slowest = max(entry["duration"] for entry in logged_commands(client))
        read_p50, read_p99 = p50_p99(timings)
        fleet_p50, fleet_p99 = p50_p99(fleet_timings)
        # Issue 23: a second workspace filled the same way; `status` reads both.
        eu = other_workspace(found, "eu")
        fill(eu, args.pending)
        fill_fleet(eu, args.waiting, args.workers)
        targets = [
            Target(DEFAULT_WORKSPACE, keys, limiter),
            Target("eu", eu.keys, eu.limiter),
        ]
        both_timings = []
        for _ in range(args.reads):
            began = time.perf_counter()
            read_overview(client, targets, keys.deployment)
            both_timings.append((time.perf_counter() - began) * 1000)
        both_p50, both_p99 = p50_p99(both_timings)
        return {
            "pending": status.pending,
            "in_flight": status.in_flight,
            "waiting_batches": status.waiting_batches,
            "workers_alive": status.workers_alive,
            "fill_seconds": round(filled, 1),
            "reads": args.reads,
            "read_ms_p50": read_p50,
            "read_ms_p99": read_p99,
            "fleet_read_ms_p50": fleet_p50,
            "fleet_read_ms_p99": fleet_p99,
            "slowest_redis_command_us": int(slowest),
            "two_workspaces_read_ms_p50": both_p50,
            "two_workspaces_read_ms_p99": both_p99,
            "used_memory_mib": round(client.info("memory")["used_memory"] / 2**20, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fill_arguments(parser)
    parser.add_argument("--reads", type=int, default=200)
    publish(run(parser.parse_args()), "status-cost.json")


if __name__ == "__main__":
    main()
