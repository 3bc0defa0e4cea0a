"""How fast `braze-subs verify` reads Braze back, and how much memory it needs for a big file.

    .venv/bin/python -m bench.verify_speed [--rows 200000] [--big-rows 2000000]

Runs `braze-subs verify FILE` as an operator does (a subprocess), against a private
redis-server and the simulator (a subprocess too), on JSON Lines files of external ids,
emails and phones over 4 groups each; half of the identifiers are set in the simulator first,
so the answers hold both states and `unknown`. The simulator adds `--latency-ms` (100) to
every answer, as Braze's round trip would. Three runs:

1. `unbounded`: the read budget raised out of the way (BRAZE_READ_RATE_LIMIT=100,000,000):
   what one verify process does by itself, validation, spooling and reads included.
2. `budget`: Braze's default read budget (250,000 an hour) as it stands after its burst
   has been spent: the rate a long verify settles at. The burst (1 % of the limit, 2,500
   calls) is spent first by reading a throw-away group, so the timed run sees the
   steady rate only.
3. `memory`: the unbounded run on `--big-rows` rows: the peak resident memory of the
   verify process (getrusage), against that of run 1, shows whether memory grows with
   the file.

Prints identifiers per second, read calls, seconds and peak RSS per run, the spool's size
on disk per row, and writes
bench/results/verify.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

from bench.figures import RESULTS
from devtools.processes import ROOT, free_port, local_redis, wait_until

KEY = "bench-key"
GROUPS = 4


def identifier(n: int) -> tuple[str, str]:
    kind = ("external_id", "email", "phone")[n % 3]
    if kind == "email":
        return kind, f"user{n}@example{n % 50}.com"
    if kind == "phone":
        return kind, f"+1415{2_000_000 + n:07d}"
    return kind, f"user-{n}"


def group_of(n: int, kind: str) -> str:
    # Email and SMS groups apart: a group learns its channel from its first identifier.
    return f"{kind}-group-{n % GROUPS}"


def write_rows(path: Path, rows: int) -> None:
    with open(path, "w") as handle:
        for n in range(rows):
            kind, value = identifier(n)
            state = "subscribed" if n % 4 else "unsubscribed"
            row = {"subscription_group_id": group_of(n, kind), "subscription_state": state}
            row[kind] = value
            handle.write(json.dumps(row) + "\n")


def seed_simulator(url: str, rows: int) -> None:
    """Set every other identifier in Braze (all subscribed): matches, drift and unknowns."""
    batches: dict[tuple[str, str], list[str]] = {}
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        for n in range(0, rows, 2):
            kind, value = identifier(n)
            group = group_of(n, kind)
            found = batches.setdefault((group, kind), [])
            found.append(value)
            if len(found) == 50:
                post(client, url, group, kind, found)
                found.clear()
        for (group, kind), values in batches.items():
            if values:
                post(client, url, group, kind, values)


def post(client: httpx.Client, url: str, group: str, kind: str, values: list[str]) -> None:
    body = {"subscription_group_id": group, "subscription_state": "subscribed", kind: values}
    client.post(f"{url}/subscription/status/set", json=body).raise_for_status()


def start_simulator(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "simulate",
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--rate-limit",
            "100000000",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/_sim/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=30, what="the simulator")
    return process


def run_verify(path: Path, env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "verify", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    summary = re.search(r"checked ([\d,]+):.*?([\d,]+) read calls", stderr)
    if process.returncode not in (0, 1) or summary is None:
        raise RuntimeError(f"verify failed ({process.returncode}): {stderr[-2000:]}")
    checked = int(summary.group(1).replace(",", ""))
    calls = int(summary.group(2).replace(",", ""))
    return {
        "identifiers": checked,
        "read_calls": calls,
        "seconds": round(seconds, 2),
        "identifiers_per_second": round(checked / seconds),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
    }


def spend_burst(env: dict[str, str]) -> None:
    """Spend the read budget's burst, as a verify running for a while already has."""
    code = (
        "from delivery.services import services\n"
        "limiter = services().read_limiter\n"
        "burst = limiter.budget.burst\n"
        "granted = 0\n"
        "while granted < burst:\n"
        "    grant = limiter.acquire()\n"
        "    if not grant.granted or grant.wait_seconds > 0: break\n"
        "    granted += 1\n"
        "print(granted)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def spool_bytes_per_row(path: Path) -> float:
    """Disk the spool takes per distinct identifier (pass 1 alone: nothing is read)."""
    from admin.verify import Verification

    run = Verification(None, None, None)  # type: ignore[arg-type]
    try:
        rows = run.load(path)
        return round((Path(run._dir.name) / "spool.sqlite3").stat().st_size / rows, 1)
    finally:
        run.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--budget-rows", type=int, default=200_000)
    parser.add_argument("--big-rows", type=int, default=2_000_000)
    parser.add_argument(
        "--latency-ms", type=float, default=100.0, help="the simulator's added latency per answer"
    )
    args = parser.parse_args()
    figures: dict[str, object] = {"latency_ms": args.latency_ms}
    with TemporaryDirectory(prefix="braze-subs-verify-") as tmp, local_redis(Path(tmp)) as url:
        workdir = Path(tmp)
        port = free_port()
        simulator = start_simulator(port)
        try:
            sim_url = f"http://127.0.0.1:{port}"
            seed_simulator(sim_url, max(args.rows, args.budget_rows))
            # Latency from here on (the seeding above is not what is measured).
            faults = {"latency_ms": args.latency_ms}
            httpx.post(f"{sim_url}/_sim/faults", json=faults).raise_for_status()
            env = {
                **os.environ,
                "REDIS_URL": url,
                "BRAZE_REST_ENDPOINT": sim_url,
                "BRAZE_API_KEY": KEY,
                "BRAZE_READ_RATE_LIMIT": "100000000",
            }
            small = workdir / "small.jsonl"
            write_rows(small, args.rows)
            figures["spool_bytes_per_row"] = spool_bytes_per_row(small)
            figures["unbounded"] = {"rows": args.rows, **run_verify(small, env)}
            print("unbounded", figures["unbounded"], flush=True)

            budget_env = {**env, "BRAZE_READ_RATE_LIMIT": "250000"}
            medium = workdir / "budget.jsonl"
            write_rows(medium, args.budget_rows)
            spend_burst(budget_env)
            figures["budget"] = {"rows": args.budget_rows, **run_verify(medium, budget_env)}
            print("budget", figures["budget"], flush=True)

            big = workdir / "big.jsonl"
            write_rows(big, args.big_rows)
            figures["memory"] = {"rows": args.big_rows, **run_verify(big, env)}
            print("memory", figures["memory"], flush=True)
        finally:
            simulator.terminate()
            simulator.wait(timeout=10)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verify.json").write_text(json.dumps(figures, indent=2) + "\n")
    for name, values in figures.items():
        print(f"{name:<10}{json.dumps(values)}")


if __name__ == "__main__":
    main()
