"""The coalescer tick's CPU per change, step by step, this tree and a base side by side
(issue 26, the ceiling's fifth step).

    .venv/bin/python -m bench.tick_cpu                      # base: main before the step
    .venv/bin/python -m bench.tick_cpu --base main --identifiers 20000 --rounds 3

bench.post_cpu says where a post's CPU goes; this says where a cut's goes. For each tree
(the base checked out into a temporary git worktree, run with this interpreter; the two
trees alternate, their order swapped every round) one process enqueues a backlog of
--identifiers (bench.drain's mix) into a private redis-server and drains it as a worker
does: the coalescer's full ticks (at the default settings and an unlimited budget) publish
real Celery post messages into that Redis (`tasks.subscriptions`' dispatch), and every
batch cut is posted with the poster (v1, one thread, the simulator in a process of its
own), so the in-flight cap frees as in a drain. Counted inside the ticks only: the
ticking thread's CPU (`time.thread_time`) in each step — `read_due`, the planning
(`plan_batches`), the take (`Buffer.take`: its arguments and the pipeline's round trip),
the publish (`Coalescer._send_cut`) and the tick in all, and of it the cyclic garbage
collector's (`gc.callbacks`) —, the changes read, and redis-server's CPU (`INFO cpu`,
read before and after each tick: nothing else runs on it meanwhile). Each tree's heap is
left as its worker leaves it at `ready` (frozen from the collector's full collections
since the seventh step). Medians over the rounds, per change cut (µs) and per 1,000
identifiers. Writes bench/results/tick-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench.figures import publish
from bench.trees import ROOT, figures_in_tree, rounds_in_both

BASE = "91ae1f1"  # main before the fifth step (the tick)
# Batches posted between two ticks: a drain's beat (1 s) at ~10,000 identifiers/s. The
# in-flight cap (500) then leaves a tick room for about that many batches, and the tick
# reads READ_AHEAD times their changes, as in bench.ceiling's drains.
POSTS_BETWEEN = 200

# (module, owner or "", name, label): the steps of a tick whose thread CPU is counted.
STEPS = (
    ("stores.buffer", "Buffer", "read_due", "read_due"),
    # The planning as the coalescer calls it: `plan_cut` here, `plan_batches` in the base.
    ("delivery.coalescer", "", "plan_cut|plan_batches", "planning"),
    ("stores.buffer", "Buffer", "take", "take (arguments and round trip)"),
    ("delivery.coalescer", "Coalescer", "_send_cut", "publish"),
)

HARNESS = """
import importlib, json, os, random, subprocess, sys, tempfile, threading, time
from collections import defaultdict
from pathlib import Path
from devtools.processes import local_redis

STEPS = json.loads(os.environ["STEPS"])
spent, ticking = defaultdict(float), [False]

# The cyclic garbage collector's thread CPU inside the ticks (within the steps above).
import gc
collecting = [0.0, 0.0]
def collection(phase, info):
    if phase == "start":
        collecting[0] = time.thread_time()
    elif ticking[0]:
        collecting[1] += time.thread_time() - collecting[0]
gc.callbacks.append(collection)

