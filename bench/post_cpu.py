"""A worker's CPU a v1 post, step by step, this tree and a base side by side (issue 26).

    .venv/bin/python -m bench.post_cpu                     # base: main before the fourth step
    .venv/bin/python -m bench.post_cpu --base main --identifiers 20000 --rounds 3

bench.ceiling gives each process's CPU over a whole drain and bench.ceiling_instructions
its instructions; this says where a post's CPU goes. For each tree (the base checked out
into a temporary git worktree, run with this interpreter as bench.ceiling does; the two
trees alternate, their order swapped every round) one process enqueues a backlog of
--identifiers (bench.drain's mix) into a private redis-server, cuts it with the coalescer's
tick and posts every batch with the poster (v1, one thread, the simulator in a process of
its own), and measures the posting thread's CPU (`time.thread_time`) in each step of a post:
the HTTP exchange (the fence's round trip included), each Redis call, and the post in all;
then the cut's CPU a batch; and over the posts, Redis's commands a post (INFO
commandstats, a script's own commands included), the script calls a post (round trips)
and redis-server's CPU a post (INFO cpu, the whole server). Medians over the rounds, in
microseconds a post. One thread and
no Celery: the work of a post itself, without the contention of a worker's pool (a drain
adds that: bench.ceiling). Writes bench/results/post-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench.figures import publish
from bench.trees import figures_in_tree, rounds_in_both

BASE = "1526bcf"  # main before the fourth step's changes to the workers (issue 26)

# (module, class, method, label): the steps of a post whose thread CPU is counted.
STEPS = (
    ("delivery.braze_client", "BrazeClient", "post", "HTTP exchange (fence included)"),
    ("stores.batch_records", "BatchStore", "claim", "claim"),
    ("stores.batch_records", "BatchStore", "fence", "fence"),
    ("stores.batch_records", "BatchStore", "_finish", "finish"),
    ("stores.refusals", "Refusals", "standing", "refusal check"),
    ("stores.limiter", "RateLimiter", "acquire", "turn (acquire)"),
    ("stores.limiter", "RateLimiter", "pause_after_turn", "pause read after the turn"),
    ("stores.limiter", "RateLimiter", "observe", "Braze's rate headers"),
    ("stores.counters", "Counters", "request", "request counters"),
)

HARNESS = """
import importlib, json, os, random, subprocess, sys, tempfile, threading, time
from collections import Counter, defaultdict
from pathlib import Path
from config.settings import load_settings
import bench.drain as drain
from delivery.services import Services
from devtools.processes import local_redis

STEPS = json.loads(os.environ["STEPS"])
spent, calls, local = defaultdict(float), Counter(), threading.local()

def counted(owner, name, label):
    original = getattr(owner, name)
    def step(*args, **kwargs):
        if getattr(local, label, False):
            return original(*args, **kwargs)
        setattr(local, label, True)
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - started
            calls[label] += 1
            setattr(local, label, False)
    setattr(owner, name, step)

for module, owner, name, label in STEPS:
    counted(getattr(importlib.import_module(module), owner), name, label)

