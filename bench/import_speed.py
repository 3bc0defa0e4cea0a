"""How fast `braze-subs import` enqueues, against a raw redis-py pipeline writing the same rows.

    .venv/bin/python -m bench.import_speed --rows 200000 [--kinds phone] [--jobs N] [--repeat 3]
    .venv/bin/python -m bench.import_speed --base main --repeat 5 [--kinds phone]

Both read the same JSON Lines file from disk into a private redis-server. The raw baseline
parses each line with json.loads and writes one HSET per row through a pipeline (1,000 rows
per round trip), with no validation, no normalisation and no ordering guarantees. braze-subs
validates every row (email-validator, phonenumbers), normalises, validates the whole file
before enqueuing anything, and enqueues through the Lua script; `--jobs` processes validate
(default: one per CPU, as `braze-subs import`; 1: the importing process alone). With
`--repeat`, both run that many times, alternating, and the best run of each counts (the
machine may be busy with other work); the ratio of each round is kept too, and their median
and spread printed. `--occurred` gives every row an `occurred_at` (each its own, 37 ms apart) and a
`source`, so the import pays for event time and history as a producer's file would make it.

`--base REV` times that commit's import beside this tree's in the same rounds (checked out
into a temporary git worktree; each round runs raw, this tree, the base, in that order), so
the machine's other load is the same for both. Imports run in a child process with the
tree on PYTHONPATH, both trees alike. Prints rows/s of each, the ratios, the jobs used, the
load average, the CPU a row costs each process (median and spread of the rounds: the
validating processes', the importing process's own, Redis's; for the raw pipeline its
one process and Redis), and the peak Python memory of this tree's importing process
(worker processes are not traced).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
# --occurred: the rows' event times, one every 37 ms from here on, each row's its own text
# (a producer's backfill; one text for every row would flatter any cache of parsed times).
OCCURRED = datetime(2026, 11, 28, 6, tzinfo=UTC)


def write_rows(path: Path, rows: int, kinds: str, occurred: bool = False) -> None:
    chosen = kinds.split(",")
    with open(path, "w") as handle:
        for n in range(rows):
            kind = chosen[n % len(chosen)]
            row = {"subscription_group_id": f"group-{n % 4}", "subscription_state": "subscribed"}
            if kind == "email":
                row["email"] = f"user{n}@example{n % 50}.com"
            elif kind == "phone":
                row["phone"] = f"+1415{2_000_000 + n:07d}"
            else:
                row["external_id"] = f"user-{n}"
            if occurred:
                moment = OCCURRED + timedelta(milliseconds=37 * n)
                row["occurred_at"] = moment.isoformat(timespec="milliseconds")[:-6] + "Z"
                row["source"] = "backfill"
            handle.write(json.dumps(row) + "\n")


def raw_pipeline(path: Path, client: object) -> float:
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)  # type: ignore[attr-defined]
    with open(path) as handle:
        for count, line in enumerate(handle, 1):
            row = json.loads(line)
            identifier = row.get("email") or row.get("phone") or row.get("external_id")
            pipe.hset("raw:pending", f"{row['subscription_group_id']}:{identifier}", line)
            if count % 1000 == 0:
                pipe.execute()
    pipe.execute()
    return time.perf_counter() - started


def child(url: str, path: Path, rows: int, jobs: int | None) -> None:
    """Run in a child process with a tree on PYTHONPATH: that tree's import, timed."""
    from redis import Redis

    from stores.buffer import Buffer
    from stores.keys import Keys
    from tasks.bulk_import import enqueue_file

    start = resource.getrusage(resource.RUSAGE_SELF)  # after the imports (~0.45 s of CPU)
    started = time.perf_counter()
    result = enqueue_file(path, Buffer(Redis.from_url(url), Keys("braze-subs")), jobs=jobs)
    seconds = time.perf_counter() - started
    assert result.enqueued == rows, result
    # CPU: this (the importing) process's own in the timed part, and its validating
    # processes' (reaped when the pool shut down, so RUSAGE_CHILDREN holds them; forked
    # after the imports, they hold no interpreter start).
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "jobs": result.jobs,
                "cpu_importing": own.ru_utime + own.ru_stime - start.ru_utime - start.ru_stime,
                "cpu_validating": children.ru_utime + children.ru_stime,
            }
        )
    )


