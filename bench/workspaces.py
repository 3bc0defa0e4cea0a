"""Two Braze workspaces from one fleet of workers (issue 23): each at its full scaled budget,
and one in a long outage (or refusing its key) while the other drains.

    .venv/bin/python -m bench.workspaces
    .venv/bin/python -m bench.workspaces --identifiers 20000 --scenarios both,us_outage

Starts a private redis-server, two simulators (the workspaces `us` and `eu` of one
BRAZE_WORKSPACES_FILE: each its own key and its own fixed windows of LIMIT requests per
WINDOW seconds, the file giving each workspace that budget), one fleet of WORKERS worker
processes and beat at their default settings (real processes, as in the Procfile) serving
both, and enqueues through `tasks.producer.enqueue_changes` (which routes each change by its
group) IDENTIFIERS unique identifiers per workspace. Each scenario runs on a fresh Redis,
fresh simulator states and a fresh fleet:

- `us_alone`: us alone has a backlog (the fleet's pace with one workspace, for comparison).
- `both`: both workspaces drain together.
- `us_outage`: us answers 503 to every post (the simulator's `outage` fault) all along,
  while eu drains.
- `us_refused_key`: us refuses the key (401: the simulator's `api_keys` fault) all along,
  while eu drains.

Per workspace that drained: its utilisation of its own budget (requests counted in its
windows / what its limit allowed from its first request to its last), its 429s, its rate
(requests a second), the requests in each of its fixed windows and their mean between the
first and the last (`steady_utilisation`: the drain fills those two only in part), and its
drain against the ideal (identifiers / 50 / LIMIT windows);
for the workspace in trouble, its refused requests and that its changes all still wait
(pending + in flight = its backlog, nothing dead-lettered). Writes
bench/results/workspaces.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
from redis import Redis

from admin.status import read_status
from bench.figures import publish
from devtools.processes import ProcessGroup, local_redis
from simulator import SimulatorConfig, SimulatorServer
from stores.keys import Keys

WORKSPACES = ("us", "eu")
KEYS = {"us": "bench-key-us", "eu": "bench-key-eu"}
PREFIX = "braze-subs"
SCENARIOS = ("us_alone", "both", "us_outage", "us_refused_key")


def groups(workspace: str) -> tuple[str, str]:
    return f"{workspace}-email", f"{workspace}-sms"


def rows(workspace: str, identifiers: int) -> list[dict[str, Any]]:
    """Unique identifiers of the three kinds in the workspace's two groups (emails in the
    email group, phones in the SMS one, external ids in either)."""
    email_group, sms_group = groups(workspace)
    offset = 2_000_000 if workspace == "us" else 3_000_000  # valid NANP numbers
    found = []
    for n in range(identifiers):
        kind = n % 3
        if kind == 0:
            group, field, value = email_group, "email", f"{workspace}{n}@example.com"
        elif kind == 1:
            group, field, value = sms_group, "phone", f"+1415{offset + n:07d}"
        else:
            group, field, value = (email_group, sms_group)[n % 2], "external_id", f"{workspace}-{n}"
        state = ("subscribed", "unsubscribed")[n % 2]
        found.append({"subscription_group_id": group, "subscription_state": state, field: value})
    return found


def workspaces_file(
    path: Path, sims: dict[str, SimulatorServer], limit: int, window: float
) -> None:
    tables = [
        f"[workspaces.{name}]\n"
        f'rest_endpoint = "{sims[name].url}"\n'
        f'api_key_env = "BRAZE_KEY_{name.upper()}"\n'
        f"groups = {json.dumps(list(groups(name)))}\n"
        f"rate_limit = {limit}\n"
        f"rate_limit_window_seconds = {window}\n"
        for name in WORKSPACES
    ]
    path.write_text("\n".join(tables))


def waiting(client: Redis, workspace: str) -> int:
    """Changes of the workspace not yet acknowledged by Braze (pending + in flight)."""
    status = read_status(client, Keys(PREFIX, workspace))
    return status.pending + status.in_flight


def figures(stats: dict[str, Any], limit: int, window: float, identifiers: int) -> dict[str, Any]:
    """A drained workspace's figures from its simulator's request log."""
    counted = [r for r in stats["requests"] if r["status"] not in (401, 429, 503)]
    ok = [r for r in counted if r["status"] in (201, 202)]
    first, last = min(r["t"] for r in counted), max(r["t"] for r in counted)
    drain = last - first
    allowed = drain / window * limit
    ideal = identifiers / 50 / limit * window
    # Requests in each fixed window (Braze's) from the first to the last; the steady figure
    # leaves out the first and last, which the drain fills only in part.
    per_window = Counter(math.floor(r["t"] / window) for r in counted)
    windows = [per_window[i] for i in range(min(per_window), max(per_window) + 1)]
    inner = windows[1:-1]
    return {
        "requests": len(counted),
        "requests_ok": len(ok),
        "identifiers_delivered": sum(r["identifiers"] for r in ok),
        "status_429": stats["rate_limited_429"],
        "utilisation": round(len(counted) / allowed, 4) if allowed else None,
        "steady_utilisation": round(sum(inner) / (len(inner) * limit), 4) if inner else None,
        "requests_per_window": windows,
        "rate_per_second": round(len(counted) / drain, 2) if drain else None,
        "budget_per_second": round(limit / window, 2),
        "fixed_window_max": stats["max_requests_in_window"],
        "drain_seconds": round(drain, 2),
        "ideal_seconds": round(ideal, 2),
        "drain_vs_ideal": round(drain / ideal, 3),
    }


def run(
    scenario: str, args: argparse.Namespace, sims: dict[str, SimulatorServer]
) -> dict[str, Any]:
    # Local import: the producer reads the settings this function has just set.
    from delivery.services import reset_services
    from tasks.producer import enqueue_changes

    troubled = "us" if scenario in ("us_outage", "us_refused_key") else None
    loaded = ["us"] if scenario == "us_alone" else list(WORKSPACES)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-")))
        redis_url = stack.enter_context(local_redis(workdir))
        for name, sim in sims.items():
            httpx.post(f"{sim.url}/_sim/reset").raise_for_status()
            switches: dict[str, Any] = {"rate_limit": args.limit, "window_seconds": args.window}
            if name == troubled and scenario == "us_outage":
                switches["outage"] = True
            if name == troubled and scenario == "us_refused_key":
                switches["api_keys"] = ["not-the-fleets-key"]
            httpx.post(f"{sim.url}/_sim/faults", json=switches).raise_for_status()
        path = workdir / "workspaces.toml"
        workspaces_file(path, sims, args.limit, args.window)
        env = {
            "REDIS_URL": redis_url,
            "BRAZE_WORKSPACES_FILE": str(path),
            "BRAZE_KEY_US": KEYS["us"],
            "BRAZE_KEY_EU": KEYS["eu"],
            "LOG_LEVEL": "WARNING",
        }
        os.environ.update(env)
        for name in ("BRAZE_API_KEY", "BRAZE_REST_ENDPOINT", "BROKER_URL"):
            os.environ.pop(name, None)
        reset_services()
        client = Redis.from_url(redis_url)
        enqueued = time.time()
        for name in loaded:
            enqueue_changes(rows(name, args.identifiers))
        enqueue_seconds = time.time() - enqueued

        fleet = stack.enter_context(ProcessGroup(workdir, dict(os.environ)))
        workers = [fleet.worker(f"w{index}") for index in range(args.workers)]
        fleet.beat("beat")
        fleet.wait_ready(workers)
        drained = [name for name in loaded if name != troubled]
        deadline = time.time() + args.timeout
        while any(waiting(client, name) for name in drained):
            if time.time() > deadline:
                left = {name: waiting(client, name) for name in WORKSPACES}
                raise SystemExit(f"{scenario}: did not drain within {args.timeout}s: {left}")
            time.sleep(0.2)
        stats = {
            name: httpx.get(f"{sim.url}/_sim/stats", timeout=60).json()
            for name, sim in sims.items()
        }
        still_waiting = {name: waiting(client, name) for name in WORKSPACES}
        dead = {name: read_status(client, Keys(PREFIX, name)).dead_letter for name in WORKSPACES}
        reset_services()

    result: dict[str, Any] = {"scenario": scenario, "enqueue_seconds": round(enqueue_seconds, 2)}
    for name in loaded:
        if name in drained:
            result[name] = figures(stats[name], args.limit, args.window, args.identifiers)
        else:
            result[name] = {
                "status_503": stats[name]["server_errors"],
                "status_401": stats[name]["unauthorized"],
                "requests_ok": stats[name]["requests_ok"],
                "still_waiting": still_waiting[name],
                "backlog": args.identifiers,
                "dead_letter": dead[name],
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identifiers", type=int, default=40_000, help="per workspace")
    parser.add_argument("--limit", type=int, default=40, help="requests per window, each")
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default threads)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    chosen = args.scenarios.split(",")
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        raise SystemExit(f"--scenarios: unknown {unknown[0]!r} ({', '.join(SCENARIOS)})")
    load = os.getloadavg()[0]
    results: dict[str, Any] = {
        "limit": args.limit,
        "window_seconds": args.window,
        "identifiers_per_workspace": args.identifiers,
        "workers": args.workers,
    }
    with ExitStack() as stack:
        sims = {}
        for name in WORKSPACES:
            config = SimulatorConfig(api_keys={KEYS[name]}, auto_groups=True)
            sims[name] = stack.enter_context(SimulatorServer(config))
        for scenario in chosen:
            results[scenario] = run(scenario, args, sims)
            print(json.dumps(results[scenario], indent=2), flush=True)
    results["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    if "both" in results:
        base = results["both"]["eu"]["rate_per_second"]
        for scenario in ("us_outage", "us_refused_key"):
            if scenario in results:
                rate = results[scenario]["eu"]["rate_per_second"]
                results[f"eu_rate_{scenario}_vs_both"] = round(rate / base, 3)
    publish(results, "workspaces.json")


if __name__ == "__main__":
    main()
