"""What a Prometheus scrape of `braze-subs metrics` costs against a busy Redis.

    .venv/bin/python -m bench.metrics_cost --pending 500000 --waiting 500 --workers 50

Fills a private redis-server as bench/status_cost.py does (500,000 pending changes, 500
batches in flight, 500 waiting in the schedule, 50 workers listed), records request
totals for every endpoint and status a fleet can produce, then scrapes the exporter's
`/metrics` over HTTP N times and prints p50/p99 of a scrape, the Redis commands one
scrape sends, and the slowest one Redis logged (SLOWLOG, threshold 0). A scrape that
scanned a big key would grow with the buffer; this one should not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
from prometheus_client import start_http_server

from admin.exporter import registry_for
from bench.status_cost import fill, fill_fleet
from config.settings import load_settings
from delivery.braze_client import V1_PATH, V2_PATH
from delivery.services import Services
from devtools.processes import free_port, local_redis
from stores import counters
from stores.buffer import server_time_ms

RESULTS = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace) -> dict[str, float | int]:
    with ExitStack() as stack:
        workdir = stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-"))
        url = stack.enter_context(local_redis(Path(workdir)))
        found = Services(
            load_settings(
                redis_url=url, braze_api_key="bench-key", braze_rest_endpoint="http://127.0.0.1:9"
            )
        )
        client, keys = found.redis, found.keys
        fill(found, args.pending)
        fill_fleet(found, args.waiting, args.workers)
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
            client.config_set("slowlog-log-slower-than", 0)
            client.config_set("slowlog-max-len", 100_000)
            client.slowlog_reset()
            http.get(scrape_url)
            commands_per_scrape = len(client.slowlog_get(100_000))
            client.slowlog_reset()
            timings = []
            for _ in range(args.scrapes):
                began = time.perf_counter()
                http.get(scrape_url).raise_for_status()
                timings.append((time.perf_counter() - began) * 1000)
        slowest = max(entry["duration"] for entry in client.slowlog_get(100_000))
        timings.sort()
        return {
            "pending": args.pending,
            "waiting": args.waiting,
            "workers": args.workers,
            "scrapes": args.scrapes,
            "scrape_ms_p50": round(statistics.median(timings), 2),
            "scrape_ms_p99": round(timings[int(len(timings) * 0.99) - 1], 2),
            "redis_commands_per_scrape": commands_per_scrape,
            "slowest_redis_command_us": int(slowest),
            "exposition_bytes": len(body.encode()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pending", type=int, default=500_000)
    parser.add_argument("--waiting", type=int, default=500, help="batches in the schedule")
    parser.add_argument("--workers", type=int, default=50, help="workers listed (4/5 alive)")
    parser.add_argument("--scrapes", type=int, default=200)
    figures = run(parser.parse_args())
    for name, value in figures.items():
        print(f"{name:>26}  {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metrics-cost.json").write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
