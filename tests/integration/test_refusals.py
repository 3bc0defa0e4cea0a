"""Issue 10: a batch Braze refuses as a whole, and 2xx answers with `errors` - the poster
against the simulator over real HTTP, batch records and refusals in a real Redis."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from admin.status import read_status
from admin.status_view import sections, warnings
from delivery.poster import Poster
from delivery.services import services
from stores.dead_letters import DeadLetters
from stores.refusals import Refusals
from tests.conftest import come_due, email
from tests.integration.test_poster import drive, make_batch
from tests.sim_control import faults, sim_stats, sim_subscriptions

SMS = "sms-alerts"


def phone(n: int) -> str:
    return f"+1415555{n:04d}"


def batch(kind: str, values: list[str], group: str = SMS, state: str = "subscribed") -> str:
    return make_batch(
        [{"subscription_group_id": group, "subscription_state": state, kind: v} for v in values]
    )


@pytest.fixture
def poster(env) -> Poster:
    found = services()
    return found.poster()


def make_sms_group(poster: Poster) -> None:
    """The simulator types an auto group by its first use: make SMS an SMS group."""
    assert poster.post(batch("phone", [phone(9000)])).status == "delivered"


def requests(sim: Any) -> int:
    return int(sim_stats(sim)["requests_total"])


@pytest.mark.parametrize("how", ["unknown-group", "emails-to-sms-group", "anonymous"])
def test_a_group_refused_as_a_whole_costs_at_most_three_requests_then_none(
    sim, poster, redis_client, caplog, how
):
    make_sms_group(poster)
    emails = [email(n) for n in range(50)]
    later = [email(n) for n in range(100, 200)]
    if how == "unknown-group":  # a deleted group: `Unknown subscription_group_id: ...`
        faults(sim, reject_groups=[SMS])
    elif how == "anonymous":  # every identifier refused by a 400 that names nothing
        faults(sim, reject_anonymous=emails + later)
    # else: emails sent to an SMS group, which Braze refuses naming the group
    caplog.set_level(logging.INFO, logger="braze_subs")
    before = requests(sim)

    reports = drive(poster, batch("email", emails))

    assert requests(sim) - before <= 3
    # ("gone": the held half's own retry, after its sibling's message already ended it)
    statuses = [r.status for r in reports if r.status != "gone"]
    if how == "anonymous":  # one split; the held half follows its condemned sibling unsent
        assert statuses == ["split", "waiting", "dead_lettered", "dead_lettered"], statuses
    else:
        assert statuses == ["dead_lettered"], statuses
    entries = DeadLetters(redis_client, services().keys).list()
    assert sorted(i["value"] for e in entries for i in e.identifiers) == sorted(emails)
    assert all("group refused" in e.error for e in entries), [e.error for e in entries]

    # Further batches of that group + state + kind: dead-lettered without a request.
    before = requests(sim)
    for part in (later[:50], later[50:]):
        assert {r.status for r in drive(poster, batch("email", part))} == {"dead_lettered"}
    assert requests(sim) == before
    entries = DeadLetters(redis_client, services().keys).list()
    assert sum(len(e.identifiers) for e in entries) == 150
    # Phones for the same group are not refused (unless the group is gone).
    if how != "unknown-group":
        assert poster.post(batch("phone", [phone(1), phone(2)])).status == "delivered"

    found = services()
    status = read_status(found.redis, found.keys)
    [refused] = status.refused_groups
    assert (refused["group"], refused["state"], refused["kind"]) == (SMS, "subscribed", "email")
    shown = [row for section in sections(status, 0.0) for row in section.rows]
    assert any(SMS in label for label, _value in shown)
    assert any(SMS in note for note in warnings(status))
    # No full email reached a log line, at any level.
    assert not any(e in r.getMessage() for r in caplog.records for e in emails + later)
    assert any("refuses group=sms-alerts" in r.getMessage() for r in caplog.records)


def test_replay_lifts_the_refusal(sim, poster, redis_client):
    make_sms_group(poster)
    drive(poster, batch("email", [email(1), email(2)]))
    found = services()
    assert read_status(found.redis, found.keys).refused_groups
    report = DeadLetters(redis_client, found.keys).replay(None)
    assert report.requeued == 2
    assert read_status(found.redis, found.keys).refused_groups == []


def test_one_bad_identifier_among_anonymous_400s_is_still_isolated(sim, poster, redis_client):
    """Halves: one refused, one delivered: the refused half keeps halving; no refusal."""
    values = [email(n) for n in range(50)]
    faults(sim, reject_anonymous=[email(33)])
    drive(poster, batch("email", values, group="news"))
    [entry] = DeadLetters(redis_client, services().keys).list()
    assert [i["value"] for i in entry.identifiers] == [email(33)]
    assert {v for (_g, _k, v) in sim_subscriptions(sim)} == set(values) - {email(33)}
    found = services()
    assert read_status(found.redis, found.keys).refused_groups == []


def test_2xx_errors_are_logged_masked_counted_and_their_identifiers_dead_lettered(
    sim, poster, redis_client, caplog
):
    values = [email(n) for n in range(5)]
    faults(sim, soft_errors=[email(3)])
    caplog.set_level(logging.INFO, logger="braze_subs")

    report = poster.post(batch("email", values, group="news"))

    assert report.status == "delivered"
    [entry] = DeadLetters(redis_client, services().keys).list()
    assert [i["value"] for i in entry.identifiers] == [email(3)]
    assert "Invalid email" in entry.error
    found = services()
    status = read_status(found.redis, found.keys)
    assert status.delivery_errors_total == 1
    assert status.delivered_total == 4 and status.dead_letter == 1
    assert status.in_flight == 0
    [line] = [r for r in caplog.records if "error(s) from Braze" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert email(3) not in line.getMessage() and "u***@example.com" in line.getMessage()
    assert email(3) not in report.detail


def test_a_400_quoting_an_identifier_is_logged_masked(sim, poster, redis_client, caplog):
    values = [email(n) for n in range(10)]
    faults(sim, reject=[email(7)])  # `Invalid email: user7@example.com`
    caplog.set_level(logging.INFO, logger="braze_subs")
    reports = drive(poster, batch("email", values, group="news"))
    assert "split" in [r.status for r in reports]
    assert all(email(7) not in r.detail for r in reports)  # Flower shows these
    lines = [r.getMessage() for r in caplog.records]
    assert any("status=split" in line and "u***@example.com" in line for line in lines)
    assert not any(email(7) in line for line in lines)
    [entry] = DeadLetters(redis_client, services().keys).list()
    assert email(7) in entry.error  # the dead letter keeps Braze's message whole


def test_when_the_refusal_ends_the_next_batch_asks_braze_again(sim, env, redis_client):
    from config.settings import load_settings
    from tests.conftest import wait_for

    found = services()
    settings = load_settings(group_refusal_seconds=0.5)
    poster = found.poster(settings=settings)
    faults(sim, reject_groups=["gone"])
    assert poster.post(batch("email", [email(1)], group="gone")).status == "dead_lettered"
    before = requests(sim)
    assert poster.post(batch("email", [email(2)], group="gone")).status == "dead_lettered"
    assert requests(sim) == before  # refused: not sent
    wait_for(lambda: not read_status(found.redis, found.keys).refused_groups, timeout=5)
    faults(sim, reject_groups=[])  # the group was created meanwhile
    assert poster.post(batch("email", [email(3)], group="gone")).status == "delivered"
    assert requests(sim) == before + 1


def test_a_refused_halfs_message_is_stored_without_the_siblings_identifiers(env, redis_client):
    """A half of an anonymous split waits for its sibling with Braze's message; that message
    may name the sibling's members, whose data must not sit in this half's record."""
    found = services()
    Refusals(found.redis, found.keys).mark_half_refused(
        "half-a", "half-b", f"invalid email {email(7)} or phone +14155550107", ttl_seconds=60
    )
    stored = redis_client.get(found.keys.refused_half("half-a")).decode()
    assert email(7) not in stored and "+14155550107" not in stored, stored
    assert "invalid email" in stored


def test_the_claim_reads_the_groups_refusal_and_a_refused_halfs_message(env, redis_client):
    """The claim's reply carries what the poster checks before a request (claim_batch.lua;
    two calls of their own before issue 26): the refusal standing for its batch's group +
    state + kind, and for a half of a split Braze's message while the half awaits its
    sibling, both read where `Refusals` writes them; nothing for a batch of another state,
    nor once the refusal is lifted."""
    found = services()
    refusals = Refusals(found.redis, found.keys)
    refused = batch("email", [email(1)], group="gone")
    other_state = batch("email", [email(2)], group="gone", state="unsubscribed")
    later = batch("email", [email(3)], group="gone")
    refusal = refusals.refuse("gone", "subscribed", "email", "Unknown group: gone", seconds=60)
    claim = found.batches.claim(refused, "w/1", 60_000)
    assert (claim.status, claim.refusal, claim.half_refused) == ("claimed", refusal, None)
    assert found.batches.claim(other_state, "w/1", 60_000).refusal is None
    refusals.lift()
    assert found.batches.claim(later, "w/1", 60_000).refusal is None
    # The halves of an anonymous split each name the other as `sibling`.
    two = batch("email", [email(4), email(5)])
    assert found.batches.claim(two, "w/2", 60_000).status == "claimed"
    halves = found.batches.split(two, "w/2", isolate=None, grace_ms=120_000)
    assert halves is not None
    first, second = halves
    refusals.mark_half_refused(first, second, "invalid request", ttl_seconds=60)
    assert sorted(come_due(first, second)) == sorted(halves)
    assert found.batches.claim(first, "w/3", 60_000).half_refused == "invalid request"
    assert found.batches.claim(second, "w/3", 60_000).half_refused is None
