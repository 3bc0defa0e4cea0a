"""Live latency during a backfill: this tree (live and bulk lanes) and a base commit side by
side, in one run.

    .venv/bin/python -m bench.lanes                     # base: 9c34ab5 (main before lanes)
    .venv/bin/python -m bench.lanes --rows 60000 --live-seconds 30   # quicker

For each tree (the base is checked out into a temporary git worktree and run from there:
`python -m` puts its folder first on the path, ahead of this tree's editable install):
a private redis-server, the simulator enforcing fixed windows of LIMIT requests per WINDOW
seconds, two workers and beat at their default settings (real processes, as in the
Procfile); `braze-subs import` of ROWS unique identifiers (a backfill that takes minutes at
that budget); then, while it drains, a live stream of RATE changes a second through
`tasks.producer.enqueue_change` for LIVE_SECONDS. Reports the live changes' latency (enqueue
returned -> the simulator applied it, one machine's clock) at p50 / p99 / max, the budget's
utilisation over the backfill (requests sent / requests the limit allowed, from the first
request to the last), the backfill's own share of it (requests without a live identifier),
and the drain time. Writes bench/results/lanes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from bench.figures import publish
from bench.trees import add_base_tree, remove_base_tree
from devtools.processes import local_redis
from simulator import SimulatorConfig, SimulatorServer
from stores.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
BASE = "9c34ab5"  # main just before lanes landed (issue 22)
LIVE_GROUP = "live-news"

# The live producer, run in the tree under test: RATE changes a second, each line printed
# as JSON {"value", "t"} when `enqueue_change` returned.
PRODUCER = """
import json, sys, time
from tasks.producer import enqueue_change
rate, seconds, group = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
start = time.time()
n = 0
while time.time() - start < seconds:
    due = start + n / rate
    if due > time.time():
        time.sleep(due - time.time())
    value = f"live-{n}@example.com"
    enqueue_change(subscription_group_id=group, subscription_state="unsubscribed", email=value)
    print(json.dumps({"value": value, "t": time.time()}), flush=True)
    n += 1
