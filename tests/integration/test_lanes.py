"""Lanes (issue 22): every change is live or bulk; live is cut first and its batches go to a
queue of their own; the change that occurred last still wins across lanes. Against a real
redis-server; the coalescer with a dispatch that records batch ids (no Celery)."""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any

from core.changes import Lane
from core.planning import batch_lane
from delivery.services import services
from stores.buffer import Buffer
from stores.clock import server_time_ms
from stores.limiter import Budget, RateLimiter
from tasks.producer import enqueue_change, enqueue_changes
from tests.api_process import running_api
from tests.cli_runs import run_cli
from tests.conftest import email, wait_for
from tests.integration.test_buffer import Recorder, change, coalescer, field, pending_record

GROUP = "news"


def lane_sets(buffer: Buffer) -> tuple[set[str], set[str]]:
    """(live due fields, bulk due fields)."""
    k = buffer.keys
    live = {raw.decode() for raw in buffer.client.zrange(k.due_live, 0, -1)}
    bulk = {raw.decode() for raw in buffer.client.zrange(k.due, 0, -1)}
    return live, bulk


def write_jsonl(path: Any, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_each_way_in_has_its_default_lane_and_a_named_lane_wins(env, tmp_path):
    buffer = services().buffer
    enqueue_change(subscription_group_id=GROUP, subscription_state="subscribed", email=email(1))
    enqueue_change(
        subscription_group_id=GROUP, subscription_state="subscribed", email=email(2), lane="bulk"
    )
    enqueue_changes([{"subscription_group_id": GROUP, "subscription_state": "subscribed",
                      "email": email(3)}])  # fmt: skip
    enqueue_changes(
        [{"subscription_group_id": GROUP, "subscription_state": "subscribed", "email": email(4)}],
        lane="bulk",
    )
    path = tmp_path / "rows.jsonl"
    write_jsonl(
        path,
        [
            {"subscription_group_id": GROUP, "subscription_state": "subscribed",
             "email": email(5)},
            {"subscription_group_id": GROUP, "subscription_state": "subscribed",
             "email": email(6), "lane": "live"},
        ],
    )  # fmt: skip
    assert run_cli("import", str(path)).returncode == 0
    assert run_cli("enqueue", "--group", GROUP, "--state", "subscribed",
                   "--email", email(7)).returncode == 0  # fmt: skip
    assert run_cli("enqueue", "--group", GROUP, "--state", "subscribed",
                   "--email", email(8), "--lane", "bulk").returncode == 0  # fmt: skip
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"subscription_group_id": GROUP, "subscription_state": "subscribed",
                         "email": email(9)}])  # fmt: skip
    assert run_cli("import", str(other), "--lane", "live").returncode == 0

    live, bulk = lane_sets(buffer)
    assert live == {field(email(n)) for n in (1, 3, 6, 7, 9)}
    assert bulk == {field(email(n)) for n in (2, 4, 5, 8)}
    assert pending_record(buffer, GROUP, "email", email(1))["l"] == 1
    assert "l" not in pending_record(buffer, GROUP, "email", email(2))


def test_a_bad_lane_is_one_line_and_enqueues_nothing(env, tmp_path):
    buffer = services().buffer
    path = tmp_path / "rows.jsonl"
    write_jsonl(
        path,
        [
            {"subscription_group_id": GROUP, "subscription_state": "subscribed",
             "email": email(1)},
            {"subscription_group_id": GROUP, "subscription_state": "subscribed",
             "email": email(2), "lane": "fast"},
        ],
    )  # fmt: skip
    result = run_cli("import", str(path))
    assert result.returncode != 0
    assert "line 2" in result.stderr and "lane" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli("enqueue", "--group", GROUP, "--state", "subscribed", "--email", email(3),
                     "--lane", "express")  # fmt: skip
    assert result.returncode != 0
    assert "lane" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    result = run_cli("import", str(path), "--lane", "soon")
    assert result.returncode != 0 and "--lane" in result.stderr
    assert buffer.pending_count() == 0


