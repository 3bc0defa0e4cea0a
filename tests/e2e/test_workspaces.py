"""Several Braze workspaces from one deployment (issue 23), end to end: one Redis, one fleet
(a worker and beat), two simulators, each a workspace with its own key (`workspaces_env`:
`us` on `sim` with SIM_KEY owns us-email/us-sms, `eu` on `sim_b` with SIM_KEY_B owns
eu-email/eu-sms). Each workspace posts only its own changes, with its own key, to its own
endpoint, in order; a refused key in one never stops the other."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from redis import Redis

from config.settings import get_settings
from devtools.processes import worker_args
from stores.keys import Keys
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, email, wait_for
from tests.sim_control import faults, sim_states, sim_stats

pytestmark = pytest.mark.slow

GROUPS = {"us": ("us-email", "us-sms"), "eu": ("eu-email", "eu-sms")}
SHARED = "named-only"  # a group the file gives to nobody: changes for it name a workspace


def keys(workspace: str) -> Keys:
    return Keys(get_settings().redis_key_prefix, workspace)


def drained(client: Redis, workspace: str) -> bool:
    """Nothing pending, in flight or in a batch in `workspace`'s key space."""
    k = keys(workspace)
    return not (client.hlen(k.pending) or client.hlen(k.inflight) or client.zcard(k.batches))


def rows(rng: random.Random, workspace: str, count: int) -> list[dict[str, Any]]:
    """`count` changes over a few identifiers of the workspace's groups (repeats: the order
    matters), a few of them in SHARED naming the workspace."""
    made: list[dict[str, Any]] = []
    for _ in range(count):
        named = rng.random() < 0.1
        made.append(
            {
                "subscription_group_id": SHARED if named else rng.choice(GROUPS[workspace]),
                "subscription_state": rng.choice(("subscribed", "unsubscribed")),
                "email": email(rng.randrange(40)),
                **({"workspace": workspace} if named else {}),
            }
        )
    return made


def workspace_of(item: dict[str, Any]) -> str:
    return item.get("workspace") or item["subscription_group_id"].split("-")[0]


def enqueue_mixed(
    rng: random.Random, sent: dict[str, EnqueuedLog], count: int, **named: Any
) -> None:
    """Both workspaces' changes interleaved in one `enqueue_changes` call, recorded for the
    order oracle in the order given (which the split by workspace keeps)."""
    mixed = rows(rng, "us", count) + rows(rng, "eu", count)
    rng.shuffle(mixed)
    for item in mixed:
        sent[workspace_of(item)].add([item])
    assert enqueue_changes(mixed, **named) == len(mixed)


def final_states(sent: EnqueuedLog) -> dict[tuple[str, str, str], str]:
    return {key: str(changes[-1]) for key, changes in sent.items()}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_each_workspace_posts_its_own_changes_with_its_own_key_in_order(
    workspaces_env, processes, redis_client, version
):
    """One fleet, both workspaces: each simulator holds exactly its workspace's changes
    (a batch, and with v2 a pack of several groups, never mixes workspaces), accepted with
    its own key (no 401 anywhere), in the order enqueued (the oracle, per workspace)."""
    processes.worker("w1", extra_env={"BRAZE_API_VERSION": version})
    processes.beat()
    rng = random.Random(23)
    sent = {"us": EnqueuedLog(), "eu": EnqueuedLog()}
    for _round in range(3):
        enqueue_mixed(rng, sent, 80)
    for workspace, sim in workspaces_env.sims.items():
        wait_for(
            lambda w=workspace: drained(redis_client, w), timeout=90, what=f"{workspace} drained"
        )
        wait_for(
            lambda w=workspace, s=sim: sim_states(s) == final_states(sent[w]),
            timeout=10,
            what=f"{workspace}'s simulator to hold exactly its changes",
        )
        stats = sim_stats(sim)
        assert stats["unauthorized"] == 0 and stats["malformed"] == 0, stats
        assert_applied_in_order(sim.url, sent[workspace])
    # Nothing was written in the default key space (no workspace is named `default`).
    assert redis_client.hlen(Keys(get_settings().redis_key_prefix).pending) == 0
    assert redis_client.zcard(Keys(get_settings().redis_key_prefix).batches) == 0


