"""The opt-out check in the poster, in-process against the simulator and a real Redis: who
is left out, one read for two batches, a whole batch opted out, Braze unreadable."""

from __future__ import annotations

import json

import httpx
import pytest

from core.changes import parse_change
from core.planning import plan_batches
from delivery.poster import Poster
from delivery.services import services
from stores.clock import server_time_ms
from stores.history import ConsentHistory
from tests.conftest import come_due, email, take_each
from tests.sim_control import braze_states, set_in_braze, sim_stats

GROUP = "news"


def cut(values: list[str], *, respect: bool = True, state: str = "subscribed") -> list[str]:
    """Enqueue the changes and cut them into batches of 50; their ids, in order."""
    found = services()
    buffer = found.buffer
    rows = [
        {
            "subscription_group_id": GROUP,
            "subscription_state": state,
            "email": value,
            "respect_opt_out": respect,
        }
        for value in values
    ]
    buffer.enqueue([parse_change(row) for row in rows])
    now = server_time_ms(buffer.client)
    changes, _ = buffer.read_due(now, 10_000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)
    return [batch_id for batch_id, _size in take_each(buffer, plan, 60_000)]


@pytest.fixture
def poster(env) -> Poster:
    found = services()
    return found.poster()


def test_opted_out_identifiers_are_left_out_and_counted(sim, poster, redis_client, caplog):
    values = [email(n) for n in range(10)]
    set_in_braze(sim.url, GROUP, "unsubscribed", values[:3])
    set_in_braze(sim.url, GROUP, "subscribed", values[3:5])  # values[5:] are unknown to Braze
    (batch_id,) = cut(values)
    with caplog.at_level("INFO", logger="braze_subs.opt_outs"):
        report = poster.post(batch_id)
    assert report.status == "delivered"
    assert braze_states(sim.url, GROUP) == {
        **dict.fromkeys(values[:3], "unsubscribed"),
        **dict.fromkeys(values[3:], "subscribed"),
    }
    assert redis_client.hget(services().keys.stats, "opt_out_skipped") == b"3"
    assert not redis_client.exists(services().keys.batch(batch_id))  # ended
    logged = caplog.text
    assert "3 left out, unsubscribed in Braze: u***@example.com" in logged
    assert values[0] not in logged
    (post,) = [r for r in sim_stats(sim, log=True)["requests"] if r["endpoint"] == "v1"]
    assert post["identifiers"] == 7
    found = services()
    history = ConsentHistory(found.redis, found.keys)
    assert [e.event for e in history.events("email", values[0])][-1] == "skipped_opt_out"
    assert [e.event for e in history.events("email", values[5])][-1] == "posted"


def test_without_respect_opt_out_nothing_is_read(sim, poster):
    values = [email(n) for n in range(5)]
    set_in_braze(sim.url, GROUP, "unsubscribed", values)
    (batch_id,) = cut(values, respect=False)
    assert poster.post(batch_id).status == "delivered"
    assert set(braze_states(sim.url, GROUP).values()) == {"subscribed"}
    assert sim_stats(sim, log=True)["reads"]["requests_total"] == 0


def test_a_batch_without_respect_opt_out_ends_every_member_as_posted(sim, poster, redis_client):
    """Its end is told "all were sent" rather than given the list (issue 26): every
    member's history says posted, none is counted as left out, the batch ends and its
    locks go; beside it, a batch whose members respect opt-outs still lists them."""
    plain = [email(n) for n in range(50)]
    respecting = [email(n) for n in range(50, 60)]
    set_in_braze(sim.url, GROUP, "unsubscribed", [plain[0], respecting[0]])
    (plain_id,) = cut(plain, respect=False)
    (respecting_id,) = cut(respecting)
    assert poster.post(plain_id).status == "delivered"
    assert poster.post(respecting_id).status == "delivered"
    found = services()
    history = ConsentHistory(found.redis, found.keys)
    for value in plain:
        assert [e.event for e in history.events("email", value)] == [
            "enqueued",
            "batched",
            "posted",
        ]
    assert [e.event for e in history.events("email", respecting[0])][-1] == "skipped_opt_out"
    assert [e.event for e in history.events("email", respecting[1])][-1] == "posted"
    assert redis_client.hget(found.keys.stats, "opt_out_skipped") == b"1"
    assert redis_client.hget(found.keys.stats, "delivered") == b"60"
    assert not redis_client.exists(found.keys.batch(plain_id))
    assert not redis_client.hlen(found.keys.inflight)


def test_unsubscribing_changes_are_never_checked(sim, poster):
    (batch_id,) = cut([email(1)], state="unsubscribed")
    assert poster.post(batch_id).status == "delivered"
    assert sim_stats(sim, log=True)["reads"]["requests_total"] == 0


def test_one_read_covers_two_batches(sim, poster):
    values = [email(n) for n in range(100)]
    set_in_braze(sim.url, GROUP, "unsubscribed", [values[10], values[90]])
    first, second = cut(values)
    assert poster.post(first).status == "delivered"
    assert poster.post(second).status == "delivered"
    assert sim_stats(sim, log=True)["reads"]["requests_total"] == 1
    states = braze_states(sim.url, GROUP)
    assert [v for v in values if states[v] == "unsubscribed"] == [values[10], values[90]]


def test_a_batch_wholly_opted_out_is_ended_without_a_post(sim, poster, redis_client):
    values = [email(n) for n in range(4)]
    set_in_braze(sim.url, GROUP, "unsubscribed", values)
    (batch_id,) = cut(values)
    report = poster.post(batch_id)
    assert report.status == "delivered"
    assert sim_stats(sim, log=True)["requests_total"] == 0  # no post at all
    assert not redis_client.exists(services().keys.batch(batch_id))
    assert redis_client.hlen(services().keys.inflight) == 0  # unlocked


def test_braze_unreadable_means_nothing_is_posted_and_the_batch_retries(sim, poster, redis_client):
    values = [email(n) for n in range(3)]
    (batch_id,) = cut(values)
    httpx.post(f"{sim.url}/_sim/faults", json={"outage": True}).raise_for_status()
    report = poster.post(batch_id)
    assert report.status == "retry"
    assert report.detail.startswith("opt-out check: Braze unreachable")
    assert sim_stats(sim, log=True)["requests_total"] == 0
    record = json.loads(redis_client.get(services().keys.batch(batch_id)))
    assert record["attempts"] == 1  # counted like a failed post
    httpx.post(f"{sim.url}/_sim/faults", json={"outage": False}).raise_for_status()
    come_due(batch_id)
    assert poster.post(batch_id).status == "delivered"


def test_a_retried_batch_counts_who_it_left_out_once(sim, poster, redis_client):
    values = [email(n) for n in range(3)]
    set_in_braze(sim.url, GROUP, "unsubscribed", values[:1])
    (batch_id,) = cut(values)
    httpx.post(f"{sim.url}/_sim/faults", json={"error_rate": 1.0}).raise_for_status()
    assert poster.post(batch_id).status == "retry"  # screened, then the post failed
    httpx.post(f"{sim.url}/_sim/faults", json={"error_rate": 0.0}).raise_for_status()
    come_due(batch_id)
    assert poster.post(batch_id).status == "delivered"
    assert redis_client.hget(services().keys.stats, "opt_out_skipped") == b"1"
    assert braze_states(sim.url, GROUP)[values[0]] == "unsubscribed"