def test_a_live_change_replacing_a_pending_bulk_one_moves_it_to_the_live_lane(env):
    buffer = services().buffer
    buffer.enqueue([change(email(1)), change(email(2))], lane=Lane.BULK)
    buffer.enqueue([change(email(1), "unsubscribed")], lane=Lane.LIVE)
    # A newer bulk change replacing a pending live one keeps its place in the live lane.
    buffer.enqueue([change(email(2), "unsubscribed", lane="live")])
    buffer.enqueue([change(email(2), "subscribed")], lane=Lane.BULK)
    live, bulk = lane_sets(buffer)
    assert live == {field(email(1)), field(email(2))}
    assert bulk == set()
    assert pending_record(buffer, GROUP, "email", email(2))["s"] == "subscribed"


def test_an_older_bulk_change_never_overwrites_a_newer_live_one(env):
    buffer = services().buffer
    buffer.enqueue([change(email(1), "unsubscribed", occurred_at=1_700_000_000)])
    buffer.enqueue([change(email(1), "subscribed", occurred_at=1_699_999_000)], lane=Lane.BULK)
    assert buffer.stale == 1
    assert pending_record(buffer, GROUP, "email", email(1))["s"] == "unsubscribed"


def test_live_is_cut_first_with_room_the_backfill_cannot_take(env):
    """Bulk fills its share of MAX_BATCHES_IN_FLIGHT; live changes are cut into batches of
    their own (ids of the live lane) in the same tick, ahead of the bulk backlog."""
    buffer = services().buffer
    buffer.enqueue([change(f"bulk-{n}", kind="external_id") for n in range(5000)], lane=Lane.BULK)
    recorder = Recorder()
    cutter = coalescer(recorder, batch_linger_seconds=0, max_batches_in_flight=20)
    first = cutter.tick()
    assert first.batches == 18  # 20 less the live reserve (10 %, at least 1)
    assert all(batch_lane(batch_id) is Lane.BULK for batch_id in recorder.ids)
    assert cutter.tick().batches == 0  # the bulk share is full

    buffer.enqueue([change(email(n), "unsubscribed") for n in range(3)])  # live
    second = cutter.tick()
    assert second.batches == 1
    live_id = recorder.ids[-1]
    assert batch_lane(live_id) is Lane.LIVE and live_id.startswith("live-")
    lanes = buffer.lanes(server_time_ms(buffer.client))
    assert lanes["live"]["pending"] == 0
    assert lanes["bulk"]["pending"] == 5000 - 18 * 50


def test_a_live_flood_leaves_bulk_its_floor_share_of_the_batches_in_flight(env):
    """Live alone could fill MAX_BATCHES_IN_FLIGHT: while bulk has due changes, live leaves
    BULK_FLOOR_SHARE (10 %) of it to bulk's batches, or the budget's floor would have
    nothing to post once the backfill's batches in flight ended."""
    buffer = services().buffer
    buffer.enqueue([change(f"bulk-{n}", kind="external_id") for n in range(2000)], lane=Lane.BULK)
    buffer.enqueue([change(email(n), "unsubscribed") for n in range(5000)])  # live
    recorder = Recorder()
    cutter = coalescer(recorder, batch_linger_seconds=0, max_batches_in_flight=20)
    assert cutter.tick().batches == 20
    lanes = [batch_lane(batch_id) for batch_id in recorder.ids]
    assert lanes.count(Lane.LIVE) == 18 and lanes.count(Lane.BULK) == 2
    assert cutter.tick().batches == 0  # the cap is full; bulk holds its 2 of it


