"""The simulator's CPU per request (issue 26): v1 batches of 50 posted to it over real HTTP,
this tree and a base commit side by side, alternating, in one run.

    .venv/bin/python -m bench.sim_cpu                   # base: main before this change
    .venv/bin/python -m bench.sim_cpu --requests 4000 --rounds 5 --base HEAD~3

Each round starts the simulator of each tree in a process of its own, as `bench.drain`
starts it (`SimulatorServer` on a thread, an unlimited budget, auto groups, the bench's
key), and posts to it from this process `--requests` v1 requests of 50 unique identifiers
each (emails, phones and external ids in turn, 4 groups of each channel, states at random,
as `bench.drain`'s backlog and a v1 worker's bodies) over `--clients` keep-alive
connections (httpx, one thread each, as two workers post). The figure is the simulator's
process's user + system CPU (psutil) over the posts, per request and per 1,000
identifiers; the bodies are encoded before the clock starts. Every answer must be a 201,
and the simulator must hold every identifier's state afterwards. The base is checked out
into a temporary git worktree and served from there with this interpreter. Wall time on the
shared machine varies with the load, CPU seconds per request hardly do; compare the two
trees within a run. Writes bench/results/sim_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.figures import publish
from bench.trees import rounds_in_both, tree_env

BASE = "main"
KEY = "bench-key"
BATCH = 50
GROUPS = 4

# Runs in the tree's own directory (first on sys.path), so that tree's simulator is served.
# Prints its port, then waits for stdin to close; answers "state" with how many
# subscriptions it holds.
SERVE = (
    "import sys\n"
    "from simulator import SimulatorConfig, SimulatorServer\n"
    "sim = SimulatorServer(SimulatorConfig(api_keys={{{key!r}}}, auto_groups=True,\n"
    "    rate_limit=100_000, window_seconds=2))\n"
    "sim.start()\n"
    "print(sim.port, flush=True)\n"
    "for line in sys.stdin:\n"
    "    if line.strip() == 'state':\n"
    "        print(len(sim.state.subscriptions()), flush=True)\n"
    "sim.stop()\n"
)


def bodies(requests: int, offset: int, rng: random.Random) -> list[bytes]:
    """`requests` v1 bodies of BATCH unique identifiers each, kinds in turn: the identifiers
    numbered from `offset` on (phones stay valid below 8,000,000)."""
    found = []
    for r in range(requests):
        kind = ("external_id", "email", "phone")[r % 3]
        group = r % GROUPS
        first = offset + r * BATCH
        if kind == "email":
            group_id = f"email-{group}"
            values = [f"user{n}@example.com" for n in range(first, first + BATCH)]
        elif kind == "phone":
            group_id = f"sms-{group}"
            values = [f"+1415{2_000_000 + n:07d}" for n in range(first, first + BATCH)]
        else:
            group_id = f"email-{group}"
            values = [f"user-{n}" for n in range(first, first + BATCH)]
        body = {
            "subscription_group_id": group_id,
            "subscription_state": rng.choice(("subscribed", "unsubscribed")),
            kind: values,
        }
        found.append(json.dumps(body).encode())
    return found


def post_all(url: str, payloads: list[bytes], clients: int) -> list[int]:
    """Post every payload over `clients` keep-alive connections; the statuses answered."""
    statuses: list[int] = []
    lock = threading.Lock()
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
    }

    def client(part: list[bytes]) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            mine = [http.post("/subscription/status/set", content=p).status_code for p in part]
        with lock:
            statuses.extend(mine)

    threads = [
        threading.Thread(target=client, args=(payloads[i::clients],)) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure(
    tree: Path, hidden: str, args: argparse.Namespace, rng: random.Random
) -> dict[str, float]:
    """Serve `tree`'s simulator in a process and post to it; its CPU over the posts."""
    warm = bodies(args.warmup, 0, rng)
    payloads = bodies(args.requests, args.warmup * BATCH, rng)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE.format(key=KEY)],
        cwd=tree,
        env=tree_env(tree, hidden),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        process = psutil.Process(server.pid)
        post_all(url, warm, args.clients)  # imports, caches of the first requests
        before = cpu_seconds(process)
        statuses = post_all(url, payloads, args.clients)
        spent = cpu_seconds(process) - before
        server.stdin.write("state\n")
        server.stdin.flush()
        held = int(server.stdout.readline())
    finally:
        server.stdin.close()
        server.wait(30)
    wrong = sum(1 for s in statuses if s != 201)
    if wrong or held != (args.requests + args.warmup) * BATCH:
        raise SystemExit(f"{tree}: {wrong} answers not 201, {held} subscriptions held")
    return {
        "cpu_seconds": round(spent, 3),
        "us_per_request": round(spent / args.requests * 1e6),
        "cpu_seconds_per_1000_identifiers": round(spent / (args.requests * BATCH) * 1000, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()

    runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    for round_, name, tree, hidden in rounds_in_both(args.base, args.rounds, "braze-subs-sim-cpu-"):
        figures = measure(tree, hidden, args, random.Random(round_ - 1))
        runs[name].append(figures)
        print(
            f"round {round_} {name}: {figures['us_per_request']} us a request, "
            f"{figures['cpu_seconds_per_1000_identifiers']} CPU s per 1,000 "
            "identifiers",
            flush=True,
        )
    result: dict[str, Any] = {
        "base": args.base,
        "requests": args.requests,
        "identifiers_per_request": BATCH,
        "clients": args.clients,
        "load_average": round(os.getloadavg()[0], 1),
    }
    for name, figures in runs.items():
        per_request = [f["us_per_request"] for f in figures]
        per_thousand = [f["cpu_seconds_per_1000_identifiers"] for f in figures]
        result[f"{name}.us_per_request"] = per_request
        result[f"{name}.median_us_per_request"] = statistics.median(per_request)
        result[f"{name}.cpu_seconds_per_1000_identifiers"] = statistics.median(per_thousand)
    result["ratio"] = round(
        result["this.median_us_per_request"] / result["base.median_us_per_request"], 3
    )
    publish(result, "sim_cpu.json")


if __name__ == "__main__":
    main()
