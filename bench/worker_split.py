"""Where a worker's CPU goes in a drain (issue 26, the workers' sixth step), this tree and
a base commit side by side, alternating, in one run.

    .venv/bin/python -m bench.worker_split --base main
    .venv/bin/python -m bench.worker_split --base main --rounds 3 --identifiers 50000

Each round runs `bench.drain`'s drain (two v1 workers and beat, 100,000 unique
identifiers, a limit the drain never reaches) once in each tree. Inside each worker, a
`sitecustomize` of this bench (on the workers' PYTHONPATH, before the tree) adds up the
thread CPU (`time.thread_time`) spent in each step, from the worker's `ready` to its exit:
Celery's pool call of a task (all of a message's work in its pool thread), the task
bodies, `Poster.post`, `BrazeClient.post` (the HTTP exchange, the fence's round trip
included), `Coalescer.tick` and Celery's `saferepr` of a result. The drain's process
reads each worker's threads in `/proc/<pid>/task/*/stat` at `ready` and when the backlog
is drained: the workers' CPU per 1,000 identifiers and the consumer's (main) thread's
share. The figures are sums over both workers; a unit's cost is their sum over its count.
The machine is shared: compare the two trees within a run. Writes
bench/results/worker_split.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.figures import publish
from bench.trees import add_base_tree, child_figures, remove_base_tree

ROOT = Path(__file__).resolve().parent.parent

# Loaded by every Python process started with its folder on PYTHONPATH; counts only in a
# Celery worker. Wraps by name, so it runs against either tree.
SITECUSTOMIZE = """
import sys
if "worker" in sys.orig_argv and any("celery" in a for a in sys.orig_argv):
    import atexit, functools, json, os, threading, time
    from celery.signals import worker_init, worker_ready
    counts, lock = {}, threading.Lock()

    def add(name, seconds):
        with lock:
            entry = counts.setdefault(name, [0.0, 0])
            entry[0] += seconds
            entry[1] += 1

    def counted(orig, name):
        @functools.wraps(orig)
        def step(*args, **kwargs):
            started = time.thread_time()
            try:
                return orig(*args, **kwargs)
            finally:
                add(name, time.thread_time() - started)
        return step

    def install(**_):
        import celery.app.trace as trace
        import celery.concurrency.thread as pool
        import delivery.braze_client as client
        import delivery.coalescer as coalescer
        import delivery.poster as poster
        import tasks.subscriptions as tasks
        pool.apply_target = counted(pool.apply_target, "message")
        trace.saferepr = counted(trace.saferepr, "saferepr")
        poster.Poster.post = counted(poster.Poster.post, "post")
        client.BrazeClient.post = counted(client.BrazeClient.post, "exchange")
        coalescer.Coalescer.tick = counted(coalescer.Coalescer.tick, "tick")
        for task in (tasks.post_batches, tasks.post_batch, tasks.coalesce):
            task.run = counted(task.run, f"task {task.name}")
        # Connected here, after the app's own `ready` handlers (connected as it was
        # imported): the counts start once they ran (a tree that freezes its start-up heap
        # at `ready` collects it once first, ~50 ms, a start-up cost).
        worker_ready.connect(ready, weak=False)

    # The collector's own thread CPU, each generation apart (issue 26, the seventh step):
    # a collection runs in whichever thread allocated past the threshold, inside any of
    # the steps above. Collections never overlap, so no lock (one taken here could be the
    # lock the collecting thread holds already, in `add`).
    import gc
    collecting = [0.0]

    def collection(phase, info):
        if phase == "start":
            collecting[0] = time.thread_time()
            return
        entry = counts.setdefault(f"gc{info['generation']}", [0.0, 0])
        entry[0] += time.thread_time() - collecting[0]
        entry[1] += 1

    gc.callbacks.append(collection)

    def ready(**_):
        with lock:
            counts.clear()

    def dump():
        path = os.path.join(os.environ["WORKER_SPLIT_DIR"], f"{os.getpid()}.json")
        with open(path, "w") as out:
            json.dump(counts, out)

    worker_init.connect(install, weak=False)
    atexit.register(dump)
