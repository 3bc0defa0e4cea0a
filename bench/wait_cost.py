"""What WAIT-acknowledged enqueues cost (REDIS_WAIT_REPLICAS=1, REDIS_WAIT_TIMEOUT_MS=500)
against today's unacknowledged ones, side by side in one run, on a private plain Redis
with one replica (`redis-server --replicaof`, what Sentinel users run) and on a private
3-master, 3-replica cluster (devtools/redis_cluster.py).

    .venv/bin/python -m bench.wait_cost --changes 20000

The enqueue paths, through the real code:
- `chunks`: `Buffer.enqueue` of 1,000-change calls (the Python API's `enqueue_changes`, a
  large HTTP request): µs per change, changes/s, p50/p99 ms per call;
- `import`: the import's pipelined enqueue (`Buffer.pipelined`, 1,000-change calls, 3 in
  flight; with WAIT, one after each call): µs per change, changes/s;
- `api100` / `single`: calls of 100 changes and of 1 change (an HTTP request, `enqueue`,
  `record_change`): µs per change, calls/s, p50/p99 ms per call.
Each (target, path) runs without WAIT and with it (in turns: off first in even rounds, on
first in odd ones), each on an emptied Redis after one untimed call, `--rounds` times (the
figures: each one's median over the rounds). The machine's load average is printed: on a
shared machine the differences that matter are the ones larger than the noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench.figures import p50_p99, publish
from bench.history_cost import changes
from config.settings import load_settings
from core.changes import Change, SubscriptionState
from devtools.redis_cluster import RedisCluster
from devtools.redis_replica import RedisWithReplica
from stores.buffer import ENQUEUE_CHUNK, Buffer, encode_changes
from stores.clock import server_time_ms
from stores.services import StoreServices

PATHS = {"chunks": ENQUEUE_CHUNK, "import": ENQUEUE_CHUNK, "api100": 100, "single": 1}


def buffer_for(url: str, replicas: int) -> Buffer:
    settings = load_settings(
        redis_url=url, broker_url="redis://127.0.0.1:1/0", redis_wait_replicas=replicas
    )
    return StoreServices(settings).new_buffer()


def timed_calls(buffer: Buffer, items: list[Change], size: int) -> list[float]:
    """Seconds of each `Buffer.enqueue` call of `size` changes."""
    timings = []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        began = time.perf_counter()
        buffer.enqueue(chunk, chunk_size=size)
        timings.append(time.perf_counter() - began)
    return timings


def timed_import(buffer: Buffer, items: list[Change]) -> float:
    began = time.perf_counter()
    with buffer.pipelined() as enqueuer:
        for start in range(0, len(items), ENQUEUE_CHUNK):
            enqueuer.add(encode_changes(items[start : start + ENQUEUE_CHUNK]))
        enqueuer.finish()
    assert enqueuer.count == len(items)
    return time.perf_counter() - began


def measure(
    url: str, flush: Callable[[], None], count: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Figures per "path/off" and "path/on"."""
    samples: dict[str, list[dict[str, float]]] = {}
    for _round in range(rounds):
        for path, size in PATHS.items():
            # Fewer single calls: each is a round trip (or two) of its own.
            n = count if size >= 100 else max(200, count // 10)
            modes = [("off", 0), ("on", 1)]
            for mode, replicas in modes if _round % 2 == 0 else modes[::-1]:
                buffer = buffer_for(url, replicas)
                occurred = server_time_ms(buffer.client) - 60_000
                # Untimed: the slot map learnt, the script loaded, a connection open.
                buffer.enqueue(changes(1, occurred, SubscriptionState.SUBSCRIBED))
                flush()
                items = changes(n, occurred, SubscriptionState.SUBSCRIBED)
                if path == "import":
                    total = timed_import(buffer, items)
                    figures = {"us_per_change": total * 1e6 / n, "changes_per_s": n / total}
                else:
                    timings = timed_calls(buffer, items, size)
                    total = sum(timings)
                    p50, p99 = p50_p99([t * 1000 for t in timings])
                    figures = {
                        "us_per_change": total * 1e6 / n,
                        "changes_per_s": n / total,
                        "p50_ms_per_call": p50,
                        "p99_ms_per_call": p99,
                    }
                samples.setdefault(f"{path}/{mode}", []).append(figures)
    return {
        name: {
            figure: round(statistics.median(each[figure] for each in runs), 3) for figure in runs[0]
        }
        for name, runs in samples.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"changes": args.changes, "rounds": args.rounds}
    figures["load_average_before"] = round(os.getloadavg()[0], 1)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-")))
        pair = RedisWithReplica(workdir / "pair").start()
        stack.callback(pair.stop)
        results = {"replica": measure(pair.url, pair.master.flushall, args.changes, args.rounds)}
        cluster = RedisCluster(workdir / "cluster").start()
        stack.callback(cluster.stop)
        results["cluster"] = measure(cluster.url, cluster.flush, args.changes, args.rounds)
    for target, found in results.items():
        for name, values in found.items():
            path, mode = name.split("/")
            for figure, value in values.items():
                figures[f"{target}_{path}_{figure}_{mode}"] = value
        for path in PATHS:
            off = found[f"{path}/off"]["us_per_change"]
            on = found[f"{path}/on"]["us_per_change"]
            figures[f"{target}_{path}_wait_cost_pct"] = round((on - off) * 100 / off, 1)
    figures["load_average_after"] = round(os.getloadavg()[0], 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    publish(run(parser.parse_args()), "wait-cost.json")


if __name__ == "__main__":
    main()