SIM = (
    "from simulator import SimulatorConfig, SimulatorServer\\n"
    "import sys, time\\n"
    "s = SimulatorServer(SimulatorConfig(api_keys={'bench-key'}, auto_groups=True,"
    " rate_limit=10**9, window_seconds=2))\\n"
    "s.start(); print(s.url, flush=True); sys.stdin.read()\\n"
)
sim = subprocess.Popen([sys.executable, "-c", SIM], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
try:
    sim_url = sim.stdout.readline().strip()
    with tempfile.TemporaryDirectory() as workdir, local_redis(Path(workdir)) as url:
        services = Services(load_settings(
            redis_url=url, braze_rest_endpoint=sim_url, braze_api_key="bench-key",
            braze_rate_limit=10**9, braze_rate_limit_window_seconds=2))
        identifiers = int(os.environ["IDENTIFIERS"])
        services.buffer.enqueue(drain.backlog(identifiers, 4, random.Random(1)))
        messages = []
        coalescer = services.coalescer(messages.append, messages.extend)
        poster = services.poster()
        poster.liveness.ensure_started()
        cut = post = 0.0
        posts = 0
        commands = Counter()
        redis_cpu = 0.0

        def commandstats():
            return {name: stat["calls"] for name, stat in
                    services.redis.info("commandstats").items() if name != "cmdstat_info"}

        def server_cpu():
            cpu = services.redis.info("cpu")
            return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

        while True:
            started = time.thread_time()
            coalescer._tick()
            cut += time.thread_time() - started
            if not messages:
                break
            batches = list(messages)
            messages.clear()
            before = commandstats()
            redis_cpu -= server_cpu()
            started = time.thread_time()
            for batch_id in batches:
                poster.post(batch_id)
            post += time.thread_time() - started
            redis_cpu += server_cpu()
            posts += len(batches)
            for name, made in commandstats().items():
                commands[name] += made - before.get(name, 0)
finally:
    sim.stdin.close()
    sim.wait(timeout=30)
figures = {label: spent[label] * 1e6 / posts for label in spent}
figures["calls"] = {label: calls[label] / posts for label in calls}
figures["post in all"] = post * 1e6 / posts
figures["cut, a batch"] = cut * 1e6 / posts
figures["posts"] = posts
# Redis's commands in the posts (INFO commandstats: a script's own commands counted too),
# and of them the calls the worker made (round trips: scripts, and commands outside them).
figures["Redis commands a post"] = sum(commands.values()) / posts
figures["redis-server CPU a post (us)"] = redis_cpu * 1e6 / posts
figures["script calls a post"] = sum(
    commands[name] for name in ("cmdstat_evalsha", "cmdstat_eval")) / posts
print("FIGURES " + json.dumps(figures))
"""


def measure(tree: Path, hidden: str, identifiers: int) -> dict[str, Any]:
    return figures_in_tree(
        tree, HARNESS, hidden, IDENTIFIERS=str(identifiers), STEPS=json.dumps(STEPS)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--identifiers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    labels = [step[3] for step in STEPS] + ["post in all", "cut, a batch"]
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "this": []}
    for round_, name, tree, hidden in rounds_in_both(
        args.base, args.rounds, "braze-subs-post-cpu-"
    ):
        figures = measure(tree, hidden, args.identifiers)
        runs[name].append(figures)
        print(
            f"round {round_} {name}: {figures['post in all']:,.0f} us a post, "
            f"cut {figures['cut, a batch']:,.0f} us a batch ({figures['posts']} posts)",
            flush=True,
        )
    result: dict[str, Any] = {
        "base": args.base,
        "identifiers": args.identifiers,
        "rounds": args.rounds,
        "load_average": round(os.getloadavg()[0], 1),
    }
    for label in ("Redis commands a post", "script calls a post", "redis-server CPU a post (us)"):
        for name in runs:
            made = [run.get(label) for run in runs[name] if run.get(label) is not None]
            result[f"{name}.{label}"] = round(statistics.median(made), 2) if made else None
        print(f"{label}: base {result['base.' + label]}, this {result['this.' + label]}")
    print(f"\n{'us of the posting thread CPU a post (medians)':<52}{'base':>10}{'this':>10}")
    for label in labels:
        medians = {
            name: statistics.median(run.get(label, 0.0) for run in runs[name]) for name in runs
        }
        for name in runs:
            result[f"{name}.{label}"] = round(medians[name])
        shown = label
        if label in runs["base"][0]["calls"]:  # a step: how often a post takes it
            made = [statistics.median(r["calls"].get(label, 0.0) for r in runs[n]) for n in runs]
            shown = f"{label} ({made[0]:.2f} / {made[1]:.2f} a post)"
        print(f"{shown:<52}{medians['base']:>10,.0f}{medians['this']:>10,.0f}")
    publish(result, "post-cpu.json")


if __name__ == "__main__":
    main()