def test_a_live_only_tick_leaves_bulk_its_floor_of_the_batches_in_flight_too(env):
    """Under a backlog live-only ticks run every 0.1 s between full ones: they must not fill
    the cap bulk's floor needs either, and the full tick then cuts bulk within the cap."""
    buffer = services().buffer
    buffer.enqueue([change(f"bulk-{n}", kind="external_id") for n in range(2000)], lane=Lane.BULK)
    buffer.enqueue([change(email(n), "unsubscribed") for n in range(5000)])  # live
    recorder = Recorder()
    cutter = coalescer(recorder, batch_linger_seconds=0, max_batches_in_flight=20)
    assert cutter.tick(live_only=True).batches == 18
    assert cutter.tick(live_only=True).batches == 0
    assert cutter.tick().batches == 2
    lanes = [batch_lane(batch_id) for batch_id in recorder.ids]
    assert lanes.count(Lane.LIVE) == 18 and lanes.count(Lane.BULK) == 2
    assert services().batches.count() == 20  # never beyond the cap


def test_status_json_shows_pending_and_the_oldest_due_age_per_lane(env):
    buffer = services().buffer
    buffer.enqueue([change(email(n)) for n in range(3)], lane=Lane.BULK)
    buffer.enqueue([change(email(n + 10)) for n in range(2)])
    buffer.enqueue([change(email(99), delay_seconds=600)])  # live, not due yet
    result = run_cli("status", "--json")
    assert result.returncode == 0, result.stderr
    lanes = json.loads(result.stdout)["lanes"]
    assert lanes["live"]["pending"] == 3
    assert lanes["bulk"]["pending"] == 3
    assert 0 <= lanes["live"]["oldest_seconds"] < 60
    text = run_cli("status").stdout
    assert "live: pending, oldest due" in text and "bulk: pending, oldest due" in text


# --- the budget: bulk reserves only a little ahead; live keeps bulk's floor ------------


def lane_limiter(redis_client: Any, *, bulk_wait: float, floor: float) -> RateLimiter:
    """100 requests a second (10 ms apart, no burst to speak of), live waits up to 10 s."""
    budget = Budget.for_limit(100, 1, headroom=0.0, burst_fraction=0.0)
    return RateLimiter(
        redis_client,
        "{test}:lanes-limiter",
        budget,
        max_wait_seconds=10,
        bulk_max_wait_seconds=bulk_wait,
        bulk_floor_share=floor,
    )


def test_bulk_reserves_only_a_little_ahead_so_a_live_turn_comes_soon(env, redis_client):
    limiter = lane_limiter(redis_client, bulk_wait=0.2, floor=0.1)
    waits = []
    while (grant := limiter.acquire(Lane.BULK)).granted:
        waits.append(grant.wait_seconds)
        assert len(waits) < 100, "bulk reserved further ahead than its 0.2 s"
    assert len(waits) >= 18  # 0.2 s of 10 ms turns (more as the clock moves on)
    assert max(waits) <= 0.2
    live = limiter.acquire(Lane.LIVE)
    assert live.granted and live.wait_seconds <= 0.25


def send_times(limiter: RateLimiter, lane: Lane, count: int) -> list[float]:
    sends = []
    for _ in range(count):
        grant = limiter.acquire(lane)
        assert grant.granted and grant.send_at_ms is not None
        sends.append(grant.send_at_ms)
    return sends


def test_live_spends_at_most_its_share_while_bulk_waits_and_all_without_it(env, redis_client):
    limiter = lane_limiter(redis_client, bulk_wait=10, floor=0.5)
    # No bulk: live may have the whole budget, turns 10 ms apart (not its own 20).
    alone = send_times(limiter, Lane.LIVE, 20)
    assert min(b - a for a, b in itertools.pairwise(alone)) <= 10.2
    send_times(limiter, Lane.BULK, 1)  # bulk asks for a turn: it is waiting now
    live = send_times(limiter, Lane.LIVE, 50)
    # Live's own limit spaces its turns 20 ms apart: half the budget, the rest is bulk's.
    assert min(b - a for a, b in itertools.pairwise(live)) >= 19.9
    # Bulk alone: the whole budget, 10 ms apart; never closer, whatever the lanes.
    bulk = send_times(limiter, Lane.BULK, 50)
    assert min(b - a for a, b in itertools.pairwise(live + bulk)) >= 9.9
    assert bulk[-1] - bulk[0] <= 50 * 10


