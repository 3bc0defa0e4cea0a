"""A v1 post's HTTP exchange, a worker's CPU, this tree's Braze client and a base's side by
side in one process (issue 26, the eighth step, the workers).

    .venv/bin/python -m bench.exchange_cpu --base main
    .venv/bin/python -m bench.exchange_cpu --base main --posts 2000 --rounds 8

bench.post_cpu gives the exchange among a post's steps, each tree in a process of its own
with Redis's calls around it; the exchange alone moves less than the load there. Here the
base's `delivery/braze_client.py` (`git show BASE:...`, loaded as a module beside this
tree's, the rest of the code this tree's) and this tree's each post --posts v1 bodies of 50
identifiers with a fence that answers yes, to the simulator in a process of its own (no
rate limit), in turns, the order swapped every round; each turn's thread CPU (user and
system, `getrusage(RUSAGE_THREAD)`) a post. Both clients' first answers are checked equal
(status, body, header names). Writes bench/results/exchange-cpu.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import SecretStr

from bench.figures import publish
from core.changes import IdentifierKind, SubscriptionState
from core.planning import BatchKey
from delivery import braze_client

ROOT = Path(__file__).resolve().parent.parent
SIM = (
    "from simulator import SimulatorConfig, SimulatorServer\n"
    "import sys\n"
    "s = SimulatorServer(SimulatorConfig(api_keys={'bench-key'}, auto_groups=True,"
    " rate_limit=10**9, window_seconds=2))\n"
    "s.start(); print(s.url, flush=True); sys.stdin.read()\n"
)
KEY = BatchKey("g1", SubscriptionState.SUBSCRIBED, IdentifierKind.EXTERNAL_ID, False)


def base_module(base: str, folder: Path) -> ModuleType:
    """The base's braze_client.py, loaded under a name of its own."""
    source = subprocess.run(
        ["git", "show", f"{base}:delivery/braze_client.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "braze_client_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("braze_client_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["braze_client_base"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main")
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    sim = subprocess.Popen(
        [sys.executable, "-c", SIM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert sim.stdout is not None
        url = sim.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as folder:
            base = base_module(args.base, Path(folder))
        clients: dict[str, Any] = {
            "base": base.BrazeClient(url, SecretStr("bench-key"), timeout_seconds=10),
            "this": braze_client.BrazeClient(url, SecretStr("bench-key"), timeout_seconds=10),
        }
        first = {}
        for name, client in clients.items():
            reply = client.post(braze_client.V1_PATH, braze_client.v1_body(KEY, ["w"]))
            first[name] = (reply.status, reply.body, sorted(reply.headers))
        assert first["base"] == first["this"], first
        spent: dict[str, list[float]] = {name: [] for name in clients}
        sent = 0
        for round_ in range(args.rounds):
            for name in ("base", "this") if round_ % 2 == 0 else ("this", "base"):
                client = clients[name]
                started = thread_cpu()
                for _ in range(args.posts):
                    sent += 1
                    body = braze_client.v1_body(KEY, [f"u{sent}-{i}" for i in range(50)])
                    reply = client.post(braze_client.V1_PATH, body, fence=lambda: True)
                    assert reply.status == 201, reply
                per_post = (thread_cpu() - started) / args.posts * 1e6
                spent[name].append(round(per_post))
                print(f"round {round_ + 1} {name}: {per_post:,.0f} us a post", flush=True)
    finally:
        if sim.stdin is not None:
            sim.stdin.close()
        sim.wait()
    result: dict[str, Any] = {
        "base": args.base,
        "posts": args.posts,
        "rounds": args.rounds,
        "load_average": round(os.getloadavg()[0], 1),
    }
    for name, values in spent.items():
        result[f"{name}.exchange_us_a_post"] = values
        result[f"{name}.exchange_us_a_post.median"] = statistics.median(values)
    publish(result, "exchange-cpu.json")


if __name__ == "__main__":
    main()
