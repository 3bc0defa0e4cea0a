"""v1 and v2 workers side by side (issue 21 item 3): a pack a v2 worker's tick cut, taken
by a v1 worker, is posted whole within seconds, not after the sweep. Real worker and beat
processes at default settings, the simulator over HTTP."""

from __future__ import annotations

import time

import httpx

from config.settings import load_settings
from delivery.coalescer import Coalescer
from delivery.services import services
from stores.batch_records import BatchRecord
from tasks.celery_app import create_app
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, drained, wait_for

USERS, GROUPS = 60, 4


def test_a_v2_pack_taken_by_a_v1_worker_is_posted_whole_within_seconds(default_env, sim, processes):
    found = services()
    sent = EnqueuedLog()
    enqueue_changes(
        sent.add(
            {
                "subscription_group_id": f"group-{g}",
                "subscription_state": "unsubscribed",
                "external_id": f"user-{n}",
            }
            for n in range(USERS)
            for g in range(GROUPS)
        )
    )
    # A v2 worker's tick: the same users in four groups go into packs, one message each.
    v2 = load_settings(braze_api_version="v2", batch_linger_seconds=0)
    messages: list[str] = []
    tick = Coalescer(
        v2, found.buffer, found.batches, found.limiter, found.heartbeats, messages.append
    ).tick()
    assert tick.identifiers == USERS * GROUPS
    packs = [BatchRecord.from_json(found.redis.get(found.keys.batch(m))).pack for m in messages]
    assert all(len(pack) == GROUPS for pack in packs), packs  # the shape of issue 21
    app = create_app(load_settings())
    for lead in messages:
        app.send_task("subscriptions.post_batch", args=[lead])

    # Every one of them is taken by a v1 worker.
    started = time.monotonic()
    processes.worker("w-v1", extra_env={"BRAZE_API_VERSION": "v1"})
    processes.beat()
    # Within seconds: the sweep (BATCH_REDISPATCH_SECONDS, 120 s) would find the rest
    # only much later; before issue 21, 180 of the 240 changes waited for it.
    wait_for(drained, timeout=45, interval=0.2, what="every batch of every pack posted")
    took = time.monotonic() - started
    data = httpx.get(f"{sim.url}/_sim/state", params={"log": "0"}).json()
    assert len(data["subscriptions"]) == USERS * GROUPS
    stats = httpx.get(f"{sim.url}/_sim/stats").json()
    assert {r["endpoint"] for r in stats["requests"]} == {"v1"}
    assert stats["malformed"] == 0
    assert_applied_in_order(sim.url, sent, allow_repeats=False)
    print(f"{USERS * GROUPS} changes in {len(messages)} v2 packs: posted by v1 in {took:.1f} s")
