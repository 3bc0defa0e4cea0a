"""What each way in costs Redis per change, this tree beside a base commit, in one run.

    .venv/bin/python -m bench.enqueue_cost [--rows 200000] [--rounds 3] [--base 038db7a]
    .venv/bin/python -m bench.enqueue_cost --callgrind [--rows 20000] [--base 038db7a]

For each round, each tree (this one, then the base checked out into a temporary git
worktree) and each way in, a fresh private redis-server takes the same changes from a
child process running that tree's code (this file run as a script with the tree on
PYTHONPATH), with the machine's other load the same for both:

- `raw`: bench/import_speed.py's baseline, a redis-py pipeline of one HSET per row of the
  import file (json.loads, no validation, no order, 1,000 per round trip);
- `import`: `enqueue_file` of the same JSON Lines file (a third each of external ids,
  emails and phones over 4 groups; validation in one process per CPU);
- `enqueue_changes`: the Python API, 1,000 changes a call;
- `api`: `POST /v1/changes` to a real `braze-subs api` process, 100 changes a request;
- `record_change`: the Celery task's body, one change a call (as `enqueue_change`).

Per way: Redis's CPU per change (INFO cpu, user + sys, of the redis-server process: what
the machine pays, parsing included), the scripts' time per change in INFO commandstats
(`eval` + `evalsha` usec; HSET's for `raw`) — commandstats counts wall time inside the
command, so a busy machine inflates it; the CPU figure is the steadier — and the wall
time of the way in (`import`: the ratio to `raw` in the same round). Each figure is the
median of the rounds with its spread (min-max).

`--occurred` gives the rows of `raw` and `import` an `occurred_at` each and a `source`
(what a producer's backfill carries; results in a file of their own).

`--callgrind` counts instead of timing: the redis-server runs under valgrind's callgrind,
its counters zeroed right before the way in starts and dumped when it ends, and the
figure is the instructions the server executed per change (`instructions_per_change`;
the scripts' compilation on their first call is included, ~1 % at 20,000 changes). The
count does not depend on the machine's other load, so one round tells: use it to see what
a change of the script costs, and the CPU figures for what the machine pays.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.trees import add_base_tree, remove_base_tree

ROOT = Path(__file__).resolve().parents[1]
OCCURRED = datetime(2026, 11, 28, 6, tzinfo=UTC)
BASE = "038db7a"  # main before the cheaper enqueue (issue 26)
WAYS = ("raw", "import", "enqueue_changes", "api", "record_change")
TOKEN = "bench-token-0123456789abcdef"


def rows(start: int, count: int, occurred: bool = False) -> list[dict[str, str]]:
    """The import_speed mix: a third each of external ids, emails and phones, 4 groups;
    with `occurred`, each with its own `occurred_at` (37 ms apart) and a `source`, as
    `bench.import_speed --occurred` writes them."""
    out = []
    for n in range(start, start + count):
        row = {"subscription_group_id": f"group-{n % 4}", "subscription_state": "subscribed"}
        if occurred:
            moment = OCCURRED + timedelta(milliseconds=37 * n)
            row["occurred_at"] = moment.isoformat(timespec="milliseconds")[:-6] + "Z"
            row["source"] = "backfill"
        kind = n % 3
        if kind == 0:
            row["external_id"] = f"user-{n}"
        elif kind == 1:
            row["email"] = f"user{n}@example{n % 50}.com"
        else:
            row["phone"] = f"+1415{2_000_000 + n % 8_000_000:07d}"
        out.append(row)
    return out


# --- the child: runs one way in with the tree on PYTHONPATH, prints its wall time ---------


def child(way: str, redis_url: str, count: int, path: Path, port: int) -> float:
    os.environ["REDIS_URL"] = redis_url
    from redis import Redis

    if way == "raw":
        client = Redis.from_url(redis_url)
        started = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        with open(path) as handle:
            for n, line in enumerate(handle, 1):
                row = json.loads(line)
                identifier = row.get("email") or row.get("phone") or row.get("external_id")
                pipe.hset("raw:pending", f"{row['subscription_group_id']}:{identifier}", line)
                if n % 1000 == 0:
                    pipe.execute()
        pipe.execute()
        return time.perf_counter() - started
    if way == "import":
        from stores.buffer import Buffer
        from stores.keys import Keys
        from tasks.bulk_import import enqueue_file

        started = time.perf_counter()
        result = enqueue_file(path, Buffer(Redis.from_url(redis_url), Keys("braze-subs")))
        assert result.enqueued == count, result
        return time.perf_counter() - started
    data = rows(50_000_000, count)
    if way == "enqueue_changes":
        from tasks.producer import enqueue_changes

        started = time.perf_counter()
        for start in range(0, count, 1000):
            enqueue_changes(data[start : start + 1000])
        return time.perf_counter() - started
    if way == "record_change":
        from tasks.subscriptions import record_change

        started = time.perf_counter()
        for row in data:
            record_change(**row)
        return time.perf_counter() - started
    if way == "api":
        import httpx

        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as http:
            started = time.perf_counter()
            for start in range(0, count, 100):
                answer = http.post("/v1/changes", json=data[start : start + 100])
                assert answer.status_code == 202, answer.text
            return time.perf_counter() - started
    raise ValueError(way)


# --- the parent ------------------------------------------------------------------------


def redis_cpu(client: Any) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def command_usec(client: Any, way: str) -> float:
    stats = client.info("commandstats")
    names = ("hset",) if way == "raw" else ("eval", "evalsha")
    return sum(float(stats.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in names)


def start_api(tree: Path, redis_url: str, workdir: Path) -> tuple[subprocess.Popen, int]:
    import httpx

    from devtools.processes import free_port

    port = free_port()
    environ = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "REDIS_URL": redis_url,
        "API_TOKENS": TOKEN,
        "PORT": str(port),
        "API_ADDRESS": "127.0.0.1",
        "API_WORKERS": "1",
        "LOG_FORMAT": "json",
    }
    log = (workdir / "api.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "api"], cwd=tree, env=environ, stdout=log, stderr=log
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the API did not start")


@contextlib.contextmanager
def callgrind_redis(workdir: Path) -> Iterator[tuple[str, Callable[[], None], Callable[[], int]]]:
    """A redis-server under callgrind: (its URL, zero the counters, dump and read the
    instructions since they were zeroed)."""
    from redis import Redis

    from devtools.processes import free_port, wait_until

    port = free_port()
    out = workdir / "callgrind.out"
    process = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--busy-reply-threshold",
            "600000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except Exception:
            return False

    def control(flag: str) -> None:
        subprocess.run(
            ["callgrind_control", flag, str(process.pid)], check=True, capture_output=True
        )

    def instructions() -> int:
        control("-d")
        dumps = sorted(workdir.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        for line in dumps[-1].read_text().splitlines():
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
        raise RuntimeError("no totals in the callgrind dump")

    try:
        wait_until(answers, timeout=120, what="redis-server under callgrind to start")
        yield url, lambda: control("-z"), instructions
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=60)


def run_way(
    tree: Path, way: str, count: int, path: Path, workdir: Path, callgrind: bool = False
) -> dict[str, float]:
    from redis import Redis

    from devtools.processes import local_redis

    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=workdir)))
        if callgrind:
            url, zero, instructions = stack.enter_context(callgrind_redis(scratch))
        else:
            url = stack.enter_context(local_redis(scratch))
        client = Redis.from_url(url)
        api, port = (None, 0)
        if way == "api":
            api, port = start_api(tree, url, workdir)
        try:
            client.config_resetstat()
            before = redis_cpu(client)
            if callgrind:
                zero()
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    way,
                    "--redis",
                    url,
                    "--rows",
                    str(count),
                    "--file",
                    str(path),
                    "--port",
                    str(port),
                ],
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if callgrind:
                counted = instructions()
            cpu = redis_cpu(client) - before
            usec = command_usec(client, way)
        finally:
            if api is not None:
                api.terminate()
                api.wait(timeout=30)
    if callgrind:
        return {"instructions_per_change": counted / count, "seconds": float(out.split()[-1])}
    return {
        "redis_cpu_us": cpu * 1e6 / count,
        "command_us": usec / count,
        "seconds": float(out.strip().splitlines()[-1]),
    }


def spread(values: list[float], digits: int = 2) -> str:
    return (
        f"{round(statistics.median(values), digits)} "
        f"({round(min(values), digits)}-{round(max(values), digits)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of raw and import")
    parser.add_argument("--calls", type=int, default=20_000, help="changes of the other ways")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument(
        "--callgrind", action="store_true", help="count the server's instructions instead"
    )
    parser.add_argument(
        "--occurred",
        action="store_true",
        help="raw and import rows with occurred_at and source (the other ways as ever)",
    )
    parser.add_argument("--child")
    parser.add_argument("--redis")
    parser.add_argument("--file", type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        print(child(args.child, args.redis, args.rows, args.file, args.port))
        return

    sys.path.insert(0, str(ROOT))
    from bench.figures import publish

    ways = args.ways.split(",")
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="braze-subs-enqueue-cost-") as tmp:
        work = Path(tmp)
        path = work / "changes.jsonl"
        with open(path, "w") as handle:
            for row in rows(0, args.rows, args.occurred):
                handle.write(json.dumps(row) + "\n")
        base_tree = work / "base"
        add_base_tree(base_tree, args.base)
        trees = {"new": ROOT, "base": base_tree}
        try:
            for round_ in range(args.rounds):
                for name, tree in trees.items():
                    for way in ways:
                        if way == "raw" and name == "base":
                            continue  # the same code in both trees: once a round
                        count = args.rows if way in ("raw", "import") else args.calls
                        figures = run_way(tree, way, count, path, work, args.callgrind)
                        results.setdefault(name, {}).setdefault(way, []).append(figures)
                        print(
                            f"round {round_ + 1} {name:4s} {way:15s} "
                            + " ".join(f"{k} {v:.2f}" for k, v in figures.items()),
                            file=sys.stderr,
                            flush=True,
                        )
        finally:
            remove_base_tree(base_tree)
    out: dict[str, Any] = {
        "rows": args.rows,
        "calls": args.calls,
        "rounds": args.rounds,
        "base": args.base,
        "occurred_at_and_source": args.occurred,
    }
    raw = results.get("new", {}).get("raw", [])
    for name in trees:
        for way, runs in results.get(name, {}).items():
            key = "raw" if way == "raw" else f"{name}.{way}"
            if args.callgrind:
                out[f"{key}.instructions_per_change"] = spread(
                    [r["instructions_per_change"] for r in runs], 0
                )
                continue
            out[f"{key}.redis_cpu_us_per_change"] = spread([r["redis_cpu_us"] for r in runs])
            out[f"{key}.command_us_per_change"] = spread([r["command_us"] for r in runs])
            out[f"{key}.seconds"] = spread([r["seconds"] for r in runs])
            if way == "import" and raw:
                ratios = [r0["seconds"] / r["seconds"] for r0, r in zip(raw, runs, strict=False)]
                out[f"{key}.ratio_to_raw"] = spread(ratios, 3)
    name = "enqueue-instructions" if args.callgrind else "enqueue-cost"
    publish(out, f"{name}{'-occurred' if args.occurred else ''}.json")


if __name__ == "__main__":
    main()
