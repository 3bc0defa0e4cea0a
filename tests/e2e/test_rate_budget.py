"""One rate budget for the fleet, end to end: real worker processes (v1 and v2) against the
simulator enforcing fixed windows of a scaled-down limit."""

from __future__ import annotations

import math
import threading
from typing import Any

import httpx
import pytest

from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, wait_for
from tests.sim_control import sim_states, sim_stats

# alone: its figures (latency, shares of the budget, seconds to recover) are measured;
# under xdist nothing else runs meanwhile (tests/conftest.py, "Running in parallel").
pytestmark = [pytest.mark.slow, pytest.mark.alone]

LIMIT = 40
WINDOW = 2.0


def budget_env() -> dict[str, str]:
    return {
        "BRAZE_RATE_LIMIT": str(LIMIT),
        "BRAZE_RATE_LIMIT_WINDOW_SECONDS": str(WINDOW),
        "BATCH_LINGER_SECONDS": "0",
    }


def set_sim_limit(url: str) -> None:
    httpx.post(
        f"{url}/_sim/faults", json={"rate_limit": LIMIT, "window_seconds": WINDOW}
    ).raise_for_status()


def start_fleet(processes: Any, env: dict[str, str], versions: list[str]) -> None:
    extra = budget_env()
    for name, value in extra.items():
        env[name] = value
    for index, version in enumerate(versions):
        processes.worker(
            f"w{index}-{version}",
            concurrency=8,
            extra_env={**extra, "BRAZE_API_VERSION": version},
        )
    processes.start("beat", "beat", extra_env=extra)


def test_v1_and_v2_workers_share_one_budget(env, sim, processes, monkeypatch):
    set_sim_limit(sim.url)
    for name, value in budget_env().items():
        monkeypatch.setenv(name, value)
    rows = [
        {
            "subscription_group_id": f"group-{n % 3}",
            "subscription_state": "unsubscribed",
            "external_id": f"user-{n}",
        }
        for n in range(6000)
    ]
    sent = EnqueuedLog()
    enqueue_changes(sent.add(rows))
    start_fleet(processes, env, ["v1", "v2"])

    wait_for(drained, timeout=60, interval=0.2, what="the backlog to drain")
    result = sim_stats(sim, log=True)
    ok = [r for r in result["requests"] if r["status"] == 201]
    assert {r["endpoint"] for r in ok} == {"v1", "v2"}, "both workers posted"
    assert result["rate_limited_429"] == 0
    assert result["malformed"] == 0
    assert result["max_requests_in_window"] <= LIMIT  # the windows Braze counts
    # Any sliding window, on the simulator's arrival clock: the limiter spaces grants so
    # no window holds more than LIMIT (tests/integration/test_limiter.py checks grant times
    # exactly), but on 2 shared cores arrivals bunch by up to ~0.2 s, so one request may
    # land early into the next sliding window (41 of 40 seen once in a full run).
    assert result["max_requests_in_sliding_window"] <= LIMIT + 1
    assert sum(r["identifiers"] for r in ok) == 6000
    assert len(sim_states(sim)) == 6000
    assert_applied_in_order(sim.url, sent, allow_repeats=False)


def test_a_foreign_client_spending_the_budget_causes_a_pause_not_a_storm(
    env, sim, processes, monkeypatch
):
    set_sim_limit(sim.url)
    for name, value in budget_env().items():
        monkeypatch.setenv(name, value)
    stop = threading.Event()
    spent: list[int] = []  # the window's count right after each spend (the spender's result)
    failures: list[BaseException] = []

    def foreign_client() -> None:
        """Spends 30 of every window's 40 requests, right as the window opens."""
        seen_reset = None
        try:
            while not stop.is_set():
                current = httpx.get(f"{sim.url}/_sim/stats?log=0").json()["window_reset"]
                if current != seen_reset:
                    httpx.post(f"{sim.url}/_sim/faults", json={"spend": 30}).raise_for_status()
                    after = httpx.get(f"{sim.url}/_sim/stats?log=0").json()
                    if after["window_reset"] == current:  # still the same window
                        spent.append(after["window_requests"])
                    seen_reset = current
                stop.wait(0.01)
        except BaseException as error:  # reported by the test, not lost in the thread
            failures.append(error)

    spender = threading.Thread(target=foreign_client, daemon=True)
    spender.start()
    try:
        rows = [
            {
                "subscription_group_id": "news",
                "subscription_state": "subscribed",
                "email": f"user{n}@example.com",
            }
            for n in range(2000)  # 40 requests: about four windows at 10 a window
        ]
        sent = EnqueuedLog()
        enqueue_changes(sent.add(rows))
        start_fleet(processes, env, ["v1", "v1"])
        wait_for(drained, timeout=90, interval=0.2, what="the backlog to drain")
    finally:
        stop.set()
        spender.join(timeout=5)

    assert not failures, failures
    # The foreign client really spent its 30 in the windows of the drain.
    assert len(spent) >= 3 and all(count >= 30 for count in spent), spent
    result = sim_stats(sim, log=True)
    ok = [r for r in result["requests"] if r["status"] == 201]
    windows = max(1.0, (max(r["t"] for r in ok) - min(r["t"] for r in ok)) / WINDOW)
    # A 429 pauses every worker until the reset; at most about one per window is the cost
    # of learning another client spent the budget, never a storm.
    limited = [r for r in result["requests"] if r["status"] == 429]
    print(f"429s: {len(limited)} over {windows:.1f} windows; spent after each spend {spent}")
    assert limited, "the workers never met the foreign client's spending: nothing tested"
    assert result["rate_limited_429"] <= windows + 2, (result["rate_limited_429"], windows)
    # The pause: after the first 429 of a window, no request of the fleet arrives later in
    # that window beyond those already on the wire (a fraction of a second).
    first_429: dict[int, float] = {}
    for record in limited:
        first_429.setdefault(math.floor(record["t"] / WINDOW), record["t"])
    late = [
        r
        for r in result["requests"]
        if (first := first_429.get(math.floor(r["t"] / WINDOW))) is not None
        and r["t"] > first + 0.5
    ]
    assert not late, f"{len(late)} requests after a 429 in the same window: {late[:5]}"
    assert_applied_in_order(sim.url, sent, allow_repeats=False)
    assert sum(r["identifiers"] for r in ok) == 2000
    assert len(sim_states(sim)) == 2000
