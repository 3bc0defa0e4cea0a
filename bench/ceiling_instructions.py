"""Instructions a worker's cut and posts execute per 1,000 identifiers, and redis-server's
meanwhile (callgrind), this tree and a base side by side (issue 26).

    .venv/bin/python -m bench.ceiling_instructions             # base: bench.ceiling's
    .venv/bin/python -m bench.ceiling_instructions --base 46c0f36 --large 5000

Wall and CPU time on a machine shared by other work vary by a fifth from one drain to the
next (bench.ceiling); instruction counts do not. For each tree and each of two backlogs
(--small, --large unique identifiers, bench.drain's mix) this starts redis-server under
`valgrind --tool=callgrind`, the simulator in this process (not counted), and one Python
process under callgrind that enqueues the backlog, then, counted from there in both
processes (`callgrind_control -i on -z`), cuts it with the coalescer's tick and posts every
batch with the poster (v1, one thread: the work two workers share in a drain, without
Celery's messages), until the buffer is empty. The figure per 1,000 identifiers is the
difference between the two backlogs (what start-up and the first tick cost alike cancels
out). The tick is `Coalescer._tick` without its lock: under callgrind's slowdown a tick
outlives the lock's 3 s (one SET and one script a tick). A package this tree requires and
the base does not (hiredis) is hidden from the base, as in bench.ceiling. Writes
bench/results/ceiling-instructions.json.

With --redis-only the Python process runs as it is and redis-server alone is counted
(bench/results/ceiling-instructions-redis.json): under callgrind the Python process takes
minutes, and what Redis runs by the clock meanwhile (its cron, the poster's liveness
heartbeats) grows with that time and with the machine's load, so its count moved by 2-9 %
between runs of one tree; run as it is, the drain takes seconds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis import Redis

from bench.ceiling import BASE
from bench.figures import publish
from bench.trees import base_and_this, run_in_tree
from devtools.processes import free_port
from simulator import SimulatorConfig, SimulatorServer

# The counted process: enqueue, then (counted) cut and post until nothing is left.
HARNESS = """
import os, random, subprocess, sys
from config.settings import load_settings
import bench.drain as drain
from delivery.services import Services
pids = [int(os.environ["REDIS_PID"])]
if os.environ.get("REDIS_ONLY") != "1":
    pids.insert(0, os.getpid())
services = Services(load_settings(
    redis_url=os.environ["REDIS_URL"], braze_rest_endpoint=os.environ["SIM_URL"],
    braze_api_key="bench-key", braze_rate_limit=100000, braze_rate_limit_window_seconds=2))
services.buffer.enqueue(drain.backlog(int(os.environ["IDENTIFIERS"]), 4, random.Random(1)))
messages = []
coalescer = services.coalescer(messages.append, messages.extend)
poster = services.poster()
poster.liveness.ensure_started()
def control(*options):
    for pid in pids:
        subprocess.run(["callgrind_control", *options, str(pid)], check=True,
                       capture_output=True)
control("-i", "on")
control("-z")
while True:
    coalescer._tick()
    if not messages:
        break
    batches = list(messages)
    messages.clear()
    for batch_id in batches:
        poster.post(batch_id)
control("-d")
control("-i", "off")
"""


def instructions(out_file: Path) -> int:
    """The instructions in the dump `callgrind_control -d` wrote (FILE.1)."""
    for line in Path(f"{out_file}.1").read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {out_file}.1")


def measure(
    tree: Path, hidden: str, identifiers: int, workdir: Path, redis_only: bool = False
) -> dict[str, int]:
    """Instructions of the cut and posts of `identifiers` (Python process, redis-server;
    `redis_only`: redis-server's alone, the Python process not under callgrind)."""
    workdir.mkdir(parents=True)
    callgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    port = free_port()
    redis_out = workdir / "redis.out"
    redis_server = subprocess.Popen(
        [
            *callgrind,
            f"--callgrind-out-file={redis_out}",
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sim = SimulatorServer(
        SimulatorConfig(
            api_keys={"bench-key"}, auto_groups=True, rate_limit=100_000, window_seconds=2
        )
    )
    try:
        client = Redis(port=port)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server under callgrind did not start") from None
                time.sleep(0.2)
        sim.start()
        python_out = workdir / "python.out"
        counted = [] if redis_only else [*callgrind, f"--callgrind-out-file={python_out}"]
        done = run_in_tree(
            tree,
            [*counted, sys.executable, "-c", HARNESS],
            hidden,
            # Under callgrind a take of many batches outlasts redis-py's read timeout on a
            # loaded machine (both trees failed so): no timeout here.
            REDIS_URL=f"redis://127.0.0.1:{port}/0?socket_timeout=600",
            REDIS_PID=str(redis_server.pid),
            SIM_URL=sim.url,
            IDENTIFIERS=str(identifiers),
            REDIS_ONLY="1" if redis_only else "0",
        )
        if done.returncode != 0:
            raise SystemExit(f"the counted run in {tree} failed:\n{done.stderr[-2000:]}")
        if redis_only:
            return {"redis-server": instructions(redis_out)}
        return {"python": instructions(python_out), "redis-server": instructions(redis_out)}
    finally:
        sim.stop()
        redis_server.terminate()
        redis_server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=3000)
    parser.add_argument(
        "--redis-only",
        action="store_true",
        help="count redis-server alone, the Python process run as it is: its drain then "
        "takes seconds, not minutes, so what Redis runs by the clock (its cron, the "
        "liveness thread's heartbeats) stays out of the figure",
    )
    args = parser.parse_args()
    processes = ("redis-server",) if args.redis_only else ("python", "redis-server")
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install valgrind redis-server)")
    result: dict[str, Any] = {
        "base": args.base,
        "backlogs": f"{args.small}, {args.large}",
        "redis_only": args.redis_only,
    }
    with (
        tempfile.TemporaryDirectory(prefix="braze-subs-instructions-") as tmp,
        base_and_this(args.base, Path(tmp)) as trees,
    ):
        for name, (tree, hidden) in trees.items():
            counted = {
                n: measure(tree, hidden, n, Path(tmp) / f"{name}-{n}", args.redis_only)
                for n in (args.small, args.large)
            }
            for process in processes:
                per_thousand = (
                    (counted[args.large][process] - counted[args.small][process])
                    * 1000
                    / (args.large - args.small)
                )
                result[f"{name}.{process}_instructions_per_1000"] = round(per_thousand)
                print(
                    f"{name} {process}: {per_thousand / 1e6:,.1f} M instructions per "
                    "1,000 identifiers",
                    flush=True,
                )
    for process in processes:
        base = result[f"base.{process}_instructions_per_1000"]
        result[f"{process}_this_over_base"] = round(
            result[f"this.{process}_instructions_per_1000"] / base, 3
        )
    publish(
        result,
        "ceiling-instructions-redis.json" if args.redis_only else "ceiling-instructions.json",
    )


if __name__ == "__main__":
    main()
