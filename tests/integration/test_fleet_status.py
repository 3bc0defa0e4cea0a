"""The schedule, the batches being posted and the workers alive, as an operator sees them:
`braze-subs status --json`, the `status` table and a scrape of `braze-subs metrics`, each
a real process against a real Redis. The keys are written here the way the workers and the
coalescer write them (schedule + reasons, claims, heartbeat keys with an expiry, the
workers list), so these tests pin the reading side; a heartbeat that expires stops
counting without anyone deleting it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from core.waiting import WaitReason
from delivery.services import services
from stores.clock import server_time_ms
from stores.fleet import ALIVE_IDS_SHOWN, read_fleet
from stores.keys import Keys
from tests.conftest import wait_for
from tests.metrics_scrape import metrics_exporter, scrape

ROOT = Path(__file__).resolve().parents[2]
DAY_MS = 24 * 3600 * 1000
# Heartbeat keys that outlive any test here, and one that expires during it.
LONG_PX = 600_000
SHORT_PX = 1_500


def command(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "COLUMNS": "120"}
    environ.pop("LINES", None)
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def populate(client: Redis, keys: Keys) -> int:
    """Seven waiting batches (three retry, two credentials, one ready overdue by 2 s, one
    budget), two being posted, four workers listed: two alive, one whose heartbeat is gone,
    one last seen two days ago, and one alive on a heartbeat that expires in SHORT_PX."""
    now = server_time_ms(client)
    due = {
        "b-ready": (now - 2_000, WaitReason.READY),
        "b-retry-1": (now + 5_000, WaitReason.RETRY),
        "b-retry-2": (now + 6_000, WaitReason.RETRY),
        "b-retry-3": (now + 7_000, WaitReason.RETRY),
        "b-cred-1": (now + 60_000, WaitReason.CREDENTIALS),
        "b-cred-2": (now + 60_000, WaitReason.CREDENTIALS),
        "b-budget": (now + 30_000, WaitReason.BUDGET),
    }
    client.zadd(keys.schedule, {batch: at for batch, (at, _) in due.items()})
    client.hset(keys.schedule_reasons, mapping={b: str(r) for b, (_, r) in due.items()})
    client.zadd(keys.claims, {"b-post-1": now + 60_000, "b-post-2": now + 60_000})
    client.hset(
        keys.claim_tokens, mapping={"b-post-1": "host-a:11:aa/x", "b-post-2": "host-b:22:bb/y"}
    )
    workers = {
        "host-a:11:aa": (now - 500, LONG_PX),
        "host-b:22:bb": (now - 900, LONG_PX),
        "host-c:33:cc": (now - 3_600_000, None),  # died an hour ago: its key expired
        "host-d:44:dd": (now - 2 * DAY_MS, None),  # not seen for two days
        "host-e:55:ee": (now - 100, SHORT_PX),
    }
    client.zadd(keys.workers, {worker: seen for worker, (seen, _) in workers.items()})
    for worker, (_, px) in workers.items():
        if px is not None:
            client.set(keys.heartbeat(worker), "1", px=px)
    return now


@pytest.fixture
def fleet(env: dict[str, str]) -> tuple[Redis, Keys]:
    found = services()
    populate(found.redis, found.keys)
    return found.redis, found.keys


def test_read_fleet_counts_the_schedule_by_reason_claims_and_live_heartbeats(fleet):
    client, keys = fleet
    found = read_fleet(client, keys, server_time_ms(client))
    assert found.waiting.total == 7
    assert found.waiting.by_reason == {
        "ready": 1,
        "retry": 3,
        "paused": 0,
        "credentials": 2,
        "budget": 1,
        "held": 0,
        "recovered": 0,
        "handed_back": 0,
    }
    assert -2.5 < found.waiting.next_due_seconds <= -2.0
    assert found.posting == 2
    assert found.workers.alive == 3
    assert found.workers.seen_last_day == 4
    assert found.workers.alive_ids == ["host-a:11:aa", "host-b:22:bb", "host-e:55:ee"]
    # The short heartbeat expires by itself: nobody deletes it, it stops counting.
    wait_for(
        lambda: read_fleet(client, keys, server_time_ms(client)).workers.alive == 2,
        timeout=10,
        what="the short heartbeat to expire",
    )
    later = read_fleet(client, keys, server_time_ms(client)).workers
    assert later.alive_ids == ["host-a:11:aa", "host-b:22:bb"]
    assert later.seen_last_day == 4


def test_an_empty_fleet_reads_as_zeroes(env):
    found = services()
    fleet = read_fleet(found.redis, found.keys, server_time_ms(found.redis))
    assert fleet.waiting.total == 0
    assert set(fleet.waiting.by_reason.values()) == {0}
    assert fleet.waiting.next_due_seconds is None
    assert fleet.posting == 0
    assert (fleet.workers.alive, fleet.workers.seen_last_day, fleet.workers.alive_ids) == (0, 0, [])


def test_alive_ids_are_capped_and_the_alive_count_is_not(env):
    found = services()
    client, keys = found.redis, found.keys
    now = server_time_ms(client)
    ids = [f"host-{n:02d}:{n}:r{n}" for n in range(50)]
    client.zadd(keys.workers, {worker: now - n for n, worker in enumerate(ids)})
    for worker in ids:
        client.set(keys.heartbeat(worker), "1", px=LONG_PX)
    fleet = read_fleet(client, keys, now)
    assert fleet.workers.alive == 50
    assert fleet.workers.alive_ids == sorted(ids)[:ALIVE_IDS_SHOWN]


def test_status_json_has_the_schedule_posting_and_workers(fleet):
    result = command("status", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["waiting_batches"] == 7
    assert shown["waiting_by_reason"] == {reason.value: 0 for reason in WaitReason} | {
        "ready": 1,
        "retry": 3,
        "credentials": 2,
        "budget": 1,
    }
    # overdue by 2 s when written, and by the time the command took to start
    assert -60 < shown["waiting_next_due_seconds"] <= -2.0
    assert shown["batches_posting"] == 2
    assert shown["workers_seen_last_day"] == 4
    # the short heartbeat may have expired while the command started
    assert shown["workers_alive"] in (2, 3)
    assert shown["workers_alive_ids"][:2] == ["host-a:11:aa", "host-b:22:bb"]
    assert len(shown["workers_alive_ids"]) == shown["workers_alive"]
    # the keys INTERFACE.md promises are still there
    assert {"pending", "in_flight", "dead_letter"} <= set(shown)


def test_the_status_table_shows_waiting_reasons_and_workers(fleet):
    result = command("status")
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    for title in ("WAITING BATCHES (SCHEDULE)", "WORKERS"):
        assert title in lines, result.stdout
    for row in (
        "batches 7",
        "ready: due, for the next worker 1",
        "retry after a failed attempt 3",
        "key refused: next probe 2",
        "turn in the rate budget 1",
        "batches being posted now 2",
        "seen in the last day 4",
    ):
        assert row in lines, (row, result.stdout)
    assert any(line.startswith("next due overdue by ") for line in lines), result.stdout
    assert "paused after a 429 0" not in lines  # reasons with no batch are left out
    assert not any(line.startswith("! no worker is alive") for line in lines)


def test_status_warns_when_work_waits_and_no_heartbeat_is_alive(env):
    found = services()
    client, keys = found.redis, found.keys
    now = server_time_ms(client)
    client.zadd(keys.schedule, {"b-1": now + 1_000})
    client.hset(keys.schedule_reasons, "b-1", str(WaitReason.RECOVERED))
    client.zadd(keys.workers, {"host-a:11:aa": now - 60_000})  # its heartbeat is gone
    result = command("status")
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "alive (heartbeat) 0" in lines
    assert "recovered from a dead worker 1" in lines
    text = " ".join(result.stdout.split())  # warnings wrap at 80 columns
    assert (
        "! no worker is alive (no heartbeat) while work waits: nothing is posted, and the "
        "coalescer, whose ticks run on the workers, does not tick "
        "(runbook: no worker is alive)" in text
    ), result.stdout


@pytest.fixture
def exporter(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`braze-subs metrics` as the Procfile runs it, on a free port; yields its URL."""
    with metrics_exporter(tmp_path / "exporter.log", env) as target:
        yield f"http://{target}/metrics"


