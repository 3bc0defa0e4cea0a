"""Drain a backlog through the whole pipeline under a scaled-down rate limit, and report how
well the shared budget is used.

    .venv/bin/python -m bench.drain                       # one v1 and one v2 worker
    .venv/bin/python -m bench.drain --workers v1,v1,v1    # three v1 workers
    .venv/bin/python -m bench.drain --brokers redis,rabbitmq   # the broker on its own, side by side
    .venv/bin/python -m bench.drain --systems redis,cluster+rabbitmq,cluster+redis --rounds 3

Starts a private redis-server, the simulator enforcing fixed windows of LIMIT per WINDOW
seconds, the given workers and beat (real processes, as in the Procfile); enqueues a backlog
of unique identifiers; waits until everything is delivered; prints utilisation of the limit,
identifiers per request, 429s, the busiest sliding and fixed window, and the drain time
against the ideal (identifiers / 50 / limit windows). Writes the figures as JSON too.
With `--brokers`, one run per broker in turn: REDIS_URL's Redis (as by default), and a
private rabbitmq-server as BROKER_URL (devtools/rabbitmq.py; issue 24).

With `--systems` (issue 24), the same drain on each state store + broker named, side by
side in one run: `redis` (one redis-server holds the state and is the broker, the
default deployment), `cluster+rabbitmq` (the state on a private 3-master, 3-replica Redis
Cluster, devtools/redis_cluster.py; the broker a private rabbitmq-server), `cluster+redis`
(the broker a separate redis-server), `redis+rabbitmq`. Each at every budget of
`--budgets`: `scaled` (LIMIT per WINDOW, what it reports utilisation of) and `unlimited`
(100,000 requests per WINDOW, so the budget never binds: identifiers/s is the pipeline's
own pace). `--rounds` runs them all that often, the systems' order rotated each round so
that none always runs on the busier minute; the table shows each figure's median. Writes
bench/results/drain-systems.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx

from admin.status import read_status
from bench.figures import publish
from config.settings import load_settings
from core.changes import Change, IdentifierKind, SubscriptionState
from devtools.processes import celery_process, local_redis
from devtools.rabbitmq import RabbitMQ
from devtools.rabbitmq import unavailable as rabbitmq_unavailable
from devtools.redis_cluster import RedisCluster
from devtools.redis_cluster import unavailable as redis_cluster_unavailable
from simulator import SimulatorConfig, SimulatorServer
from stores.services import StoreServices

# The state store and the broker of each system `--systems` may name.
SYSTEMS = {
    "redis": ("redis", "redis"),  # one redis-server: the state, and the broker on it
    "redis+rabbitmq": ("redis", "rabbitmq"),
    "cluster+redis": ("cluster", "redis"),  # the broker a redis-server of its own
    "cluster+rabbitmq": ("cluster", "rabbitmq"),
}
UNLIMITED = 100_000  # requests per window: a budget that never binds (as bench/ceiling.py)


def backlog(identifiers: int, groups: int, rng: random.Random) -> list[Change]:
    """Unique identifiers spread over groups and the three kinds (email groups for emails,
    SMS groups for phones, external ids in either)."""
    changes = []
    for n in range(identifiers):
        kind = (IdentifierKind.EXTERNAL_ID, IdentifierKind.EMAIL, IdentifierKind.PHONE)[n % 3]
        group = n % groups
        if kind is IdentifierKind.EMAIL:
            group_id, value = f"email-{group}", f"user{n}@example.com"
        elif kind is IdentifierKind.PHONE:
            group_id, value = f"sms-{group}", f"+1415{2_000_000 + n:07d}"
        else:
            group_id, value = f"email-{group}", f"user-{n}"
        state = rng.choice(list(SubscriptionState))
        changes.append(Change(group_id, state, kind, value))
    return changes


def start_stores(
    stack: ExitStack,
    workdir: Path,
    state: str,
    broker: str,
    clusters: list[RedisCluster] | None = None,
) -> tuple[str, str]:
    """Start a private state store (`redis`: a redis-server; `cluster`: 3 masters and 3
    replicas, appended to `clusters` for a caller that fails one over) and broker (`redis`:
    REDIS_URL's redis-server, or one of its own beside a cluster; `rabbitmq`: a
    rabbitmq-server) under `workdir`, stopped with `stack`; returns REDIS_URL and BROKER_URL
    (empty: REDIS_URL's Redis)."""
    if state == "cluster":
        reason = redis_cluster_unavailable()
        if reason:
            raise SystemExit(f"a Redis Cluster cannot run here: {reason}")
        cluster = RedisCluster(workdir / "cluster").start()
        stack.callback(cluster.stop)
        if clusters is not None:
            clusters.append(cluster)
        redis_url = cluster.url
    else:
        (workdir / "state").mkdir()
        redis_url = stack.enter_context(local_redis(workdir / "state"))
    broker_url = ""
    if broker == "rabbitmq":
        reason = rabbitmq_unavailable()
        if reason:
            raise SystemExit(f"RabbitMQ cannot run here: {reason}")
        rabbitmq = RabbitMQ(workdir / "rabbitmq").start()
        stack.callback(rabbitmq.stop)
        broker_url = rabbitmq.url()
    elif state == "cluster":  # Celery's Redis transport does not speak the cluster protocol
        (workdir / "broker").mkdir()
        broker_url = stack.enter_context(local_redis(workdir / "broker"))
    return redis_url, broker_url


def state_store(redis_url: str, broker_url: str) -> StoreServices:
    """The default workspace's stores on REDIS_URL (a cluster too), as the workers see it."""
    return StoreServices(load_settings(redis_url=redis_url, broker_url=broker_url or None))


def run(
    args: argparse.Namespace,
    broker: str = "redis",
    state: str = "redis",
    limit: int | None = None,
) -> dict[str, Any]:
    """One drain; `limit` (requests per window) replaces args.limit."""
    rng = random.Random(1)
    versions = args.workers.split(",")
    limit = limit or args.limit
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-")))
        redis_url, broker_url = start_stores(stack, workdir, state, broker)
        sim = SimulatorServer(
            SimulatorConfig(
                api_keys={"bench-key"},
                auto_groups=True,
                rate_limit=limit,
                window_seconds=args.window,
            )
        )
        sim.start()
        stack.callback(sim.stop)
        stores = state_store(redis_url, broker_url)
        stack.callback(stores.close)
        client, keys = stores.redis, stores.keys
        changes = backlog(args.identifiers, args.groups, rng)
        stores.buffer.enqueue(changes)

        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BROKER_URL": broker_url,
            "BRAZE_REST_ENDPOINT": sim.url,
            "BRAZE_API_KEY": "bench-key",
            "BRAZE_RATE_LIMIT": str(limit),
            "BRAZE_RATE_LIMIT_WINDOW_SECONDS": str(args.window),
            "LOG_LEVEL": "WARNING",
        }
        started = time.time()
        for index, version in enumerate(versions):
            stack.enter_context(
                celery_process(
                    "worker", {**env, "BRAZE_API_VERSION": version}, workdir / f"w{index}.log"
                )
            )
        stack.enter_context(celery_process("beat", env, workdir / "beat.log"))
        deadline = started + args.timeout
        while True:
            status = read_status(client, keys)
            if status.pending == 0 and status.in_flight == 0:
                break
            if time.time() > deadline:
                raise SystemExit(f"did not drain within {args.timeout}s: {status}")
            time.sleep(0.1)
        stats = httpx.get(f"{sim.url}/_sim/stats").json()
        final = httpx.get(f"{sim.url}/_sim/state?log=0").json()["subscriptions"]

    requests = stats["requests"]
    ok = [r for r in requests if r["status"] == 201]
    first, last = min(r["t"] for r in requests), max(r["t"] for r in requests)
    drain = last - first
    ideal = args.identifiers / 50 / limit * args.window
    # Requests sent over the drain, against what the limit allowed in that time.
    allowed = (drain / args.window) * limit
    identifiers = sum(r["identifiers"] for r in ok)
    expected = {(c.group_id, c.kind.value, c.value): c.state.value for c in changes}
    received = {(s["group"], s["kind"], s["value"]): s["state"] for s in final}
    return {
        "state": state,
        "broker": broker,
        "workers": versions,
        "limit": limit,
        "window_seconds": args.window,
        "identifiers": args.identifiers,
        "requests": len(requests),
        "requests_ok": len(ok),
        "requests_by_version": {v: sum(1 for r in ok if r["endpoint"] == v) for v in ("v1", "v2")},
        "identifiers_per_request": round(identifiers / max(1, len(ok)), 2),
        "status_429": stats["rate_limited_429"],
        "malformed": stats["malformed"],
        "sliding_window_max": stats["max_requests_in_sliding_window"],
        "fixed_window_max": stats["max_requests_in_window"],
        "utilisation": round(len(requests) / allowed, 4) if allowed else None,
        "drain_seconds": round(drain, 2),
        "identifiers_per_second": round(identifiers / drain) if drain else None,
        "ideal_seconds": round(ideal, 2),
        "drain_vs_ideal": round(drain / ideal, 3),
        "wrong_final_state": sum(1 for k, v in expected.items() if received.get(k) != v),
    }