def test_a_refused_key_in_one_workspace_does_not_stop_the_other(
    workspaces_env, processes, redis_client
):
    """us's key is refused (Braze answers 401): us stops posting and waits for the key,
    spending no attempts, while eu drains at once; the key accepted again, us drains."""
    faults(workspaces_env.sims["us"], api_keys=["another-key"])
    processes.worker("w1")
    processes.beat()
    rng = random.Random(7)
    sent = {"us": EnqueuedLog(), "eu": EnqueuedLog()}
    enqueue_mixed(rng, sent, 150)
    started = time.monotonic()
    wait_for(lambda: drained(redis_client, "eu"), timeout=60, what="eu to drain")
    eu_took = time.monotonic() - started
    assert sim_states(workspaces_env.sims["eu"]) == final_states(sent["eu"])
    us = keys("us")
    wait_for(lambda: redis_client.exists(us.credentials), timeout=20, what="us's circuit to open")
    assert not redis_client.exists(keys("eu").credentials)
    assert not drained(redis_client, "us")
    assert redis_client.hlen(us.dead_letters) == 0
    assert sim_stats(workspaces_env.sims["eu"])["unauthorized"] == 0

    faults(workspaces_env.sims["us"], api_keys=["another-key", workspaces_env.keys["us"]])
    wait_for(lambda: drained(redis_client, "us"), timeout=60, what="us to drain once accepted")
    assert sim_states(workspaces_env.sims["us"]) == final_states(sent["us"])
    for workspace, sim in workspaces_env.sims.items():
        assert_applied_in_order(sim.url, sent[workspace])
    print(f"eu drained in {eu_took:.1f}s while us's key was refused")


def test_beat_ticks_every_workspace_and_the_worker_records_each(
    workspaces_env, processes, redis_client
):
    """Beat's schedule has a tick and a dead-letter expiry per workspace; a started worker
    records the workspace id (never the key) it posts for in each workspace's keys and
    beats its heartbeat there (the claim scripts read it)."""
    from tasks.celery_app import beat_schedule

    schedule = beat_schedule(get_settings())
    assert {name: entry.get("kwargs") for name, entry in schedule.items()} == {
        "coalesce:us": {"workspace": "us"},
        "expire-dead-letters:us": {"workspace": "us"},
        "coalesce:eu": {"workspace": "eu"},
        "expire-dead-letters:eu": {"workspace": "eu"},
    }
    worker = processes.worker("w1")
    processes.wait_ready([worker])
    for workspace in ("us", "eu"):
        k = keys(workspace)
        wait_for(lambda k=k: redis_client.hlen(k.workspaces), timeout=20, what="recorded")
        recorded = [name.decode() for name in redis_client.hkeys(k.workspaces)]
        assert len(recorded) == 1 and workspaces_env.keys[workspace] not in recorded[0]
        wait_for(lambda k=k: redis_client.zcard(k.workers), timeout=20, what="heartbeat")


def test_a_worker_without_one_workspaces_key_stops_at_start_in_one_line(workspaces_env, processes):
    """Every workspace's key must be there when a worker starts: the missing one is named
    by its table and field (never a key), and the worker stops before posting anything."""
    worker = processes.start("worker", "w1", worker_args("w1"), {"BRAZE_KEY_EU": ""})
    wait_for(lambda: not worker.alive(), timeout=60, what="the worker to stop")
    log = worker.log()
    assert (
        "braze-subs: BRAZE_WORKSPACES_FILE: [workspaces.eu] api_key_env: the variable "
        "BRAZE_KEY_EU is not set (it holds the API key)"
    ) in log
    assert "Traceback" not in log
    assert workspaces_env.keys["us"] not in log


