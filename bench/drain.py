"""Drain a backlog through the whole pipeline under a scaled-down rate limit, and report how
well the shared budget is used.

    .venv/bin/python -m bench.drain                       # one v1 and one v2 worker
    .venv/bin/python -m bench.drain --workers v1,v1,v1    # three v1 workers
    .venv/bin/python -m bench.drain --brokers redis,rabbitmq   # the broker on its own, side by side

Starts a private redis-server, the simulator enforcing fixed windows of LIMIT per WINDOW
seconds, the given workers and beat (real processes, as in the Procfile); enqueues a backlog
of unique identifiers; waits until everything is delivered; prints utilisation of the limit,
identifiers per request, 429s, the busiest sliding and fixed window, and the drain time
against the ideal (identifiers / 50 / limit windows). Writes the figures as JSON too.
With `--brokers`, one run per broker in turn: REDIS_URL's Redis (as by default), and a
private rabbitmq-server as BROKER_URL (devtools/rabbitmq.py; issue 24).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
from redis import Redis

from admin.status import read_status
from bench.figures import publish
from core.changes import Change, IdentifierKind, SubscriptionState
from devtools.processes import celery_process, local_redis
from devtools.rabbitmq import RabbitMQ
from devtools.rabbitmq import unavailable as rabbitmq_unavailable
from simulator import SimulatorConfig, SimulatorServer
from stores.buffer import Buffer
from stores.keys import Keys


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


def run(args: argparse.Namespace, broker: str = "redis") -> dict[str, Any]:
    rng = random.Random(1)
    versions = args.workers.split(",")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-")))
        redis_url = stack.enter_context(local_redis(workdir))
        broker_url = ""  # empty: REDIS_URL's Redis
        if broker == "rabbitmq":
            reason = rabbitmq_unavailable()
            if reason:
                raise SystemExit(f"--brokers rabbitmq: {reason}")
            rabbitmq = RabbitMQ(workdir / "rabbitmq").start()
            stack.callback(rabbitmq.stop)
            broker_url = rabbitmq.url()
        sim = SimulatorServer(
            SimulatorConfig(
                api_keys={"bench-key"},
                auto_groups=True,
                rate_limit=args.limit,
                window_seconds=args.window,
            )
        )
        sim.start()
        stack.callback(sim.stop)
        client = Redis.from_url(redis_url)
        keys = Keys("braze-subs")
        changes = backlog(args.identifiers, args.groups, rng)
        Buffer(client, keys).enqueue(changes)

        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BROKER_URL": broker_url,
            "BRAZE_REST_ENDPOINT": sim.url,
            "BRAZE_API_KEY": "bench-key",
            "BRAZE_RATE_LIMIT": str(args.limit),
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
    ideal = args.identifiers / 50 / args.limit * args.window
    # Requests sent over the drain, against what the limit allowed in that time.
    allowed = (drain / args.window) * args.limit
    identifiers = sum(r["identifiers"] for r in ok)
    expected = {(c.group_id, c.kind.value, c.value): c.state.value for c in changes}
    received = {(s["group"], s["kind"], s["value"]): s["state"] for s in final}
    return {
        "broker": broker,
        "workers": versions,
        "limit": args.limit,
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
        "ideal_seconds": round(ideal, 2),
        "drain_vs_ideal": round(drain / ideal, 3),
        "wrong_final_state": sum(1 for k, v in expected.items() if received.get(k) != v),
    }


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
    args = parser.parse_args()
    for broker in args.brokers.split(","):
        if broker not in ("redis", "rabbitmq"):
            raise SystemExit(f"--brokers: unknown broker {broker!r} (redis, rabbitmq)")
    for broker in args.brokers.split(","):
        result = run(args, broker)
        suffix = "" if broker == "redis" else f"-{broker}"
        publish(result, "drain-" + "-".join(result["workers"]) + suffix + ".json")


if __name__ == "__main__":
    main()
