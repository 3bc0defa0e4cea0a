"""What the state store costs per change on a Redis Cluster against one Redis, side by side
in one run: the same changes through the real code paths on a private redis-server and on a
private 3-master, 3-replica cluster (devtools/redis_cluster.py).

    .venv/bin/python -m bench.cluster_cost --identifiers 20000 --rounds 3

For each step of a change's way through the state store, timed apart over all the changes
in turn: wall µs per change at the client, and Redis CPU µs per change (INFO commandstats of
the node holding the workspace): enqueue (`Buffer.enqueue`, the enqueue script, chunked),
take (the due read, planning, take_batch on a pipeline: EVALSHA on one Redis, EVAL with the
source on a cluster pipeline), claim (claim_batch.lua) and finish (finish_batch.lua, as
delivered); and their sum, what one change costs the state store from enqueue to finish.
One workspace is one slot, so on the cluster all of it runs on one master; the figures are
what a workspace pays, not what the cluster can carry.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from redis import Redis

from bench.figures import publish
from bench.history_cost import changes
from config.settings import load_settings
from core.changes import SubscriptionState
from core.planning import plan_batches
from devtools.processes import local_redis
from devtools.redis_cluster import RedisCluster
from stores.batch_records import BatchStore
from stores.clock import server_time_ms
from stores.services import StoreServices

STEPS = ("enqueue", "take", "claim", "finish")  # a change's way through the state store


def redis_usec(node: Redis) -> float:
    """Redis CPU (µs) of every command `node` ran since its last CONFIG RESETSTAT (scripts
    and what the client sends besides: the due read, TIME)."""
    stats = node.info("commandstats")
    return sum(float(entry.get("usec", 0)) for entry in stats.values())


def measure(url: str, node: Redis, count: int) -> dict[str, float]:
    """`node`: the Redis (for the cluster: the master) that holds the default workspace.
    Each step over all the changes in turn, timed apart (wall at the client and Redis CPU
    on `node`, µs per change): enqueue; take (read the due changes, plan, take_batch.lua);
    claim (claim_batch.lua); finish as delivered (finish_batch.lua)."""
    settings = load_settings(redis_url=url, broker_url="redis://127.0.0.1:1/0")
    found = StoreServices(settings)
    buffer = found.buffer
    store = BatchStore(buffer.client, found.keys, found.scripts)
    items = changes(count, server_time_ms(buffer.client) - 60_000, SubscriptionState.SUBSCRIBED)
    figures: dict[str, float] = {}

    def step(name: str, work: Callable[[], object]) -> None:
        node.config_resetstat()
        started = time.perf_counter()
        work()
        wall = time.perf_counter() - started
        figures[f"{name}_wall_us_per_change"] = round(wall * 1e6 / count, 2)
        figures[f"{name}_redis_us_per_change"] = round(redis_usec(node) / count, 2)

    batch_ids: list[str] = []

    def take() -> None:
        while True:
            now = server_time_ms(buffer.client)
            due, _ = buffer.read_due(now, 20_000)
            if not due:
                return
            plan = plan_batches(due, now_ms=now, max_identifiers=50)
            for pack in buffer.take([[batch] for batch in plan], 600_000):
                batch_ids.extend(batch_id for batch_id, _size in pack)

    def claim() -> None:
        for batch_id in batch_ids:
            store.claim(batch_id, "bench", 60_000)

    def finish() -> None:
        for batch_id in batch_ids:
            store.delivered(batch_id, "bench", http_status=201, latency_ms=40.0)

    step("enqueue", lambda: buffer.enqueue(items))
    for name, work in (("take", take), ("claim", claim), ("finish", finish)):
        step(name, work)
    assert not buffer.client.hlen(found.keys.pending)
    assert not store.count()
    for kind in ("wall", "redis"):
        figures[f"per_change_{kind}_us"] = round(
            sum(figures[f"{name}_{kind}_us_per_change"] for name in STEPS), 2
        )
    found.close()
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both stores `args.rounds` times, which goes first alternating; medians (and, with
    several rounds, each round's figure) per step. Each round flushes both first."""
    count = args.identifiers
    figures: dict[str, Any] = {"identifiers": count, "rounds": args.rounds}
    found: dict[str, list[dict[str, float]]] = {"one_redis": [], "cluster": []}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-")))
        (workdir / "one").mkdir()
        url = stack.enter_context(local_redis(workdir / "one"))
        one = Redis.from_url(url)
        cluster = RedisCluster(workdir / "cluster").start()
        stack.callback(cluster.stop)
        master = cluster.node(cluster.master_of("{braze-subs}:pending"))
        stores = {"one_redis": (url, one), "cluster": (cluster.url, master)}
        for round_ in range(args.rounds):
            one.flushall()
            cluster.flush()
            order = ["one_redis", "cluster"] if round_ % 2 == 0 else ["cluster", "one_redis"]
            for name in order:
                found[name].append(measure(*stores[name], count))
    for figure in found["one_redis"][0]:
        for name, rounds in found.items():
            values = [r[figure] for r in rounds]
            figures[f"{name}_{figure}"] = round(statistics.median(values), 2)
            if len(values) > 1:
                figures[f"{name}_{figure} (rounds)"] = values
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identifiers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    publish(run(parser.parse_args()), "cluster-cost.json")


if __name__ == "__main__":
    main()