def counted(owner, names, label):
    name = next(name for name in names.split("|") if hasattr(owner, name))
    original = getattr(owner, name)
    def step(*args, **kwargs):
        if not ticking[0]:
            return original(*args, **kwargs)
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - started
    setattr(owner, name, step)

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
        os.environ.update(REDIS_URL=url, BRAZE_REST_ENDPOINT=sim_url,
                          BRAZE_API_KEY="bench-key", BRAZE_RATE_LIMIT=str(10**9),
                          BRAZE_RATE_LIMIT_WINDOW_SECONDS="2")
        import bench.drain as drain
        import tasks.subscriptions as subscriptions
        for module, owner, name, label in STEPS:
            found = importlib.import_module(module)
            counted(getattr(found, owner) if owner else found, name, label)
        services = subscriptions.services(None)
        # Warmed up as a running worker is: the first publish's imports and connection, the
        # scripts loaded, a tick with nothing due (none of it counted).
        subscriptions._dispatch(services.workspace, "warm-up")
        services.coalescer(lambda _id: None)._tick()
        # The heap as the tree's worker leaves it at `ready` (this tree freezes it from the
        # collector's full collections, tasks.celery_app.freeze_start_up_heap; a base
        # before the seventh step does not).
        freeze = getattr(importlib.import_module("tasks.celery_app"), "freeze_start_up_heap", None)
        if freeze is not None:
            freeze()
        identifiers = int(os.environ["IDENTIFIERS"])
        services.buffer.enqueue(drain.backlog(identifiers, 4, random.Random(1)))
        read = [0]
        original_read = type(services.buffer).read_due
        def read_due(self, *args, **kwargs):
            changes, more = original_read(self, *args, **kwargs)
            if ticking[0]:
                read[0] += len(changes)
            return changes, more
        type(services.buffer).read_due = read_due
        cut, queued = [], []
        between = int(os.environ["POSTS_BETWEEN"])
        messages = [0]
        def one(batch_id):
            subscriptions._dispatch(services.workspace, batch_id)
            cut.append(batch_id)
            messages[0] += 1
        def many(batch_ids):
            subscriptions._dispatch_many(services.workspace, batch_ids)
            cut.extend(batch_ids)
            messages[0] += 1
        coalescer = services.coalescer(one, many)
        poster = services.poster()
        poster.liveness.ensure_started()
        client = services.buffer.client
        def redis_cpu():
            info = client.info("cpu")
            return info["used_cpu_user"] + info["used_cpu_sys"]
        def command_usec():
            return {name: stat["usec"] for name, stat in client.info("commandstats").items()}
        commands = defaultdict(float)
        tick = redis = 0.0
        ticks = cut_identifiers = 0
        while True:
            before, usec = redis_cpu(), command_usec()
            ticking[0] = True
            started = time.thread_time()
            report = coalescer._tick()
            tick += time.thread_time() - started
            ticking[0] = False
            redis += redis_cpu() - before
            for name, spent_usec in command_usec().items():
                commands[name] += spent_usec - usec.get(name, 0)
            ticks += 1
            cut_identifiers += report.identifiers
            queued += cut
            cut.clear()
            if not queued:
                break
            # As a drain's workers do between two beats: the oldest batches posted, the
            # rest still in flight (the in-flight cap leaves the next tick that much room).
            for batch_id in queued[:between]:
                poster.post(batch_id)
            del queued[:between]
        assert services.buffer.pending_count() == 0, "the drain left changes pending"
finally:
    sim.stdin.close()
    sim.wait(timeout=30)
per = 1e6 / cut_identifiers
figures = {label: spent[label] * per for label in spent}
figures["tick in all"] = tick * per
figures["rest of the tick"] = figures["tick in all"] - sum(spent.values()) * per
figures["reads a change"] = read[0] / cut_identifiers
figures["of it the collector"] = collecting[1] * per
figures["redis-server during ticks"] = redis * per
figures["redis commands"] = {
    name.removeprefix("cmdstat_"): round(spent_usec * 1000 / cut_identifiers, 2)
    for name, spent_usec in sorted(commands.items(), key=lambda item: -item[1])
    if spent_usec > 0
}
figures["identifiers"] = cut_identifiers
figures["messages"] = messages[0]
figures["ticks"] = ticks
print("FIGURES " + json.dumps(figures))
"""

LABELS = (
    *(step[3] for step in STEPS),
    "rest of the tick",
    "tick in all",
    "of it the collector",
    "redis-server during ticks",
)


def measure(tree: Path, hidden: str, identifiers: int, posts_between: int) -> dict[str, Any]:
    return figures_in_tree(
        tree,
        HARNESS,
        hidden,
        IDENTIFIERS=str(identifiers),
        STEPS=json.dumps(STEPS),
        POSTS_BETWEEN=str(posts_between),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--identifiers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--posts-between",
        type=int,
        default=POSTS_BETWEEN,
        help="batches posted between two ticks (a drain's beat at ~10,000 identifiers/s)",
    )
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "this": []}
    for round_, name, tree, hidden in rounds_in_both(
        args.base, args.rounds, "braze-subs-tick-cpu-"
    ):
        figures = measure(tree, hidden, args.identifiers, args.posts_between)
        runs[name].append(figures)
        print(
            f"round {round_} {name}: tick {figures['tick in all']:.2f} us a "
            f"change, redis-server {figures['redis-server during ticks']:.2f}, "
            f"{figures['reads a change']:.2f} reads a change "
            f"({figures['identifiers']} identifiers, {figures['ticks']} ticks, "
            f"{figures['messages']} messages)",
            flush=True,
        )
    base_commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.base],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    result: dict[str, Any] = {
        "base": base_commit or args.base,
        "identifiers": args.identifiers,
        "posts_between": args.posts_between,
        "rounds": args.rounds,
        "load_average": round(os.getloadavg()[0], 1),
    }
    print(f"\n{'us of CPU a change cut (medians)':<44}{'base':>10}{'this':>10}")
    for label in (*LABELS, "reads a change"):
        medians = {
            name: statistics.median(run.get(label, 0.0) for run in runs[name]) for name in runs
        }
        for name in runs:
            result[f"{name}.{label}"] = round(medians[name], 3)
        print(f"{label:<44}{medians['base']:>10.2f}{medians['this']:>10.2f}")
    publish(result, "tick-cpu.json")


if __name__ == "__main__":
    main()
