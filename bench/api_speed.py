"""Changes per second through the HTTP API, beside the Python API and `import`, one run.

    .venv/bin/python -m bench.api_speed [--seconds 8] [--connections 16] [--api-workers 1,2]

Everything on this machine at once (the figures are for a 2-core machine running Redis,
the API's processes and the load generator together): a private redis-server, a real
`braze-subs api` process (`python -m worker api`, access lines at INFO into a file, as
run by default), and a load generator in its own process holding `--connections`
keep-alive connections, each sending its next request as soon as the previous is answered.
Every change is a distinct email (phones and external ids validate at other costs, see
`bench/import_speed.py`), so the buffer grows as in a real backlog. No worker runs: this
measures the way in, not delivery.

Cases: 1, 100 and 1,000 changes per request through the API; `enqueue_change` one at a
time and `enqueue_changes` 1,000 at a time in this process (the Python API); and
`braze-subs import` of a JSON Lines file (`enqueue_file`). Also the import time and the
modules loaded by `import tasks.producer` and, for comparison, by `delivery.services`
(what the producer loaded before it was slimmed). One workspace's budget, for scale, is
5,000 requests a minute of 50 identifiers: 4,167 changes a second.

The load generator speaks HTTP/1.1 over asyncio streams itself: httpx's per-request cost
(~0.3 ms) would measure the client rather than the API, and no wrk/ab is assumed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
from redis import Redis

from bench.figures import publish
from devtools.processes import free_port, local_redis

TOKEN = "bench-token-0123456789abcdef"
BUDGET_CHANGES_PER_SECOND = round(5000 * 50 / 60)
ROOT = Path(__file__).resolve().parents[1]


def rows(start: int, count: int) -> list[dict[str, str]]:
    return [
        {
            "subscription_group_id": f"group-{n % 4}",
            "subscription_state": "subscribed" if n % 3 else "unsubscribed",
            "email": f"user{n}@example{n % 50}.com",
        }
        for n in range(start, start + count)
    ]


def request_bytes(port: int, body: bytes) -> bytes:
    return (
        f"POST /v1/changes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _connection(
    port: int, per_request: int, offset: int, stride: int, deadline: float, counts: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = offset
    try:
        while time.perf_counter() < deadline:
            body = json.dumps(rows(n * per_request, per_request)).encode()
            n += stride
            writer.write(request_bytes(port, body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            answer = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 202"):
                raise RuntimeError(f"{head[:40]!r} {answer[:200]!r}")
            counts[0] += 1
    finally:
        writer.close()


def _load(port: int, per_request: int, connections: int, seconds: float, out: object) -> None:
    counts = [0]

    async def run() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(
            *(
                _connection(port, per_request, i, connections, deadline, counts)
                for i in range(connections)
            )
        )

    started = time.perf_counter()
    asyncio.run(run())
    out.put((counts[0], time.perf_counter() - started))  # type: ignore[attr-defined]


def through_api(port: int, per_request: int, connections: int, seconds: float) -> dict[str, float]:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(
        target=_load, args=(port, per_request, connections, seconds, queue)
    )
    process.start()
    requests, elapsed = queue.get(timeout=seconds + 120)
    process.join()
    return {
        "requests_per_second": round(requests / elapsed),
        "changes_per_second": round(requests * per_request / elapsed),
    }


def start_api(redis_url: str, workers: int, workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    environ = {
        **os.environ,
        "REDIS_URL": redis_url,
        "API_TOKENS": TOKEN,
        "PORT": str(port),
        "API_ADDRESS": "127.0.0.1",
        "API_WORKERS": str(workers),
        "LOG_FORMAT": "json",
    }
    log = (workdir / f"api-{workers}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "api"], cwd=ROOT, env=environ, stdout=log, stderr=log
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, port
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the API did not start")


def python_api(redis_url: str, count: int, per_call: int) -> float:
    os.environ["REDIS_URL"] = redis_url
    from delivery.services import reset_services
    from tasks.producer import enqueue_change, enqueue_changes

    reset_services()
    data = rows(10_000_000, count)
    started = time.perf_counter()
    if per_call == 1:
        for row in data:
            enqueue_change(**row)
    else:
        for start in range(0, count, per_call):
            enqueue_changes(data[start : start + per_call])
    return round(count / (time.perf_counter() - started))


def import_file(redis_url: str, count: int, workdir: Path) -> float:
    from stores.buffer import Buffer
    from stores.keys import Keys
    from tasks.bulk_import import enqueue_file

    path = workdir / "changes.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows(20_000_000, count)))
    started = time.perf_counter()
    result = enqueue_file(path, Buffer(Redis.from_url(redis_url), Keys("braze-subs")))
    assert result.enqueued == count, result
    return round(count / (time.perf_counter() - started))


def import_cost(module: str) -> dict[str, float]:
    probe = (
        "import sys, time; t = time.perf_counter(); import " + module + "; "
        "print(round((time.perf_counter() - t) * 1000), len(sys.modules))"
    )
    best = None
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, check=True
        ).stdout.split()
        best = out if best is None or int(out[0]) < int(best[0]) else best
    assert best is not None
    return {"ms": int(best[0]), "modules": int(best[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--api-workers", default="1,2")
    parser.add_argument("--sizes", default="1,100,1000", help="changes per request")
    parser.add_argument("--api-only", action="store_true", help="skip the other ways in")
    args = parser.parse_args()
    figures: dict[str, object] = {
        "cpus": os.cpu_count(),
        "connections": args.connections,
        "seconds_per_case": args.seconds,
        "budget_changes_per_second": BUDGET_CHANGES_PER_SECOND,
    }
    with TemporaryDirectory(prefix="braze-subs-api-") as tmp:
        workdir = Path(tmp)
        with local_redis(workdir) as url:
            client = Redis.from_url(url)
            for workers in [int(w) for w in args.api_workers.split(",")]:
                process, port = start_api(url, workers, workdir)
                try:
                    for per_request in [int(n) for n in args.sizes.split(",")]:
                        client.flushall()
                        found = through_api(port, per_request, args.connections, args.seconds)
                        key = f"api_{workers}proc_{per_request}_per_request"
                        figures[f"{key}_changes_per_second"] = found["changes_per_second"]
                        figures[f"{key}_requests_per_second"] = found["requests_per_second"]
                        print(key, found, flush=True)
                finally:
                    process.terminate()
                    process.wait(timeout=30)
            if args.api_only:
                return
            client.flushall()
            figures["python_enqueue_change_per_second"] = python_api(url, 20_000, 1)
            client.flushall()
            figures["python_enqueue_changes_1000_per_second"] = python_api(url, 200_000, 1000)
            client.flushall()
            figures["import_changes_per_second"] = import_file(url, 200_000, workdir)
    for module in ("tasks.producer", "delivery.services", "api.app"):
        cost = import_cost(module)
        figures[f"import_{module}_ms"] = cost["ms"]
        figures[f"import_{module}_modules"] = cost["modules"]
    publish(figures, "api_speed.json")


if __name__ == "__main__":
    main()