# The figures `--systems` shows per budget (medians over the rounds).
SHOWN = {
    "scaled": ("utilisation", "drain_vs_ideal", "identifiers_per_request", "status_429"),
    "unlimited": ("identifiers_per_second", "drain_seconds", "identifiers_per_request"),
}


def side_by_side(args: argparse.Namespace) -> dict[str, Any]:
    """Every system at every budget, `args.rounds` times, the systems' order rotated."""
    systems = args.systems.split(",")
    budgets = args.budgets.split(",")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        budget: {system: [] for system in systems} for budget in budgets
    }
    for round_ in range(args.rounds):
        order = systems[round_ % len(systems) :] + systems[: round_ % len(systems)]
        for budget in budgets:
            limit = args.limit if budget == "scaled" else UNLIMITED
            for system in order:
                state, broker = SYSTEMS[system]
                figures = run(args, broker, state, limit)
                runs[budget][system].append(figures)
                print(
                    f"round {round_ + 1} {budget:<9} {system:<17} "
                    + " ".join(f"{name}={figures[name]}" for name in SHOWN[budget]),
                    flush=True,
                )
    figures: dict[str, Any] = {
        "identifiers": args.identifiers,
        "workers": args.workers.split(","),
        "scaled_limit": f"{args.limit} per {args.window:g} s",
        "unlimited_limit": f"{UNLIMITED} per {args.window:g} s",
        "rounds": args.rounds,
    }
    for budget in budgets:
        for system in systems:
            found = runs[budget][system]
            for name in SHOWN[budget]:
                values = [r[name] for r in found]
                figures[f"{budget} {system} {name}"] = round(statistics.median(values), 4)
                if len(values) > 1:
                    figures[f"{budget} {system} {name} (rounds)"] = values
            figures[f"{budget} {system} wrong_final_state"] = sum(
                r["wrong_final_state"] for r in found
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="v1,v2", help="comma-separated API versions")
    parser.add_argument("--identifiers", type=int, default=50_000)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--brokers", default="redis", help="comma-separated: redis, rabbitmq (one run each)"
    )
    parser.add_argument(
        "--systems",
        default="",
        help=f"comma-separated state+broker systems side by side: {', '.join(SYSTEMS)}",
    )
    parser.add_argument(
        "--budgets", default="scaled,unlimited", help="with --systems: scaled, unlimited"
    )
    parser.add_argument("--rounds", type=int, default=1, help="with --systems")
    args = parser.parse_args()
    if args.systems:
        for system in args.systems.split(","):
            if system not in SYSTEMS:
                raise SystemExit(f"--systems: unknown system {system!r} ({', '.join(SYSTEMS)})")
        for budget in args.budgets.split(","):
            if budget not in SHOWN:
                raise SystemExit(f"--budgets: unknown budget {budget!r} (scaled, unlimited)")
        publish(side_by_side(args), "drain-systems.json")
        return
    for broker in args.brokers.split(","):
        if broker not in ("redis", "rabbitmq"):
            raise SystemExit(f"--brokers: unknown broker {broker!r} (redis, rabbitmq)")
    for broker in args.brokers.split(","):
        result = run(args, broker)
        suffix = "" if broker == "redis" else f"-{broker}"
        publish(result, "drain-" + "-".join(result["workers"]) + suffix + ".json")


if __name__ == "__main__":
    main()
