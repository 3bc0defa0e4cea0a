"""What a Prometheus scrape of `braze-subs metrics` costs against a busy Redis.

    .venv/bin/python -m bench.metrics_cost --pending 500000 --waiting 500 --workers 50

Fills a private redis-server as bench/status_cost.py does (`bench/busy_redis.py`: 500,000
pending changes, 500 batches in flight, 500 waiting in the schedule, 50 workers listed),
records request totals for every endpoint and status a fleet can produce, then scrapes the
exporter's `/metrics` over HTTP N times and prints p50/p99 of a scrape, the Redis commands
one scrape sends, and the slowest one Redis logged (SLOWLOG, threshold 0). A scrape that
scanned a big key would grow with the buffer; this one should not.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack

import httpx
from prometheus_client import start_http_server

from admin.exporter import registry_for
from bench.busy_redis import add_fill_arguments, busy_services, log_every_command, logged_commands
from bench.figures import p50_p99, publish
from delivery.braze_client import V1_PATH, V2_PATH
from devtools.processes import free_port
from stores import counters
from stores.clock import server_time_ms


def run(args: argparse.Namespace) -> dict[str, float | int]:
    with ExitStack() as stack:
        found, _filled = stack.enter_context(busy_services(args))
        client, keys = found.redis, found.keys
        now = server_time_ms(client)
        for endpoint in (V1_PATH, V2_PATH):
            for status in (201, 400, 401, 429, 500, 503, None):
                counters.record(
                    client,
                    keys,
                    now,
                    identifiers=50,
                    throttled=status == 429,
                    endpoint=endpoint,
                    status=status,
                )
        port = free_port()
        server, _thread = start_http_server(
            port, addr="127.0.0.1", registry=registry_for(client, keys, found.limiter)
        )
        stack.callback(server.shutdown)
        scrape_url = f"http://127.0.0.1:{port}/metrics"
        with httpx.Client() as http:
            body = http.get(scrape_url).text  # warm up
            log_every_command(client)
            http.get(scrape_url)
            commands_per_scrape = len(logged_commands(client))
            client.slowlog_reset()
            timings = []
            for _ in range(args.scrapes):
                began = time.perf_counter()
                http.get(scrape_url).raise_for_status()
                timings.append((time.perf_counter() - began) * 1000)
        slowest = max(entry["duration"] for entry in logged_commands(client))
        p50, p99 = p50_p99(timings)
        return {
            "pending": args.pending,
            "waiting": args.waiting,
            "workers": args.workers,
            "scrapes": args.scrapes,
            "scrape_ms_p50": p50,
            "scrape_ms_p99": p99,
            "redis_commands_per_scrape": commands_per_scrape,
            "slowest_redis_command_us": int(slowest),
            "exposition_bytes": len(body.encode()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_fill_arguments(parser)
    parser.add_argument("--scrapes", type=int, default=200)
    publish(run(parser.parse_args()), "metrics-cost.json")


if __name__ == "__main__":
    main()
