"""How fast `braze-subs import` enqueues, against a raw redis-py pipeline writing the same rows.

    .venv/bin/python -m bench.import_speed --rows 200000 [--kinds phone] [--jobs N] [--repeat 3]

Both read the same JSON Lines file from disk into a private redis-server. The raw baseline
parses each line with json.loads and writes one HSET per row through a pipeline (1,000 rows
per round trip), with no validation, no normalisation and no ordering guarantees. braze-subs
validates every row (email-validator, phonenumbers), normalises, validates the whole file
before enqueuing anything, and enqueues through the Lua script; `--jobs` processes validate
(default: one per CPU, as `braze-subs import`; 1: the importing process alone). With
`--repeat`, both run that many times, alternating, and the best run of each counts (the
machine may be busy with other work). Prints rows/s of both, the ratio, the jobs used and
the peak Python memory of the importing process (worker processes are not traced).
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path
from tempfile import TemporaryDirectory

from redis import Redis

from bench.figures import publish
from devtools.processes import local_redis
from stores.buffer import Buffer
from stores.keys import Keys
from tasks.bulk_import import enqueue_file
from tasks.parallel import cpu_count


def write_rows(path: Path, rows: int, kinds: str) -> None:
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
            handle.write(json.dumps(row) + "\n")


def raw_pipeline(path: Path, client: Redis) -> float:
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    with open(path) as handle:
        for count, line in enumerate(handle, 1):
            row = json.loads(line)
            identifier = row.get("email") or row.get("phone") or row.get("external_id")
            pipe.hset("raw:pending", f"{row['subscription_group_id']}:{identifier}", line)
            if count % 1000 == 0:
                pipe.execute()
    pipe.execute()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--kinds", default="external_id,email,phone")
    parser.add_argument(
        "--jobs", type=int, default=None, help="validating processes (default: one per CPU)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best counts")
    args = parser.parse_args()
    raw = ours = float("inf")
    with TemporaryDirectory(prefix="braze-subs-import-") as tmp:
        workdir = Path(tmp)
        path = workdir / "changes.jsonl"
        write_rows(path, args.rows, args.kinds)
        with local_redis(workdir) as url:
            client = Redis.from_url(url)
            for _ in range(max(1, args.repeat)):
                client.flushall()
                raw = min(raw, raw_pipeline(path, client))
                client.flushall()
                started = time.perf_counter()
                result = enqueue_file(path, Buffer(client, Keys("braze-subs")), jobs=args.jobs)
                ours = min(ours, time.perf_counter() - started)
                assert result.enqueued == args.rows, result
            # Memory in a second, untimed run: tracemalloc slows Python several times over.
            client.flushall()
            tracemalloc.start()
            enqueue_file(path, Buffer(client, Keys("braze-subs")), jobs=args.jobs)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    figures = {
        "rows": args.rows,
        "kinds": args.kinds,
        "cpus": cpu_count(),
        "jobs": result.jobs,
        "repeat": max(1, args.repeat),
        "raw_rows_per_second": round(args.rows / raw),
        "import_rows_per_second": round(args.rows / ours),
        "ratio": round(raw / ours, 3),
        "import_peak_python_memory_mib": round(peak / 2**20, 2),
    }
    publish(figures, f"import-{args.kinds.replace(',', '-')}.json")


if __name__ == "__main__":
    main()
