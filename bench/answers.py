"""One exchange with Braze under slow and huge answers, and its cost on ordinary ones
(issue 21 item 5).

    .venv/bin/python -m bench.answers [--before DIR] [--requests 500]

Against the simulator (in this process, over real HTTP), each in a fresh process with the
checkout's own `BrazeClient` (HTTP_TIMEOUT_SECONDS 1 s for the slow answers, 10 s else):

- `trickle`: Braze's answer, its body sent one byte every 0.2 s (about 4 s in all): how
  long the exchange held the thread;
- `huge`: a 500 with a 30 MB body: how long, and the process's peak resident memory;
- `ordinary`: `--requests` ordinary 201s one after another: the median time per exchange
  (what the overall deadline and the streamed, capped read cost).

`--before DIR` runs the same with another checkout (e.g. `git archive <commit> | tar -x -C
DIR`) with this Python, so the figures before and after come from one run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import httpx

from bench.figures import publish
from simulator import SimulatorConfig, SimulatorServer

KEY = "bench-key"

MEASURE = """
import resource, statistics, sys, time
from pydantic import SecretStr
from delivery.braze_client import BrazeClient
url, what, timeout, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
client = BrazeClient(url, SecretStr(sys.argv[5]), timeout_seconds=timeout)
body = {"subscription_group_id": "news", "subscription_state": "subscribed",
        "email": ["someone@example.com"]}
timings = []
for _ in range(count):
    started = time.perf_counter()
    reply = client.post("/subscription/status/set", body)
    timings.append(time.perf_counter() - started)
client.close()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(peak, reply.status, round(statistics.median(timings) * 1000, 2), len(reply.body))
"""

CASES = {
    # name: (faults, HTTP timeout, requests)
    "trickle": ({"answer": "trickle", "trickle_ms": 200}, 1.0, 1),
    "huge": ({"answer": "huge", "huge_bytes": 30 * 1024 * 1024}, 10.0, 1),
    "ordinary": ({}, 10.0, 0),
}


def measure(code: Path, url: str, timeout: float, count: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, url, "x", str(timeout), str(count), KEY],
        cwd=code,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout to measure too")
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    codes = {"after": Path(__file__).resolve().parent.parent}
    if args.before is not None:
        codes = {"before": args.before.resolve(), **codes}
    figures: dict[str, object] = {}
    config = SimulatorConfig(api_keys={KEY}, auto_groups=True, rate_limit=1_000_000)
    with SimulatorServer(config) as sim:
        for name, (faults, timeout, count) in CASES.items():
            for label, code in codes.items():
                httpx.post(f"{sim.url}/_sim/reset").raise_for_status()
                if faults:
                    httpx.post(f"{sim.url}/_sim/faults", json=faults).raise_for_status()
                peak, status, median_ms, body = measure(
                    code, sim.url, timeout, count or args.requests
                )
                key = f"{label}: {name}"
                if name == "ordinary":
                    figures[f"{key}: ms per exchange (median of {args.requests})"] = float(
                        median_ms
                    )
                else:
                    figures[f"{key}: seconds"] = round(float(median_ms) / 1000, 2)
                    figures[f"{key}: status"] = status
                if name == "huge":
                    figures[f"{key}: peak MiB"] = int(peak)
                    figures[f"{key}: body characters kept"] = int(body)
                print(f"  {key} done", file=sys.stderr)
    publish(figures, "answers.json")


if __name__ == "__main__":
    main()
