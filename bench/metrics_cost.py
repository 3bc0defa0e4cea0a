"""What a Prometheus scrape of `braze-subs metrics` costs against a busy Redis.

    .venv/bin/python -m bench.metrics_cost --pending 500000 --waiting 500 --workers 50

Fills a private redis-server as bench/status_cost.py does (`bench/busy_redis.py`: 500,000
pending changes, 500 batches in flight, 500 waiting in the schedule, 50 workers listed),
records request totals for every endpoint and status a fleet can produce, then scrapes the
exporter's `/metrics` over HTTP N times and prints p50/p99 of a scrape, the Redis commands
one scrape sends, and the slowest one Redis logged (SLOWLOG, threshold 0). A scrape that
scanned a big key would grow with the buffer; this one should not.

Then (issue 23) a second workspace, `eu`, is filled the same way in its own key space and
the same scrapes are timed with both workspaces exported (`two_workspaces_*`): a scrape
reads each workspace as it read the one, so it should cost about twice as much.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack

import httpx
from prometheus_client import start_http_server

from admin.exporter import registry_for
from admin.status import Target
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
from delivery.braze_client import V1_PATH, V2_PATH
from delivery.services import Services
from devtools.processes import free_port
from stores import counters
from stores.clock import server_time_ms


def record_totals(found: Services) -> None:
    """Request totals for every endpoint and status a fleet can produce."""
    now = server_time_ms(found.redis)
    for endpoint in (V1_PATH, V2_PATH):
        for status in (201, 400, 401, 429, 500, 503, None):
            counters.record(
                found.redis,
                found.keys,
                now,
                identifiers=50,
                throttled=status == 429,
                endpoint=endpoint,
                status=status,
            )


def scrapes(found: Services, targets: list[Target], count: int) -> dict[str, float | int]:
    """`count` scrapes over HTTP of an exporter of `targets`: p50/p99, commands, slowest."""
    client = found.redis
    registry = registry_for(client, found.keys.deployment, None, targets=targets)
    server, _thread = start_http_server(port := free_port(), addr="127.0.0.1", registry=registry)
    try:
        scrape_url = f"http://127.0.0.1:{port}/metrics"
        with httpx.Client() as http:
            body = http.get(scrape_url).text  # warm up
            log_every_command(client)
            http.get(scrape_url)
            commands_per_scrape = len(logged_commands(client))
            client.slowlog_reset()
            timings = []
            for _ in range(count):
                began = time.perf_counter()
                http.get(scrape_url).raise_for_status()
                timings.append((time.perf_counter() - began) * 1000)
        slowest = max(entry["duration"] for entry in logged_commands(client))
    finally:
        server.shutdown()
    p50, p99 = p50_p99(timings)
    return {
        "scrape_ms_p50": p50,
        "scrape_ms_p99": p99,
        "redis_commands_per_scrape": commands_per_scrape,
        "slowest_redis_command_us": int(slowest),
        "exposition_bytes": len(body.encode()),
    }


def run(args: argparse.Namespace) -> dict[str, float | int]:
    with ExitStack() as stack:
        found, _filled = stack.enter_context(busy_services(args))
        record_totals(found)
        one = [Target(DEFAULT_WORKSPACE, found.keys, found.limiter)]
        figures: dict[str, float | int] = {
            "pending": args.pending,
            "waiting": args.waiting,
            "workers": args.workers,
            "scrapes": args.scrapes,
            **scrapes(found, one, args.scrapes),
        }
        eu = other_workspace(found, "eu")
        fill(eu, args.pending)
        fill_fleet(eu, args.waiting, args.workers)
        record_totals(eu)
        two = [*one, Target("eu", eu.keys, eu.limiter)]
        both = scrapes(found, two, args.scrapes)
        return figures | {f"two_workspaces_{name}": value for name, value in both.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fill_arguments(parser)
    parser.add_argument("--scrapes", type=int, default=200)
    publish(run(parser.parse_args()), "metrics-cost.json")


if __name__ == "__main__":
    main()
