"""What the state store costs per change on a Redis Cluster against one Redis, side by side
in one run: the same changes through the real code paths on a private redis-server and on a
private 3-master, 3-replica cluster (devtools/redis_cluster.py).

    .venv/bin/python -m bench.cluster_cost --identifiers 20000

For each: wall µs per change of `Buffer.enqueue` (the enqueue script, chunked), Redis CPU µs
per change of it (INFO commandstats of the node holding the workspace), and wall µs per
change of taking the changes into batches, claiming and finishing them (take_batch on a
pipeline: EVALSHA on one Redis, EVAL with the source on a cluster pipeline; claim, deliver).
One workspace is one slot, so on the cluster all of it runs on one master; the figures are
what a workspace pays, not what the cluster can carry.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from redis import Redis

from bench.figures import publish
from bench.history_cost import changes, deliver_all, script_usec
from config.settings import load_settings
from core.changes import SubscriptionState
from devtools.processes import local_redis
from devtools.redis_cluster import RedisCluster
from stores.batch_records import BatchStore
from stores.clock import server_time_ms
from stores.services import StoreServices


def measure(url: str, node: Redis, count: int) -> dict[str, float]:
    """`node`: the Redis (for the cluster: the master) that holds the default workspace."""
    settings = load_settings(redis_url=url, broker_url="redis://127.0.0.1:1/0")
    found = StoreServices(settings)
    buffer = found.buffer
    items = changes(count, server_time_ms(buffer.client) - 60_000, SubscriptionState.SUBSCRIBED)
    node.config_resetstat()
    started = time.perf_counter()
    buffer.enqueue(items)
    enqueue_wall = time.perf_counter() - started
    enqueue_redis = script_usec(node) / count
    started = time.perf_counter()
    deliver_all(buffer, BatchStore(buffer.client, found.keys, found.scripts))
    deliver_wall = time.perf_counter() - started
    assert not buffer.client.hlen(found.keys.pending)
    return {
        "enqueue_wall_us_per_change": round(enqueue_wall * 1e6 / count, 2),
        "enqueue_redis_us_per_change": round(enqueue_redis, 2),
        "take_claim_deliver_wall_us_per_change": round(deliver_wall * 1e6 / count, 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    count = args.identifiers
    figures: dict[str, Any] = {"identifiers": count}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-")))
        (workdir / "one").mkdir()
        url = stack.enter_context(local_redis(workdir / "one"))
        one = measure(url, Redis.from_url(url), count)
        cluster = RedisCluster(workdir / "cluster").start()
        stack.callback(cluster.stop)
        master = cluster.node(cluster.master_of("{braze-subs}:pending"))
        on_cluster = measure(cluster.url, master, count)
    for name, value in one.items():
        figures[f"one_redis_{name}"] = value
        figures[f"cluster_{name}"] = on_cluster[name]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identifiers", type=int, default=20_000)
    publish(run(parser.parse_args()), "cluster-cost.json")


if __name__ == "__main__":
    main()