def test_record_change_from_another_service_routes_by_kwarg_and_group(
    workspaces_env, processes, redis_client
):
    """`subscriptions.record_change` sent by a service sharing only the broker: routed
    by its `workspace` kwarg or its group; one fitting no workspace fails its task,
    enqueuing nothing."""
    from celery import Celery

    processes.worker("w1")
    processes.beat()
    foreign = Celery("other-service", broker=workspaces_env["REDIS_URL"])
    base = {"subscription_state": "unsubscribed", "email": "jane@example.com"}
    foreign.send_task(
        "subscriptions.record_change",
        kwargs={**base, "subscription_group_id": SHARED, "workspace": "eu"},
    )
    foreign.send_task(
        "subscriptions.record_change", kwargs={**base, "subscription_group_id": "us-sms"}
    )
    foreign.send_task(
        "subscriptions.record_change", kwargs={**base, "subscription_group_id": "nobodys"}
    )
    expected = {
        "us": {("us-sms", "email", "jane@example.com"): "unsubscribed"},
        "eu": {(SHARED, "email", "jane@example.com"): "unsubscribed"},
    }
    for workspace, sim in workspaces_env.sims.items():
        wait_for(
            lambda s=sim, w=workspace: sim_states(s) == expected[w],
            timeout=30,
            what=f"{workspace}'s change in its Braze",
        )
    prefix = get_settings().redis_key_prefix
    enqueued = [
        int(redis_client.hget(Keys(prefix, name).stats, "enqueued") or 0) for name in ("us", "eu")
    ]
    assert enqueued == [1, 1]
    foreign.close()


def test_key_rotation_in_one_workspace_delivers_within_seconds_of_the_restart(
    workspaces_env, processes, redis_client
):
    """The runbook's rotation, in us alone: us's key is refused and its batches wait for
    the next probe (CREDENTIALS_PROBE_SECONDS at its default, a minute) while eu keeps
    posting; the worker is restarted with us's new key and us drains within seconds (the
    start releases what waited for the key, in each workspace whose key now works)."""
    us_sim, eu_sim = workspaces_env.sims["us"], workspaces_env.sims["eu"]
    default_probe = {"CREDENTIALS_PROBE_SECONDS": "60"}
    faults(us_sim, api_keys=["the-new-us-key"])  # the old one is revoked
    old = processes.worker("w-old", extra_env=default_probe)
    processes.beat()
    rng = random.Random(11)
    sent = {"us": EnqueuedLog(), "eu": EnqueuedLog()}
    enqueue_mixed(rng, sent, 120)
    wait_for(lambda: drained(redis_client, "eu"), timeout=60, what="eu to drain")
    us = keys("us")

    def us_waits_for_the_key() -> bool:
        """Everything cut, and every us batch in the schedule for the key."""
        reasons = [r.decode() for r in redis_client.hvals(us.schedule_reasons)]
        batches = redis_client.zcard(us.batches)
        return (
            not redis_client.hlen(us.pending)
            and bool(batches)
            and len(reasons) == batches
            and set(reasons) == {"credentials"}
        )

    wait_for(us_waits_for_the_key, timeout=60, what="every us batch to wait for the key")
    assert sim_stats(us_sim)["requests_ok"] == 0

    processes.kill(old)
    new = processes.worker("w-new", extra_env={**default_probe, "BRAZE_KEY_US": "the-new-us-key"})
    assert new.alive()
    ready = time.monotonic()
    wait_for(lambda: drained(redis_client, "us"), timeout=30, what="us to drain with the new key")
    took = time.monotonic() - ready
    assert took < 30, took  # well before the old key's next probe (a minute)
    assert not redis_client.exists(us.credentials)
    assert sim_states(us_sim) == final_states(sent["us"])
    assert sim_states(eu_sim) == final_states(sent["eu"])
    assert sim_stats(eu_sim)["unauthorized"] == 0
    for workspace, sim in workspaces_env.sims.items():
        assert_applied_in_order(sim.url, sent[workspace])
    print(f"us drained {took:.1f}s after the worker with its new key was ready")