"""

# Runs in the tree's own directory (first on sys.path after the sitecustomize's folder);
# IDENTIFIERS and LIMIT are replaced by their figures.
DRAIN = """
import argparse, contextlib, glob, json, os, threading, time
import bench.drain as drain
TICK = os.sysconf("SC_CLK_TCK")
def threads(pid):
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        found[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return found
started, polled, workers, at_ready, at_end = drain.celery_process, drain.read_status, [], {}, {}
@contextlib.contextmanager
def celery_process(role, env, log_path, *options):
    with started(role, env, log_path, *options) as process:
        if role == "worker":
            workers.append(process.pid)
            def ready(pid=process.pid, log=log_path):
                while b" ready." not in (log.read_bytes() if log.exists() else b""):
                    time.sleep(0.02)
                at_ready[pid] = threads(pid)
            threading.Thread(target=ready, daemon=True).start()
        yield process
def read_status(client, keys):
    status = polled(client, keys)
    if status.pending == 0 and status.in_flight == 0 and not at_end:
        at_end.update({pid: threads(pid) for pid in workers})
    return status
drain.celery_process, drain.read_status = celery_process, read_status
args = argparse.Namespace(workers="v1,v1", identifiers=IDENTIFIERS, groups=4,
    limit=LIMIT, window=2.0, timeout=600)
figures = drain.run(args)
total = main = 0.0
for pid in workers:
    before, after = at_ready[pid], at_end[pid]
    total += sum(after[t] - before.get(t, 0.0) for t in after)
    main += after.get(pid, 0.0) - before.get(pid, 0.0)
steps = {}
for path in glob.glob(os.path.join(os.environ["WORKER_SPLIT_DIR"], "*.json")):
    for name, (seconds, count) in json.load(open(path)).items():
        entry = steps.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += count
figures["workers_cpu"] = round(total, 2)
figures["main_thread_cpu"] = round(main, 2)
figures["steps"] = steps
print("FIGURES " + json.dumps(figures))
"""


def drain(tree: Path, args: argparse.Namespace, site: Path) -> dict[str, Any]:
    code = DRAIN.replace("IDENTIFIERS", str(args.identifiers)).replace("LIMIT", str(args.limit))
    with tempfile.TemporaryDirectory(prefix="braze-subs-split-") as counts:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tree,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join((str(site), str(tree))),
                "WORKER_SPLIT_DIR": counts,
            },
            capture_output=True,
            text=True,
            check=False,
        )
        return child_figures(done, tree)


def summary(figures: dict[str, Any]) -> dict[str, float]:
    """A drain's figures per unit: CPU s per 1,000 identifiers, µs a post, a change, a
    message."""
    steps = figures["steps"]

    def seconds(name: str) -> float:
        return float(steps.get(name, [0.0, 0])[0])

    def each(name: str) -> float:
        total, count = steps.get(name, [0.0, 0])
        return total / count * 1e6 if count else 0.0

    per_thousand = 1000 / figures["identifiers"]
    tasks = seconds("task subscriptions.post_batches") + seconds("task subscriptions.post_batch")
    messages = steps.get("message", [0.0, 0])[1] or 1
    return {
        "workers_cpu_per_1000": round(figures["workers_cpu"] * per_thousand, 4),
        "main_thread_cpu_per_1000": round(figures["main_thread_cpu"] * per_thousand, 4),
        "post_us": round(each("post")),
        "exchange_us": round(each("exchange")),
        "tick_us_per_change": round(seconds("tick") * 1e6 / figures["identifiers"], 2),
        "message_ms": round(each("message") / 1000, 2),
        "saferepr_us_per_message": round(seconds("saferepr") * 1e6 / messages),
        # A message's pool call less its task body: Celery's trace (events, saferepr, log).
        "trace_us_per_message": round(
            (seconds("message") - tasks - seconds("task subscriptions.coalesce")) * 1e6 / messages
        ),
        # The post tasks' bodies less their posts: the reports' dicts, the poster's set-up.
        "post_task_rest_us_per_message": round((tasks - seconds("post")) * 1e6 / messages),
        # The cyclic garbage collector's CPU per 1,000 identifiers, every thread's, and
        # the full (generation 2) collections' part and count.
        "gc_cpu_per_1000": round(
            sum(seconds(f"gc{generation}") for generation in range(3)) * per_thousand, 4
        ),
        "gc2_cpu_per_1000": round(seconds("gc2") * per_thousand, 4),
        "gc2_collections": steps.get("gc2", [0.0, 0])[1],
        "identifiers_per_second": figures["identifiers_per_second"],
        "wrong_final_state": figures["wrong_final_state"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--identifiers", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=100_000)
    args = parser.parse_args()

    runs: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    with tempfile.TemporaryDirectory(prefix="braze-subs-worker-split-") as tmp:
        base_tree = Path(tmp) / "base"
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        add_base_tree(base_tree, args.base)
        try:
            for round_ in range(args.rounds):
                order = [("base", base_tree), ("this", ROOT)]
                if round_ % 2:
                    order.reverse()
                for name, tree in order:
                    found = summary(drain(tree, args, site))
                    runs[name].append(found)
                    print(f"round {round_ + 1} {name}: {json.dumps(found)}", flush=True)
        finally:
            remove_base_tree(base_tree)
    result: dict[str, Any] = {
        "base": args.base,
        "identifiers": args.identifiers,
        "workers": "v1,v1",
        "load_average": round(os.getloadavg()[0], 1),
    }
    for name, found in runs.items():
        for figure in found[0]:
            values = [run[figure] for run in found]
            result[f"{name}.{figure}"] = values
            result[f"{name}.{figure}.median"] = statistics.median(values)
    publish(result, "worker_split.json")


if __name__ == "__main__":
    main()