def test_a_live_flood_leaves_the_budget_within_bulks_reach(env, redis_client):
    """While bulk asks, live reserves its own share's turns only a little ahead (a flood's
    extra requests are refused, to wait in the schedule), so the next bulk caller finds a
    turn within its reach: bulk's floor share is there to take, not promised to live
    seconds ahead."""
    limiter = lane_limiter(redis_client, bulk_wait=0.2, floor=0.1)
    assert limiter.acquire(Lane.BULK).granted  # bulk waits
    live = []
    while (grant := limiter.acquire(Lane.LIVE)).granted:
        live.append(grant.wait_seconds)
        assert len(live) < 200, "live reserved its turns far beyond bulk's reach"
    assert grant.waits_for == "budget" and grant.wait_seconds > 0
    assert len(live) >= 15  # ~0.2 s of its 11 ms turns
    bulk = limiter.acquire(Lane.BULK)
    assert bulk.granted and bulk.wait_seconds <= 0.2


def test_a_live_only_tick_runs_beside_a_full_tick_holding_its_lock(env):
    buffer = services().buffer
    recorder = Recorder()
    cutter = coalescer(recorder, batch_linger_seconds=0)
    held = buffer.tick_lock(30)
    assert held.acquire()  # a full tick cutting a backfill, say
    try:
        buffer.enqueue([change(email(1), "unsubscribed")])
        assert cutter.tick().skipped
        report = cutter.tick(live_only=True)
        assert report.batches == 1 and batch_lane(recorder.ids[-1]) is Lane.LIVE
    finally:
        held.release()


def test_under_a_backlog_a_live_change_wakes_a_tick_at_once_and_bulk_does_not(env):
    """A run draining a backlog waits for the beat's next run to cut bulk again, but a live
    change's nudge wakes it for a live-only tick at once."""
    buffer = services().buffer
    buffer.enqueue([change(f"bulk-{n}", kind="external_id") for n in range(3000)], lane=Lane.BULK)
    recorder = Recorder()
    cutter = coalescer(recorder, batch_linger_seconds=0, max_batches_in_flight=10)
    result: list[Any] = []
    # Four seconds: its BLPOP stays under the client's 5 s socket timeout.
    thread = threading.Thread(target=lambda: result.append(cutter.run(4)))
    thread.start()
    try:
        wait_for(lambda: len(recorder.ids) == 9, what="the first tick to fill bulk's room")
        buffer.enqueue([change("more-bulk", kind="external_id")], lane=Lane.BULK)
        buffer.enqueue([change(email(1), "unsubscribed")])
        wait_for(
            lambda: any(batch_lane(b) is Lane.LIVE for b in recorder.ids),
            timeout=5,
            what="the live change to be cut",
        )
        assert len(recorder.ids) == 10  # the live batch only, in the room bulk leaves
    finally:
        thread.join(timeout=60)


def test_the_http_api_is_live_unless_a_row_names_bulk(env, tmp_path):
    buffer = services().buffer
    with running_api(env["REDIS_URL"], tmp_path) as api:
        rows = [
            {"subscription_group_id": GROUP, "subscription_state": "unsubscribed",
             "email": email(1)},
            {"subscription_group_id": GROUP, "subscription_state": "subscribed",
             "email": email(2), "lane": "bulk"},
        ]  # fmt: skip
        assert api.post(rows).status_code == 202
        bad = api.post([{**rows[0], "lane": "urgent"}])
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "lane"
    live, bulk = lane_sets(buffer)
    assert live == {field(email(1))} and bulk == {field(email(2))}


def test_a_dlq_replay_goes_in_the_bulk_lane(env):
    from tests.integration.test_dead_letters import dead_letter, store

    buffer = services().buffer
    entry = dead_letter(GROUP, [email(1), email(2)])  # enqueued live, then dead-lettered
    assert store().replay([entry]).requeued == 2
    live, bulk = lane_sets(buffer)
    assert live == set() and bulk == {field(email(1)), field(email(2))}
