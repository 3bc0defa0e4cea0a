"""The pipeline's ceiling (issue 26): identifiers per second two v1 workers drain with an
unlimited budget, this tree and a base commit side by side, alternating, in one run.

    .venv/bin/python -m bench.ceiling                       # base: main before its third step
    .venv/bin/python -m bench.ceiling --rounds 5 --identifiers 50000

Each round runs `bench.drain`'s drain (a private redis-server, the simulator on the same
cores, two v1 workers and beat as in the Procfile; 100,000 unique identifiers; a limit of
100,000 requests per 2 s, so the budget never binds) once in each tree, the order of the
two trees swapped every round so that neither always runs on the busier minute. The base
is checked out into a temporary git worktree and run from there with this interpreter (as
bench/lanes.py does); a Python package this tree requires and the base does not (hiredis)
is hidden from the base's processes, so that the base runs as its own install would.
Reports per tree every round's identifiers/s (identifiers / the time from the first
request to the last), the median, min and max, wrong final states, Redis's commands per
request and CPU seconds over the drain (INFO commandstats and cpu), and the CPU seconds
per 1,000 identifiers of each process (bench/cpu_split.py: the workers, beat, the
simulator's process, redis-server; medians over the rounds) with the ceiling they imply:
the machine's cores divided by the CPU all of them spend per identifier, what the pipeline
could reach on this machine if nothing else ran and no process ever waited for another.
The machine is shared: compare the two trees within a run, not across runs. Writes
bench/results/ceiling.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from bench.figures import publish
from bench.trees import ROOT, figures_in_tree, rounds_in_both

BASE = "468eece"  # main before the ceiling's third step (hiredis, the split per process)
CPU_SPLIT = ROOT / "bench" / "cpu_split.py"
PROCESSES = ("workers", "beat", "simulator", "redis-server")
# Within the simulator's process (the drain's): its own thread, the drain's status poll
# left out. Shown beside the processes, not added to their total.
THREADS = ("simulator thread",)

# Runs in the tree's own directory (first on sys.path), so the tree's code is measured.
# Redis's own figures over the drain (the enqueue before it left out): the drain's status
# poll is wrapped, so the first poll (the workers just started) resets INFO's counters and
# the one that finds the pipeline drained reads them: commands run (those inside scripts
# included) and Redis's CPU seconds.
DRAIN = (
    "import argparse, json\n"
    "import bench.drain as drain\n"
    "polled, redis_figures = drain.read_status, {{}}\n"
    "def watched(client, keys):\n"
    "    if not redis_figures:\n"
    "        client.config_resetstat()\n"
    "        cpu = client.info('cpu')\n"
    "        redis_figures['cpu0'] = cpu['used_cpu_user'] + cpu['used_cpu_sys']\n"
    "    status = polled(client, keys)\n"
    "    if status.pending == 0 and status.in_flight == 0:\n"
    "        stats, cpu = client.info('commandstats'), client.info('cpu')\n"
    "        redis_figures['commands'] = sum(v['calls'] for v in stats.values())\n"
    "        redis_figures['cpu'] = cpu['used_cpu_user'] + cpu['used_cpu_sys']\n"
    "    return status\n"
    "drain.read_status = watched\n"
    "import importlib.util\n"
    "spec = importlib.util.spec_from_file_location('ceiling_cpu_split', {cpu_split!r})\n"
    "cpu_split = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(cpu_split)\n"
    "split = cpu_split.watch(drain, {identifiers})\n"
    "args = argparse.Namespace(workers='v1,v1', identifiers={identifiers}, groups=4,\n"
    "    limit={limit}, window={window}, timeout={timeout})\n"
    "figures = drain.run(args)\n"
    "figures['redis_commands'] = redis_figures.get('commands', 0)\n"
    "figures['redis_cpu_seconds'] = round(redis_figures.get('cpu', 0) - redis_figures['cpu0'], 2)\n"
    "figures['cpu_seconds'] = split.figures()\n"
    "print('FIGURES ' + json.dumps(figures))\n"
)


def drain(tree: Path, hidden: str, args: argparse.Namespace) -> dict[str, Any]:
    code = DRAIN.format(
        identifiers=args.identifiers,
        limit=args.limit,
        window=args.window,
        timeout=args.timeout,
        cpu_split=str(CPU_SPLIT),
    )
    return figures_in_tree(tree, code, hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--identifiers", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=100_000)
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    rates: dict[str, list[float]] = {"base": [], "this": []}
    wrong: dict[str, int] = {"base": 0, "this": 0}
    commands: dict[str, list[float]] = {"base": [], "this": []}
    redis_cpu: dict[str, list[float]] = {"base": [], "this": []}
    cpu: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    for round_, name, tree, hidden in rounds_in_both(args.base, args.rounds, "braze-subs-ceiling-"):
        figures = drain(tree, hidden, args)
        rate = figures["identifiers"] / figures["drain_seconds"]
        per_thousand = {
            process: round(seconds * 1000 / figures["identifiers"], 3)
            for process, seconds in figures["cpu_seconds"].items()
        }
        cpu[name].append(per_thousand)
        rates[name].append(round(rate))
        wrong[name] += figures["wrong_final_state"]
        per_request = figures["redis_commands"] / max(1, figures["requests"])
        commands[name].append(round(per_request))
        redis_cpu[name].append(figures["redis_cpu_seconds"])
        print(
            f"round {round_} {name}: {rate:,.0f} identifiers/s "
            f"({figures['drain_seconds']} s, {figures['requests']} requests; "
            f"Redis: {per_request:,.0f} commands a request, "
            f"{figures['redis_cpu_seconds']} s CPU; CPU s per 1,000 identifiers: "
            + ", ".join(f"{p} {per_thousand.get(p, 0)}" for p in (*PROCESSES, *THREADS))
            + ")",
            flush=True,
        )
    result: dict[str, Any] = {
        "base": args.base,
        "identifiers": args.identifiers,
        "workers": "v1,v1",
        "limit": f"{args.limit} per {args.window:g} s",
        "load_average": round(os.getloadavg()[0], 1),
        "cores": os.cpu_count(),
    }
    for name, values in rates.items():
        result[f"{name}.identifiers_per_second"] = values
        result[f"{name}.median"] = round(statistics.median(values))
        result[f"{name}.spread"] = f"{min(values):,}-{max(values):,}"
        result[f"{name}.wrong_final_state"] = wrong[name]
        result[f"{name}.redis_commands_per_request"] = round(statistics.median(commands[name]))
        result[f"{name}.redis_cpu_seconds"] = redis_cpu[name]
        # CPU seconds per 1,000 identifiers, each process's median over the rounds, and the
        # identifiers/s the machine's cores allow at that cost (nothing else running).
        split = {p: statistics.median(r.get(p, 0.0) for r in cpu[name]) for p in PROCESSES}
        result[f"{name}.cpu_seconds_per_1000"] = {p: round(v, 3) for p, v in split.items()}
        for thread in THREADS:
            result[f"{name}.cpu_seconds_per_1000.{thread}"] = round(
                statistics.median(r.get(thread, 0.0) for r in cpu[name]), 3
            )
        total = sum(split.values())
        result[f"{name}.cpu_seconds_per_1000_total"] = round(total, 3)
        result[f"{name}.cpu_bound_identifiers_per_second"] = (
            round((os.cpu_count() or 1) * 1000 / total) if total else None
        )
    result["ratio_of_medians"] = round(result["this.median"] / result["base.median"], 3)
    publish(result, "ceiling.json")


if __name__ == "__main__":
    main()