def timed_import(tree: Path, url: str, path: Path, rows: int, jobs: int | None) -> dict[str, float]:
    # This file, run as a script: the base tree's copy may have no --child.
    command = [sys.executable, __file__, "--child", url, "--file", str(path)]
    command += ["--rows", str(rows)]
    if jobs is not None:
        command += ["--jobs", str(jobs)]
    out = subprocess.run(
        command,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    answer: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return answer


def redis_cpu(client: object) -> float:
    info = client.info("cpu")  # type: ignore[attr-defined]
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def spread(values: list[float], digits: int = 3) -> str:
    return (
        f"{round(statistics.median(values), digits)} "
        f"({round(min(values), digits)}-{round(max(values), digits)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--kinds", default="external_id,email,phone")
    parser.add_argument(
        "--jobs", type=int, default=None, help="validating processes (default: one per CPU)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best counts")
    parser.add_argument("--base", help="a commit whose import runs beside this tree's")
    parser.add_argument("--occurred", action="store_true", help="rows with occurred_at and source")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.file, args.rows, args.jobs)
        return

    sys.path.insert(0, str(ROOT))
    from redis import Redis

    from bench.figures import publish
    from devtools.processes import local_redis
    from stores.buffer import Buffer
    from stores.keys import Keys
    from tasks.bulk_import import enqueue_file
    from tasks.parallel import cpu_count

    times: dict[str, list[float]] = {"raw": [], "this": [], "base": []}
    # CPU seconds of each run: validating processes, importing (or raw) process, Redis
    cpu: dict[str, dict[str, list[float]]] = {
        name: {"validating": [], "importing": [], "redis": []} for name in times
    }
    loads: list[float] = []
    jobs = 0
    with TemporaryDirectory(prefix="braze-subs-import-") as tmp:
        workdir = Path(tmp)
        path = workdir / "changes.jsonl"
        write_rows(path, args.rows, args.kinds, args.occurred)
        trees = {"this": ROOT}
        if args.base:
            from bench.trees import add_base_tree  # the child runs this file as a script

            trees["base"] = workdir / "base"
            add_base_tree(trees["base"], args.base)
        try:
            with local_redis(workdir) as url:
                client = Redis.from_url(url)
                for round_ in range(max(1, args.repeat)):
                    loads.append(os.getloadavg()[0])
                    client.flushall()
                    redis_before, own_before = redis_cpu(client), time.process_time()
                    times["raw"].append(raw_pipeline(path, client))
                    cpu["raw"]["importing"].append(time.process_time() - own_before)
                    cpu["raw"]["redis"].append(redis_cpu(client) - redis_before)
                    for name, tree in trees.items():
                        client.flushall()
                        redis_before = redis_cpu(client)
                        run = timed_import(tree, url, path, args.rows, args.jobs)
                        cpu[name]["redis"].append(redis_cpu(client) - redis_before)
                        cpu[name]["validating"].append(run["cpu_validating"])
                        cpu[name]["importing"].append(run["cpu_importing"])
                        times[name].append(run["seconds"])
                        jobs = int(run["jobs"])
                    print(
                        f"round {round_ + 1}: load {loads[-1]:.1f} "
                        + " ".join(
                            f"{name} {values[-1]:.2f} s (CPU "
                            + "/".join(f"{v[-1]:.2f}" for v in cpu[name].values() if v)
                            + ")"
                            for name, values in times.items()
                            if values
                        ),
                        file=sys.stderr,
                        flush=True,
                    )
                # Memory in a separate, untimed run: tracemalloc slows Python several times.
                # An untraced run first, so the modules the import loads on first use (the
                # process pool's) are not counted as its memory.
                client.flushall()
                enqueue_file(path, Buffer(client, Keys("braze-subs")), jobs=args.jobs)
                client.flushall()
                tracemalloc.start()
                enqueue_file(path, Buffer(client, Keys("braze-subs")), jobs=args.jobs)
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
        finally:
            if args.base:
                from bench.trees import remove_base_tree

                remove_base_tree(trees["base"])
    raw = min(times["raw"])
    figures: dict[str, object] = {
        "rows": args.rows,
        "kinds": args.kinds,
        "occurred_at_and_source": args.occurred,
        "cpus": cpu_count(),
        "jobs": jobs,
        "repeat": max(1, args.repeat),
        "load_average": spread(loads, 1),
        "raw_rows_per_second": round(args.rows / raw),
    }
    for name in trees:
        label = "import" if name == "this" else f"base_{args.base}_import"
        best = min(times[name])
        figures[f"{label}_rows_per_second"] = round(args.rows / best)
        figures[f"{label}_ratio"] = round(raw / best, 3)
        rounds = [r / t for r, t in zip(times["raw"], times[name], strict=True)]
        figures[f"{label}_ratio_per_round"] = spread(rounds)
        for part, values in cpu[name].items():
            figures[f"{label}_cpu_us_per_row_{part}"] = spread(
                [v / args.rows * 1e6 for v in values], 2
            )
    for part in ("importing", "redis"):
        figures[f"raw_cpu_us_per_row_{part}"] = spread(
            [v / args.rows * 1e6 for v in cpu["raw"][part]], 2
        )
    figures["import_peak_python_memory_mib"] = round(peak / 2**20, 2)
    suffix = "-occurred" if args.occurred else ""
    publish(figures, f"import-{args.kinds.replace(',', '-')}{suffix}.json")


if __name__ == "__main__":
    main()
