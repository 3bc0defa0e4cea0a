"""Live and bulk lanes, end to end (issue 22): a live stream through the Python API while a
`braze-subs import` backfill drains at a scaled budget, with real worker and beat processes
at their default settings, against the simulator enforcing the same budget."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from delivery.services import services
from tasks.producer import enqueue_change
from tests.cli_runs import run_real
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, wait_for
from tests.import_files import write_rows
from tests.sim_control import faults, sim_stats

# alone: its figures (latency, shares of the budget, seconds to recover) are measured;
# under xdist nothing else runs meanwhile (tests/conftest.py, "Running in parallel").
pytestmark = [pytest.mark.slow, pytest.mark.alone]

# A scaled budget (the bench's): 60 requests per 2 s, ~1,500 identifiers a second.
LIMIT = 60
WINDOW = 2.0
BACKFILL = 45_000  # ~30 s of the budget: it outlasts the live stream
LIVE_RATE = 5.0  # changes a second
LIVE_COUNT = 100  # 20 s
LIVE_GROUP = "live-news"


def backfill_rows() -> list[dict[str, Any]]:
    return [
        {
            "subscription_group_id": f"bulk-{n % 4}",
            "subscription_state": "subscribed" if n % 2 else "unsubscribed",
            "external_id": f"user-{n}",
        }
        for n in range(BACKFILL)
    ]


def live_row(n: int) -> dict[str, Any]:
    if n % 5 == 4:
        # Every fifth flips an identifier the backfill holds near its end (pending, or in a
        # bulk batch in flight): the newer, live state must win and never be overtaken.
        k = BACKFILL - 1 - n
        return {
            "subscription_group_id": f"bulk-{k % 4}",
            "subscription_state": "unsubscribed" if k % 2 else "subscribed",
            "external_id": f"user-{k}",
        }
    return {
        "subscription_group_id": LIVE_GROUP,
        "subscription_state": "unsubscribed",
        "email": f"live-{n}@example.com",
    }


def test_a_live_stream_beside_a_backfill_at_default_settings(
    default_env, sim, processes, monkeypatch, tmp_path: Path
):
    budget = {"BRAZE_RATE_LIMIT": str(LIMIT), "BRAZE_RATE_LIMIT_WINDOW_SECONDS": str(WINDOW)}
    faults(sim, rate_limit=LIMIT, window_seconds=WINDOW)
    for name, value in budget.items():
        monkeypatch.setenv(name, value)
        default_env[name] = value
    for index in range(2):  # WORKER_CONCURRENCY's default
        processes.worker(f"w{index}", concurrency=16, extra_env=budget)
    processes.start("beat", "beat", extra_env=budget)

    sent = EnqueuedLog()
    rows = sent.add(backfill_rows())
    imported = run_real("import", str(write_rows(tmp_path / "backfill.jsonl", rows)))
    assert imported.returncode == 0, imported.stderr
    # The backfill is under way: batches cut, queued, turns reserved ahead.
    wait_for(
        lambda: sim_stats(sim)["requests_total"] >= 100,
        timeout=60,
        interval=0.2,
        what="the backfill to be under way",
    )

    enqueued: dict[str, float] = {}
    start = time.time()
    for n in range(LIVE_COUNT):
        pause = start + n / LIVE_RATE - time.time()
        if pause > 0:
            time.sleep(pause)  # the stream's own pace, not a wait for a condition
        row = live_row(n)
        enqueue_change(**sent.add([row])[0])
        if "email" in row:
            enqueued[row["email"]] = time.time()
    found = services()
    still = found.buffer.pending_count() + found.buffer.inflight_count()
    assert still > 1000, "the backfill must outlast the live stream"

    wait_for(drained, timeout=180, interval=0.5, what="the backfill to drain")
    applied = httpx.get(f"{sim.url}/_sim/applied", params={"group": LIVE_GROUP}).json()
    arrivals = {entry["value"]: entry["states"][0]["t"] for entry in applied["applied"]}
    latencies = sorted(arrivals[value] - t for value, t in enqueued.items())
    p50 = statistics.median(latencies)
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
    stats = sim_stats(sim, log=True)
    requests = stats["requests"]
    first, last = min(r["t"] for r in requests), max(r["t"] for r in requests)
    utilisation = len(requests) / ((last - first) / WINDOW * LIMIT)
    print(
        f"live latency p50 {p50:.2f} s, p99 {p99:.2f} s, max {latencies[-1]:.2f} s; "
        f"utilisation {utilisation:.3f} over {last - first:.1f} s; 429s "
        f"{stats['rate_limited_429']}"
    )
    # Goal (bench/lanes.py): p99 <= 2 s at >= 95 %. Generous for a loaded 2-core machine;
    # before lanes every live change waited behind the whole backfill (p50 ~ 20 s here).
    assert p99 <= 5.0, f"live p99 {p99:.2f} s"
    assert utilisation >= 0.8, f"the backfill used {utilisation:.2f} of the budget"
    assert_applied_in_order(sim.url, sent)