def test_a_scrape_exports_the_schedule_posting_and_workers_alive(env, exporter):
    found = services()
    populate(found.redis, found.keys)
    # Every series of the pipeline is the `default` workspace's without BRAZE_WORKSPACES_FILE.
    DEFAULT = (("workspace", "default"),)
    metrics = scrape(exporter)
    waiting = {
        dict(labels)["reason"]: value
        for labels, value in metrics["braze_subs_waiting_batches"].items()
    }
    assert waiting == {reason.value: 0 for reason in WaitReason} | {
        "ready": 1,
        "retry": 3,
        "credentials": 2,
        "budget": 1,
    }
    assert 2.0 <= metrics["braze_subs_waiting_overdue_seconds"][DEFAULT] < 60
    assert metrics["braze_subs_batches_posting"] == {DEFAULT: 2}
    assert metrics["braze_subs_workers_alive"][DEFAULT] in (2, 3)
    # The short heartbeat expires by itself and the next scrape counts two.
    wait_for(
        lambda: scrape(exporter)["braze_subs_workers_alive"] == {DEFAULT: 2},
        timeout=10,
        what="a scrape to stop counting the expired heartbeat",
    )
    # Work waits and the last heartbeat goes: the gauge the alert pages on reads 0.
    found.redis.delete(found.keys.heartbeat("host-a:11:aa"), found.keys.heartbeat("host-b:22:bb"))
    assert scrape(exporter)["braze_subs_workers_alive"] == {DEFAULT: 0}
    # Worker ids never become labels.
    assert "host-a" not in httpx.get(exporter, timeout=10).text