"""


def percentile99(ordered: list[float]) -> float:
    return round(ordered[max(0, int(len(ordered) * 0.99) - 1)], 2)


def batched_times(client: Redis, keys: Keys, values: list[str]) -> dict[str, int]:
    """When each live email was cut into a batch (its history's "batched" event, ms)."""
    pipe = client.pipeline(transaction=False)
    for value in values:
        pipe.lrange(keys.history("email", value), 0, -1)
    found = {}
    for value, events in zip(values, pipe.execute(), strict=True):
        for raw in events:
            at, _, body = raw.decode().partition("\x1f")
            if json.loads(body).get("e") == "batched":
                found[value] = int(at)
                break
    return found


def write_backfill(path: Path, rows: int) -> None:
    """Unique external ids over 4 groups, alternating states (one JSON line each)."""
    with path.open("w") as handle:
        for n in range(rows):
            state = "subscribed" if n % 2 else "unsubscribed"
            handle.write(
                json.dumps(
                    {
                        "subscription_group_id": f"bulk-{n % 4}",
                        "subscription_state": state,
                        "external_id": f"user-{n}",
                    }
                )
                + "\n"
            )


def spawn(tree: Path, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=tree,
            env={**env, "PYTHONPATH": str(tree)},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_tree(tree: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        redis_url = stack.enter_context(local_redis(workdir))
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
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BRAZE_REST_ENDPOINT": sim.url,
            "BRAZE_API_KEY": "bench-key",
            "BRAZE_RATE_LIMIT": str(args.limit),
            "BRAZE_RATE_LIMIT_WINDOW_SECONDS": str(args.window),
            "LOG_LEVEL": "WARNING",
            "HEALTH_DIR": str(workdir / "health"),
        }
        celery = ["-m", "celery", "-A", "worker.app"]
        for index in range(2):
            name = ["--hostname", f"w{index}@%h", "--without-gossip", "--without-mingle"]
            worker = spawn(tree, [*celery, "worker", *name], env, workdir / f"w{index}.log")
            stack.callback(stop, worker)
        beat = spawn(tree, [*celery, "beat"], env, workdir / "beat.log")
        stack.callback(stop, beat)

        backfill = workdir / "backfill.jsonl"
        write_backfill(backfill, args.rows)
        imported = subprocess.run(
            [sys.executable, "-m", "worker", "import", str(backfill)],
            cwd=tree,
            env={**env, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            check=False,
        )
        if imported.returncode != 0:
            raise SystemExit(f"import failed in {tree}: {imported.stderr[-2000:]}")
        time.sleep(args.live_delay)  # the backfill is under way: batches cut and queued
        producer = subprocess.run(
            [sys.executable, "-c", PRODUCER, str(args.rate), str(args.live_seconds), LIVE_GROUP],
            cwd=tree,
            env={**env, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            check=False,
        )
        if producer.returncode != 0:
            raise SystemExit(f"the live producer failed in {tree}: {producer.stderr[-2000:]}")
        enqueued = {
            line["value"]: line["t"] for line in map(json.loads, producer.stdout.splitlines())
        }
        deadline = time.time() + args.timeout
        while client.hlen(keys.pending) or client.hlen(keys.inflight):
            if time.time() > deadline:
                raise SystemExit(f"{tree}: did not drain within {args.timeout} s")
            time.sleep(0.2)
        stats = httpx.get(f"{sim.url}/_sim/stats").json()
        applied = httpx.get(f"{sim.url}/_sim/applied", params={"group": LIVE_GROUP}).json()
        cut_at = batched_times(client, keys, list(enqueued))

    arrivals = {entry["value"]: entry["states"][0] for entry in applied["applied"]}
    latencies = sorted(arrivals[value]["t"] - t for value, t in enqueued.items())
    live_requests = {state["request"] for state in arrivals.values()}
    requests = stats["requests"]
    first, last = min(r["t"] for r in requests), max(r["t"] for r in requests)
    allowed = (last - first) / args.window * args.limit
    missing = len(enqueued) - len(latencies)
    # Where the live changes waited: enqueued -> cut into a batch -> applied.
    to_cut = sorted(cut_at[v] / 1000 - t for v, t in enqueued.items() if v in cut_at)
    to_post = sorted(arrivals[v]["t"] - cut_at[v] / 1000 for v in enqueued if v in cut_at)
    return {
        "live_changes": len(enqueued),
        "live_not_delivered": missing,
        "live_p50_seconds": round(statistics.median(latencies), 2),
        "live_p99_seconds": percentile99(latencies),
        "live_max_seconds": round(latencies[-1], 2),
        "live_to_cut_p50_p99": [round(statistics.median(to_cut), 2), percentile99(to_cut)],
        "live_cut_to_applied_p50_p99": [
            round(statistics.median(to_post), 2),
            percentile99(to_post),
        ],
        "live_requests": len(live_requests),
        "requests": len(requests),
        "status_429": stats["rate_limited_429"],
        "utilisation": round(len(requests) / allowed, 3),
        "backfill_share": round((len(requests) - len(live_requests)) / allowed, 3),
        "drain_seconds": round(last - first, 1),
        "ideal_drain_seconds": round(args.rows / 50 / args.limit * args.window, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the commit to compare with")
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=5.0, help="live changes a second")
    parser.add_argument("--live-seconds", type=float, default=60.0)
    parser.add_argument("--live-delay", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--skip-base", action="store_true")
    args = parser.parse_args()

    figures: dict[str, Any] = {
        "rows": args.rows,
        "limit": f"{args.limit} per {args.window:g} s",
        "live": f"{args.rate:g}/s for {args.live_seconds:g} s",
    }
    with tempfile.TemporaryDirectory(prefix="braze-subs-lanes-") as tmp:
        work = Path(tmp)
        (work / "lanes").mkdir()
        for name, value in run_tree(ROOT, args, work / "lanes").items():
            figures[f"lanes.{name}"] = value
        if not args.skip_base:
            base_tree = work / "base"
            add_base_tree(base_tree, args.base)
            try:
                (work / "base-run").mkdir()
                for name, value in run_tree(base_tree, args, work / "base-run").items():
                    figures[f"base.{name}"] = value
            finally:
                remove_base_tree(base_tree)
    figures["base"] = args.base
    publish(figures, "lanes.json")


if __name__ == "__main__":
    main()
