"""Event time and erasure with real worker and beat processes and the simulator over HTTP:
changes arriving out of order from every producer, across coalescer ticks, retries and a
worker killed mid-post, end in Braze as the one that occurred last; `forget` during a
backlog leaves nothing behind, whatever the pipeline does afterwards."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from admin.status import read_status
from core.changes import format_ms
from delivery.services import services
from stores.history import ConsentHistory
from tasks.producer import enqueue_change, enqueue_changes
from tests.cli_runs import run_real
from tests.conftest import (
    EnqueuedLog,
    assert_applied_in_order,
    drained,
    keyspace_traces,
    wait_for,
)
from tests.sim_control import faults, sim_stats

GROUP = "news"
T0 = 1_795_000_000  # epoch seconds, before the test machine's clock
PHASES = ("import-jsonl", "task", "api-many", "import-csv", "task", "api-one")


def sim_states(sim: Any) -> dict[tuple[str, str], str]:
    data = httpx.get(f"{sim.url}/_sim/state", params={"log": "0"}).json()
    return {(s["group"], s["value"]): s["state"] for s in data["subscriptions"]}


def counted() -> int:
    """Changes the buffer has received so far (accepted or dropped as stale)."""
    found = services()
    return read_status(found.redis, found.keys).enqueued_total


def cli(*args: str) -> None:
    result = run_real(*args)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_change_that_occurred_last_wins_whatever_the_arrival(
    env, sim, processes, redis_client, tmp_path: Path
):
    rng = random.Random(13)
    values = [f"late{n}@example.com" for n in range(40)]
    # Six changes per identifier, one per phase, their times shuffled.
    plan: dict[str, list[tuple[int, str]]] = {}
    for value in values:
        times = rng.sample(range(6), 6)
        plan[value] = [(T0 + 10 * t, rng.choice(["subscribed", "unsubscribed"])) for t in times]
    expected = {(GROUP, v): max(changes)[1] for v, changes in plan.items()}
    expected_stale = 0
    for changes in plan.values():
        latest = None
        for occurred, _state in changes:
            if latest is not None and occurred < latest:
                expected_stale += 1
            else:
                latest = occurred

    assert expected_stale > 0
    worker = processes.worker("w1", concurrency=4)
    processes.beat()
    foreign = Celery("other-service", broker=env["REDIS_URL"])
    sent = 0
    for phase, name in enumerate(PHASES):
        if phase == 1:
            faults(sim, error_rate=0.3)  # retries from here on
        if phase == 2:
            faults(sim, error_rate=0.0, hold=True)  # this phase's first post will hang
        rows = [
            {
                "subscription_group_id": GROUP,
                "subscription_state": plan[v][phase][1],
                "email": v,
                "occurred_at": plan[v][phase][0],
                "source": f"phase-{phase}-{name}",
            }
            for v in values
        ]
        rng.shuffle(rows)
        if name == "import-jsonl":
            path = tmp_path / f"phase{phase}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            cli("import", str(path))
        elif name == "import-csv":
            path = tmp_path / f"phase{phase}.csv"
            lines = ["subscription_group_id,subscription_state,email,occurred_at,source"]
            lines += [
                f"{r['subscription_group_id']},{r['subscription_state']},{r['email']},"
                f"{format_ms(r['occurred_at'] * 1000)},{r['source']}"
                for r in rows
            ]
            path.write_text("\n".join(lines) + "\n")
            cli("import", str(path))
        elif name == "task":
            for r in rows:
                foreign.send_task("subscriptions.record_change", kwargs=r)
        elif name == "api-many":
            enqueue_changes(rows)
        else:
            for r in rows:
                enqueue_change(**r)
        sent += len(rows)
        if phase == 2:
            # A worker dies with a post on the wire; the sweep hands its batch to another.
            wait_for(lambda: sim_stats(sim)["held"] >= 1, timeout=30, what="a post held")
            processes.kill(worker)
            faults(sim, hold=False, error_rate=0.3)
            worker = processes.worker("w2", concurrency=4)
        wait_for(lambda total=sent: counted() == total, timeout=60, what=f"phase {phase} enqueued")
        # Let a few coalescer ticks cut and post some of it before the next phase.
        wait_for(
            lambda done=phase: sim_stats(sim)["requests_ok"] > done,
            timeout=30,
            what="a post in between",
        )

    wait_for(drained, timeout=120, what="everything delivered")
    assert sim_states(sim) == expected
    # No identifier received an older (by occurred_at) state after a newer one, retries,
    # a killed worker and every way in included.
    occurred = {(GROUP, "email", v): [(float(t), state) for t, state in plan[v]] for v in values}
    assert_applied_in_order(sim.url, occurred)
    found = services()
    status = read_status(found.redis, found.keys)
    assert status.stale == expected_stale
    assert status.enqueued_total == sent
    assert status.dead_letter == 0
    history = ConsentHistory(found.redis, found.keys)
    told = sum(1 for v in values for event in history.events("email", v) if event.event == "stale")
    assert told == expected_stale
    assert sim_stats(sim)["malformed"] == 0
    foreign.close()


@pytest.mark.slow
def test_forget_during_a_backlog_leaves_no_trace(env, sim, processes, redis_client):
    target = "erase.me@example.com"
    others = [f"keep{n}@example.com" for n in range(300)]
    # Braze refuses the target in group "c": it ends in the dead-letter store.
    faults(sim, reject=[target])
    processes.worker("w1", concurrency=4)
    processes.beat()
    sent = EnqueuedLog()
    enqueue_changes(
        sent.add(
            [
                {"subscription_group_id": "c", "subscription_state": "subscribed", "email": v}
                for v in [target, *others[:10]]
            ]
        )
    )
    found = services()
    wait_for(lambda: found.dead_letters.list(), timeout=60, what="the target dead-lettered")
    wait_for(drained, timeout=60, what="group c drained")
    faults(sim, reject=[], outage=True)  # a backlog builds up: every post fails and retries
    rows = [
        {
            "subscription_group_id": group,
            "subscription_state": "unsubscribed",
            "email": v,
            "source": "backlog",
        }
        for group in ("a", "b")
        for v in [*others, target]
    ]
    enqueue_changes(sent.add(rows))
    wait_for(
        lambda: read_status(found.redis, found.keys).in_flight > 0,
        timeout=30,
        what="batches retrying",
    )
    late = {"subscription_group_id": "a", "subscription_state": "subscribed", "email": target}
    enqueue_change(**late, source="late")
    sent.add([late])
    assert keyspace_traces(redis_client, target)

    cli("forget", "--email", target)
    assert keyspace_traces(redis_client, target) == []

    # The outage ends, the backlog drains, dead letters are replayed: nothing brings it back.
    faults(sim, outage=False)
    wait_for(drained, timeout=120, what="the backlog delivered")
    cli("dlq", "replay", "--all")
    wait_for(drained, timeout=60, what="the replay delivered")
    assert keyspace_traces(redis_client, target) == []
    states = sim_states(sim)
    assert all(states[(group, v)] == "unsubscribed" for group in ("a", "b") for v in others)
    history = ConsentHistory(found.redis, found.keys).events("email", target)
    assert [event.event for event in history] == ["erased"]
    assert_applied_in_order(sim.url, sent)
