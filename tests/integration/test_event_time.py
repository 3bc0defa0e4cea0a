"""The change that occurred last wins (watermarks), the consent history and erasure, against
a real redis-server (and the simulator over HTTP for posting), in-process."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from admin.status import read_status
from core.changes import parse_change
from core.planning import plan_batches
from delivery.poster import Poster
from delivery.services import services
from stores.batch_records import BatchStore, ClaimStatus, Ended
from stores.buffer import Buffer
from stores.clock import server_time_ms
from stores.history import DAY_MS, ConsentHistory, Retention
from stores.keys import Keys, buffer_field, identity_digest
from tests.cli_runs import run_real
from tests.conftest import (
    come_due,
    email,
    keyspace_traces,
    take_each,
    turn_a_moment_off,
    wait_for,
)
from tests.sim_control import faults, set_in_braze

GROUP = "news"
T0 = 1_795_000_000  # epoch seconds, a few days before the test machine's clock


def row(value: str, state: str, occurred: float | None = None, **extra: Any) -> dict[str, Any]:
    data = {"subscription_group_id": extra.pop("group", GROUP), "subscription_state": state}
    data["email"] = value
    if occurred is not None:
        data["occurred_at"] = occurred
    data.update(extra)
    return data


def enqueue(*rows: dict[str, Any]) -> Buffer:
    buffer = services().buffer
    buffer.enqueue([parse_change(r) for r in rows])
    return buffer


def pending_state(value: str, group: str = GROUP) -> str | None:
    buffer = services().buffer
    raw = buffer.client.hget(buffer.keys.pending, buffer_field(group, "email", value))
    return None if raw is None else json.loads(raw)["s"]


def events(value: str, kind: str = "email") -> list[str]:
    found = services()
    return [e.event for e in ConsentHistory(found.redis, found.keys).events(kind, value)]


def stale_count() -> int:
    found = services()
    return read_status(found.redis, found.keys).stale


def take_all() -> list[str]:
    buffer = services().buffer
    now = server_time_ms(buffer.client)
    changes, _ = buffer.read_due(now, 10_000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50, linger_ms=0)
    return [batch_id for batch_id, _ in take_each(buffer, plan, 60_000)]


def deliver_all(poster: Poster) -> None:
    for batch_id in take_all():
        assert poster.post(batch_id).status == "delivered"


def sim_states(sim: Any) -> dict[str, str]:
    data = httpx.get(f"{sim.url}/_sim/state", params={"log": "0"}).json()
    return {s["value"]: s["state"] for s in data["subscriptions"]}


# --------------------------------------------------------------------------------------
# Latest occurred_at wins
# --------------------------------------------------------------------------------------


def test_an_older_change_is_dropped_as_stale_whatever_the_arrival_order(env, redis_client):
    enqueue(row(email(1), "unsubscribed", T0 + 20))
    enqueue(row(email(1), "subscribed", T0 + 10))  # arrives later, occurred earlier
    assert pending_state(email(1)) == "unsubscribed"
    assert stale_count() == 1
    # Equal times: the later arrival wins.
    enqueue(row(email(1), "subscribed", T0 + 20))
    assert pending_state(email(1)) == "subscribed"
    # In one call too: order of arguments is arrival order.
    enqueue(row(email(2), "subscribed", T0 + 5), row(email(2), "unsubscribed", T0 + 1))
    assert pending_state(email(2)) == "subscribed"
    assert stale_count() == 2
    assert events(email(1)) == ["enqueued", "stale", "superseded", "enqueued"]


def test_a_watermark_among_new_identifiers_in_one_call_still_drops_the_older_change(
    env, redis_client
):
    """enqueue.lua reads watermarks only when a subject key exists for some field of the call
    (one EXISTS for all): one identifier with a watermark among 199 new ones is still seen,
    in the middle of the call and at its end, and its later change in the same call is
    compared with the earlier one."""
    enqueue(row(email(7), "unsubscribed", T0 + 20), row(email(300), "unsubscribed", T0 + 20))
    take_all()  # the watermarks of email(7) and email(300): T0 + 20
    rows = [row(email(n), "subscribed", T0 + 10) for n in range(100, 300)]
    rows[50] = row(email(7), "subscribed", T0 + 10)  # older than its watermark: stale
    rows.append(row(email(7), "subscribed", T0 + 30))  # newer: accepted
    rows.append(row(email(7), "unsubscribed", T0 + 25))  # older than the one before it
    rows[-3] = row(email(300), "subscribed", T0 + 10)  # stale, at the end
    buffer = enqueue(*rows)
    assert buffer.stale == 3
    assert pending_state(email(7)) == "subscribed"
    assert pending_state(email(300)) is None
    assert pending_state(email(151)) == "subscribed"
    assert stale_count() == 3
    assert events(email(7)) == ["enqueued", "batched", "stale", "enqueued", "stale"]
    assert events(email(300))[-1] == "stale"


def test_the_watermark_outlives_the_batch_in_flight_and_delivered(env, sim, redis_client):
    found = services()
    poster = found.poster()
    enqueue(row(email(1), "unsubscribed", T0 + 20))
    [batch_id] = take_all()
    enqueue(row(email(1), "subscribed", T0 + 10))  # older than the change in flight
    assert pending_state(email(1)) is None
    assert poster.post(batch_id).status == "delivered"
    enqueue(row(email(1), "subscribed", T0 + 15))  # older than the change delivered
    assert pending_state(email(1)) is None
    assert stale_count() == 2
    assert sim_states(sim) == {email(1): "unsubscribed"}
    enqueue(row(email(1), "subscribed", T0 + 30))
    deliver_all(poster)
    assert sim_states(sim) == {email(1): "subscribed"}
    marks = ConsentHistory(found.redis, found.keys).watermarks("email", email(1))
    assert marks == {GROUP: (T0 + 30) * 1000}


def test_without_occurred_at_the_arrival_time_stands_in(env, redis_client):
    before = server_time_ms(redis_client)
    enqueue(row(email(1), "subscribed"))  # today's behaviour: now
    enqueue(row(email(1), "unsubscribed", before / 1000 - 60))  # occurred a minute earlier
    assert pending_state(email(1)) == "subscribed"
    assert stale_count() == 1
    enqueue(row(email(1), "unsubscribed"))  # arrives later without a time: it wins
    assert pending_state(email(1)) == "unsubscribed"


def test_watermarks_are_per_group(env, redis_client):
    enqueue(row(email(1), "unsubscribed", T0 + 20, group="a"))
    enqueue(row(email(1), "subscribed", T0 + 10, group="b"))
    assert pending_state(email(1), "a") == "unsubscribed"
    assert pending_state(email(1), "b") == "subscribed"
    assert stale_count() == 0


def test_a_change_older_than_the_retention_is_compared_with_what_is_held(env, redis_client):
    found = services()
    old = server_time_ms(redis_client) / 1000 - 40 * 86_400  # beyond the 30-day default
    enqueue(row(email(1), "unsubscribed", old))
    assert pending_state(email(1)) == "unsubscribed"
    [event] = ConsentHistory(found.redis, found.keys).events("email", email(1))
    assert event.as_dict()["beyond_watermark_retention"] is True
    assert "older than the watermark retention" in event.describe()
    assert read_status(found.redis, found.keys).beyond_retention == 1
    enqueue(row(email(1), "subscribed", old - 1))  # a watermark is still held: stale
    assert stale_count() == 1


def test_watermark_and_history_expire_with_their_retention(env, redis_client):
    found = services()
    enqueue(row(email(1), "subscribed", T0))
    # Ingest writes nothing per identifier: the watermark and history come when the change
    # is taken into a batch (at the delivery rate), its "enqueued" at its arrival time.
    assert redis_client.exists(found.keys.subject("email", email(1))) == 0
    assert events(email(1)) == ["enqueued"]  # read from the buffer meanwhile
    [batch_id] = take_all()
    settings = found.settings
    lifetime = max(settings.watermark_retention_days, settings.dead_letter_retention_days)
    # Each key lives its retention after its last write, and at most a minute more
    # (EXPIRY_SLACK_MS: the take's expiries then cover the finish's, issue 26).
    retained = (lifetime * DAY_MS, settings.history_retention_days * DAY_MS)
    for ttl, days in zip(ttls(redis_client, email(1)), retained, strict=True):
        assert days - 5_000 < ttl <= days + EXPIRY_SLACK_MS
    assert events(email(1)) == ["enqueued", "batched"]
    assert found.batches.claim(batch_id, "w/1", 30_000).status is ClaimStatus.CLAIMED
    assert found.batches.delivered(batch_id, "w/1", http_status=201).status is Ended.ENDED
    for ttl, days in zip(ttls(redis_client, email(1)), retained, strict=True):
        assert days - 5_000 < ttl <= days + EXPIRY_SLACK_MS  # after the delivery too
    assert events(email(1)) == ["enqueued", "batched", "posted"]


EXPIRY_SLACK_MS = 60_000  # _prelude.lua: a subject or history key's retention, a minute more


def ttls(redis_client: Any, value: str) -> tuple[int, int]:
    """The subject key's and the history's time to live (ms) of an email."""
    keys = services().keys
    return (
        redis_client.pttl(keys.subject("email", value)),
        redis_client.pttl(keys.history("email", value)),
    )


def command_calls(redis_client: Any, name: str) -> int:
    stats = redis_client.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


def test_a_finish_within_its_takes_cover_reads_no_watermark_and_sets_no_expiry(env, redis_client):
    """Each member of a record carries the least expiry its take gave the identifier's
    subject and history keys (issue 26): a finish whose own expiries (now + retention) it
    covers sets none and reads no watermark (the subject cannot have expired since the
    take wrote it), delivered or dead-lettered, and leaves what today's finish leaves: the
    watermarks, the events, the dead letter's reference, each key living its retention
    after the finish and at most a minute more. Fails on the previous finish (two
    PEXPIREATs and a watermark read a member)."""
    found = services()
    retention = Retention.from_settings(found.settings)
    enqueue(row(email(1), "subscribed", T0), row(email(2), "subscribed", T0 + 1))
    [delivered] = take_all()
    enqueue(row(email(3), "unsubscribed", T0 + 2))
    [dead] = take_all()
    for batch_id in (delivered, dead):
        assert found.batches.claim(batch_id, "w/1", 30_000).status is ClaimStatus.CLAIMED
    redis_client.config_resetstat()
    assert found.batches.delivered(delivered, "w/1", http_status=201).status is Ended.ENDED
    assert found.batches.dead_letter(dead, "w/1", "HTTP 400").status is Ended.ENDED
    assert command_calls(redis_client, "pexpireat") == 0
    assert command_calls(redis_client, "pexpire") == 0
    assert command_calls(redis_client, "hget") == 2  # each finish's claim token, no watermark
    marks = ConsentHistory(found.redis, found.keys)
    for n, when in ((1, T0), (2, T0 + 1), (3, T0 + 2)):
        assert marks.watermarks("email", email(n)) == {GROUP: when * 1000}
        subject_ttl, history_ttl = ttls(redis_client, email(n))
        assert retention.subject_ms - 5_000 < subject_ttl <= retention.subject_ms + 60_000
        assert retention.history_ms - 5_000 < history_ttl <= retention.history_ms + 60_000
    assert events(email(1)) == ["enqueued", "batched", "posted"]
    assert events(email(3)) == ["enqueued", "batched", "dead_lettered"]
    references = redis_client.hgetall(found.keys.subject("email", email(3)))
    assert references[f"d\x1f{dead}".encode()] == GROUP.encode()


def past_the_cover(redis_client: Any, batch_id: str, how: str) -> None:
    """Make `batch_id`'s record as a finish past its members' cover finds it: the cover
    ended (a finish more than the retention after its take), or a previous release's
    members (four fields, or six: no cover). Either way its keys may have expired: the
    subject is gone and the history about to go."""
    keys = services().keys
    key = keys.batch(batch_id)
    record = json.loads(redis_client.get(key))
    now = server_time_ms(redis_client)
    for member in record["members"]:
        if how == "cover ended":
            member[6] = now - 1
        else:
            del member[int(how.split()[0]) :]
        redis_client.delete(keys.subject("email", member[0]))
        redis_client.pexpire(keys.history("email", member[0]), 10_000)
    redis_client.set(key, json.dumps(record, separators=(",", ":")))


@pytest.mark.parametrize("how", ["cover ended", "6 fields", "4 fields"])
def test_a_finish_past_its_takes_cover_sets_the_watermark_and_expiries_as_before(
    env, redis_client, how
):
    """A member whose take's cover ended, or a previous release's member (no cover): the
    finish reads the watermark, sets it again if the subject expired meanwhile, and lets
    both keys live their retention from now, as before (issue 26). Fails if the finish
    skipped them unconditionally: no watermark, the history gone in seconds."""
    found = services()
    retention = Retention.from_settings(found.settings)
    enqueue(row(email(1), "subscribed", T0), row(email(2), "subscribed", T0 + 1))
    [batch_id] = take_all()
    past_the_cover(redis_client, batch_id, how)
    assert found.batches.claim(batch_id, "w/1", 30_000).status is ClaimStatus.CLAIMED
    assert found.batches.delivered(batch_id, "w/1", http_status=201).status is Ended.ENDED
    marks = ConsentHistory(found.redis, found.keys)
    for n, when in ((1, T0), (2, T0 + 1)):
        assert marks.watermarks("email", email(n)) == {GROUP: when * 1000}
        subject_ttl, history_ttl = ttls(redis_client, email(n))
        assert retention.subject_ms - 5_000 < subject_ttl <= retention.subject_ms + 60_000
        assert retention.history_ms - 5_000 < history_ttl <= retention.history_ms + 60_000
        assert events(email(n)) == ["enqueued", "batched", "posted"]


def test_a_finish_with_a_longer_retention_than_its_take_sets_the_expiries(env, redis_client):
    """Retention raised between a take and its finish (a rolling change of settings): the
    take's cover no longer covers the finish's expiries, which are set, the watermark read
    (issue 26). Fails if the finish compared its cover with anything but its own expiries."""
    found = services()
    longer = Retention(watermark_ms=31 * DAY_MS, history_ms=31 * DAY_MS, dead_letter_ms=DAY_MS)
    enqueue(row(email(1), "subscribed", T0))
    [batch_id] = take_all()
    batches = BatchStore(redis_client, found.keys, retention=longer)
    assert batches.claim(batch_id, "w/1", 30_000).status is ClaimStatus.CLAIMED
    redis_client.config_resetstat()
    assert batches.delivered(batch_id, "w/1", http_status=201).status is Ended.ENDED
    assert command_calls(redis_client, "pexpireat") == 2
    assert command_calls(redis_client, "hget") == 2  # the claim token, the watermark
    for ttl in ttls(redis_client, email(1)):
        assert 31 * DAY_MS - 5_000 < ttl <= 31 * DAY_MS + EXPIRY_SLACK_MS


def test_history_keeps_at_most_the_configured_events(env, redis_client):
    keys = services().keys
    buffer = Buffer(redis_client, keys, retention=Retention(history_max_events=4))
    buffer.enqueue([parse_change(row(email(1), s)) for s in ["subscribed", "unsubscribed"] * 4])
    assert redis_client.llen(keys.history("email", email(1))) == 4
    kept = ConsentHistory(redis_client, keys).events("email", email(1))
    # The four newest written (enqueued 6, superseded, enqueued 7, superseded), and the
    # change still pending.
    assert [(e.event, e.details.get("q")) for e in kept] == [
        ("enqueued", 6),
        ("superseded", 7),
        ("enqueued", 7),
        ("superseded", 8),
        ("enqueued", 8),
    ]
    assert kept[-1].details["pending"] == 1


def test_history_drops_events_older_than_its_retention(env, redis_client):
    keys = services().keys
    buffer = Buffer(redis_client, keys, retention=Retention(history_ms=300))
    buffer.enqueue([parse_change(row(email(1), "subscribed"))])
    start = server_time_ms(redis_client)
    wait_for(lambda: server_time_ms(redis_client) > start + 300, what="300 ms on Redis's clock")
    buffer.enqueue([parse_change(row(email(1), "unsubscribed"))])
    assert [e.event for e in ConsentHistory(redis_client, keys).events("email", email(1))] == [
        "superseded",
        "enqueued",
    ]


def test_key_names_never_hold_the_identifier(env, redis_client):
    enqueue(row(email(1), "subscribed", T0, source="checkout-form"))
    take_all()
    names = [name.decode() for name in redis_client.scan_iter(count=1000)]
    assert names and not any(email(1) in name for name in names)
    assert Keys("braze-subs").history("email", email(1)) in names


def test_every_field_of_a_change_survives_the_enqueue_wire_format(env, redis_client):
    """encode_change formats the pending JSON's members in the producer (issue 26): what
    the buffer, the history and `read_due` see is what the change said, sources with
    quotes, backslashes, slashes and non-ASCII text included, in one call with others."""
    source = 'web/"form" \\ café 表'
    changes = [
        row(
            email(1),
            "subscribed",
            T0,
            source=source,
            delay_seconds=1.5,
            respect_opt_out=True,
            lane="bulk",
        ),
        row(email(2), "unsubscribed", None, source="a/b", group="sms", lane="live"),
        {
            "subscription_group_id": "sms",
            "subscription_state": "subscribed",
            "external_id": "u-1",
            "use_double_opt_in_logic": True,
        },
        row(email(1), "unsubscribed", T0 - 1, source=source),  # stale: told with its fields
    ]
    buffer = enqueue(*changes)
    assert buffer.stale == 1
    first = json.loads(
        redis_client.hget(buffer.keys.pending, buffer_field(GROUP, "email", email(1)))
    )
    assert (first["s"], first["o"], first["w"], first["d"], first["r"], first["c"]) == (
        "subscribed",
        0,
        T0 * 1000,
        1500,
        1,
        source,
    )
    assert "l" not in first and first["t"] - 1500 <= server_time_ms(redis_client)
    second = json.loads(
        redis_client.hget(buffer.keys.pending, buffer_field("sms", "email", email(2)))
    )
    assert (second["s"], second["c"], second["l"]) == ("unsubscribed", "a/b", 1)
    assert "w" not in second and "d" not in second and "r" not in second
    third = json.loads(
        redis_client.hget(buffer.keys.pending, buffer_field("sms", "external_id", "u-1"))
    )
    assert (third["s"], third["o"]) == ("subscribed", 1)
    assert [first["q"], second["q"], third["q"]] == [1, 2, 3]
    assert {g.decode() for g in redis_client.smembers(buffer.keys.groups)} == {GROUP, "sms"}
    story = ConsentHistory(redis_client, buffer.keys).events("email", email(1))
    enqueued, stale = story  # the pending change's "enqueued", as history tells it
    assert (enqueued.event, stale.event) == ("enqueued", "stale")
    assert (enqueued.details["c"], enqueued.details["d"], enqueued.details["r"]) == (
        source,
        1500,
        1,
    )
    assert (stale.details["s"], stale.details["c"], stale.details["o"]) == (
        "unsubscribed",
        source,
        (T0 - 1) * 1000,
    )


# --------------------------------------------------------------------------------------
# History: one identifier's story through a retry, a dead letter and a replay
# --------------------------------------------------------------------------------------


def test_history_tells_the_story_through_a_retry_a_dead_letter_and_a_replay(env, sim, redis_client):
    found = services()
    poster = found.poster()
    enqueue(row(email(1), "unsubscribed", T0, source="support:ticket-123"))
    enqueue(row(email(1), "subscribed", T0 - 5, source="backfill"))  # stale
    [batch_id] = take_all()
    faults(sim, outage=True)
    assert poster.post(batch_id).status == "retry"
    faults(sim, outage=False, reject=[email(1)])
    come_due(batch_id)
    assert poster.post(batch_id).status == "dead_lettered"
    faults(sim, reject=[])
    assert found.dead_letters.replay(None).requeued == 1
    [second] = take_all()
    assert poster.post(second).status == "delivered"
    assert sim_states(sim) == {email(1): "unsubscribed"}

    story = ConsentHistory(found.redis, found.keys).events("email", email(1))
    assert [e.event for e in story] == [
        "enqueued",
        "stale",
        "batched",
        "retried",
        "dead_lettered",
        "replayed",
        "batched",
        "posted",
    ]
    enqueued, stale, batched, retried, dead, replayed, batched_again, posted = story
    assert enqueued.details["c"] == "support:ticket-123"
    assert enqueued.details["s"] == "unsubscribed" and enqueued.details["o"] == T0 * 1000
    assert stale.details["c"] == "backfill" and stale.details["m"] == T0 * 1000
    assert stale.details["s"] == "subscribed" and stale.details["o"] == (T0 - 5) * 1000
    assert batched.details["b"] == batch_id
    assert (retried.details["h"], retried.details["n"]) == (503, 1)
    assert dead.details["h"] == 400 and dead.details["b"] == batch_id
    assert replayed.details["b"] == batch_id and batched_again.details["b"] == second
    assert posted.details["h"] == 201 and posted.details["l"] > 0
    assert [e.at_ms for e in story] == sorted(e.at_ms for e in story)

    # The command an operator runs.
    result = run_real("history", "--email", "USER1@example.com", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert [e["event"] for e in shown["events"]] == [e.event for e in story]
    assert shown["events"][0]["source"] == "support:ticket-123"
    assert shown["events"][0]["occurred_at"] == "2026-11-18T11:06:40.000Z"
    assert shown["events"][-1]["http_status"] == 201
    text = run_real("history", "--email", email(1), "--group", GROUP)
    assert text.returncode == 0, text.stderr
    for words in ("dropped as stale", "retried", "HTTP 503", "dead-lettered", "replayed"):
        assert words in text.stdout


# --------------------------------------------------------------------------------------
# Erasure
# --------------------------------------------------------------------------------------


def test_forget_removes_every_trace_and_nothing_brings_it_back(env, sim, redis_client):
    found = services()
    poster = found.poster()
    target, other = email(1), email(2)
    # A dead letter whose error names the identifier (Braze's 400), shared with another.
    enqueue(row(target, "subscribed", T0, group="c"), row(other, "subscribed", T0, group="c"))
    faults(sim, reject=[target])
    [dead_batch] = take_all()
    poster.post(dead_batch)  # split: the other is delivered, the target dead-lettered
    halves = [b.decode() for b in redis_client.zrange(found.keys.schedule, 0, -1)]
    for batch_id in come_due(*halves):
        poster.post(batch_id)
    faults(sim, reject=[])
    assert target in found.dead_letters.list()[0].error
    # A dead letter for it superseded by a newer change (its entry still lists it), which
    # is in flight, as is a change in group b with a newer one waiting behind its batch.
    enqueue(row(target, "unsubscribed", T0 + 1, group="c"))
    enqueue(row(target, "subscribed", T0, group="b", source="checkout"))
    in_flight = take_all()
    assert len(in_flight) == 2
    enqueue(row(target, "unsubscribed", T0 + 1, group="b"))
    # Pending in group a, and other identifiers around it.
    enqueue(row(target, "subscribed", T0, group="a"), row(other, "subscribed", T0, group="a"))
    assert keyspace_traces(redis_client, target)

    result = run_real("forget", "--email", target.upper())
    assert result.returncode == 0, result.stderr
    assert "Braze is not changed" in result.stdout and "/users/delete" in result.stdout
    assert "2 pending changes" in result.stdout
    assert "2 batches in flight" in result.stdout
    assert "1 dead-letter entries" in result.stdout
    assert keyspace_traces(redis_client, target) == []

    # The batch on the wire ends, everything is replayed, swept and posted: nothing comes back.
    for batch_id in in_flight:
        assert poster.post(batch_id).status == "empty"
    found.dead_letters.replay(None)
    for batch_id in take_all():
        poster.post(batch_id)
    assert keyspace_traces(redis_client, target) == []
    assert read_status(found.redis, found.keys).erased == 1
    assert sim_states(sim)[other] == "subscribed"  # the others are untouched
    assert "posted" in events(other)
    shown = json.loads(run_real("history", "--email", target, "--json").stdout)
    assert [e["event"] for e in shown["events"]] == ["erased"]
    assert shown["events"][0]["removed"]["pending"] == 2


@pytest.mark.parametrize("fenced_by", ["the claim", "the fence before the first byte"])
def test_forget_while_the_batch_is_being_posted(env, sim, redis_client, fenced_by):
    """The erasure comes after the check before the first byte: the request is on the wire
    and reaches Braze, but its end, a retry and a dead letter write nothing about the
    identifier. (Before that check, the request is not sent at all:
    tests/integration/test_erasure.py.) The check is the claim's when its turn is for now
    (issue 26: the erasure then comes between the claim and the request), else
    fence_batch.lua's right before the first byte."""
    found = services()
    poster = found.poster()
    target, other = email(1), email(2)
    enqueue(row(target, "subscribed", T0), row(other, "subscribed", T0))
    [batch_id] = take_all()
    step = (poster.braze, "post") if fenced_by == "the claim" else (poster.store, "fence")
    original = getattr(*step)
    if fenced_by != "the claim":
        turn_a_moment_off()

    def then_erase(*args: Any, **options: Any) -> Any:
        if fenced_by == "the claim":  # the claim wrote the mark: the request may go
            assert redis_client.hexists(found.keys.fences, batch_id)
            erased = run_real("forget", "--email", target)
            assert erased.returncode == 0, erased.stderr
            return original(*args, **options)
        sent = original(*args, **options)
        erased = run_real("forget", "--email", target)
        assert erased.returncode == 0, erased.stderr
        return sent

    setattr(*step, then_erase)
    faults(sim, outage=True)
    assert poster.post(batch_id).status == "retry"
    setattr(*step, original)
    assert keyspace_traces(redis_client, target) == []
    faults(sim, outage=False)
    come_due(batch_id)
    assert poster.post(batch_id).status == "delivered"
    assert keyspace_traces(redis_client, target) == []
    assert sim_states(sim)[other] == "subscribed"


def test_history_tells_an_opt_out_skip(env, sim, redis_client):
    """A subscribed change that asked to respect opt-outs, for someone Braze holds as
    unsubscribed, is left out of the request: its history says so; the others are posted."""
    found = services()
    poster = found.poster()
    set_in_braze(sim.url, GROUP, "unsubscribed", [email(1)])
    enqueue(
        row(email(1), "subscribed", T0, respect_opt_out=True, source="reactivation"),
        row(email(2), "subscribed", T0, respect_opt_out=True),
    )
    [batch_id] = take_all()
    assert poster.post(batch_id).status == "delivered"
    assert sim_states(sim) == {email(1): "unsubscribed", email(2): "subscribed"}
    assert events(email(1)) == ["enqueued", "batched", "skipped_opt_out"]
    assert events(email(2)) == ["enqueued", "batched", "posted"]
    [skipped] = ConsentHistory(found.redis, found.keys).events("email", email(1))[-1:]
    assert skipped.describe().startswith("skipped: opted out in Braze")


def test_history_tells_an_opt_out_skip_of_a_whole_batch(env, sim, redis_client):
    found = services()
    poster = found.poster()
    set_in_braze(sim.url, GROUP, "unsubscribed", [email(1)])
    enqueue(row(email(1), "subscribed", T0, respect_opt_out=True))
    [batch_id] = take_all()
    assert poster.post(batch_id).status == "delivered"
    assert events(email(1)) == ["enqueued", "batched", "skipped_opt_out"]
    assert sim_states(sim) == {email(1): "unsubscribed"}


def test_the_commands_say_when_a_change_is_dropped_as_stale(env, redis_client, tmp_path):
    enqueue(row(email(1), "unsubscribed", T0 + 20))
    result = run_real(
        "enqueue",
        "--group",
        GROUP,
        "--state",
        "subscribed",
        "--email",
        email(1),
        "--occurred-at",
        str(T0 + 10),
    )
    assert result.returncode == 0, result.stderr
    assert "dropped as stale" in result.stderr
    rows = [row(email(n), "subscribed", T0 + 10) for n in (1, 2)]
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_real("import", str(path))
    assert result.returncode == 0, result.stderr
    assert "2 changes enqueued, 1 dropped as stale" in result.stderr
    status = json.loads(run_real("status", "--json").stdout)
    assert status["stale"] == 2
    assert pending_state(email(1)) == "unsubscribed"


def test_a_take_writes_each_members_history_and_record_as_cjson_did(env, redis_client):
    """take_batch.lua writes its members' history entries and record by hand (issue 26: no
    per-member cjson.encode, no number through printf): the same JSON as before, every
    field of a change, a source needing escapes, a delay, equal and unequal occurred and
    arrival times."""
    found = services()
    retention = Retention.from_settings(found.settings)
    rows = [
        row(email(1), "unsubscribed", T0 + 0.5, source='form "A" \\ é', respect_opt_out=True),
        row(email(2), "subscribed", delay_seconds=0.05),
        row(email(3), "subscribed", T0, delay_seconds=0.05),
        row(email(4), "unsubscribed"),
    ]
    enqueue(*rows)
    wanted = {}
    for value in (email(n) for n in range(1, 5)):
        raw = redis_client.hget(found.keys.pending, buffer_field(GROUP, "email", value))
        wanted[value] = json.loads(raw)
    due = max(change["t"] for change in wanted.values())
    wait_for(lambda: server_time_ms(redis_client) > due, what="the delayed changes due")
    members, batch_of = {}, {}
    for batch_id in take_all():
        record = json.loads(redis_client.get(found.keys.batch(batch_id)))
        for member in record["members"]:
            members[member[0]], batch_of[member[0]] = member, batch_id
    for value, change in wanted.items():
        arrival = change["t"] - change.get("d", 0)
        occurred = change.get("w", arrival)
        raw = redis_client.lrange(found.keys.history("email", value), 0, -1)
        (stamp1, _, first), (stamp2, _, second) = (e.decode().partition("\x1f") for e in raw)
        # [value, seq, respect, occurred, digest, head, covered] (issue 26): the digest
        # names the keys, the head is the history's oldest event (its "enqueued", at the
        # arrival), covered the least expiry the take (at "batched") gave the keys.
        assert members[value] == [
            value,
            change["q"],
            change.get("r", 0),
            occurred,
            identity_digest("email", value),
            arrival,
            int(stamp2) + EXPIRY_SLACK_MS + min(retention.history_ms, retention.subject_ms),
        ]
        assert int(stamp1) == arrival and int(stamp2) >= arrival
        expected = {"e": "enqueued", "g": GROUP, "s": change["s"], "q": change["q"]}
        expected.update({k: change[k] for k in ("c", "d", "x") if k in change})
        if "w" in change:
            expected["o"] = change["w"]
        if change.get("r") == 1:
            expected["r"] = 1
        assert json.loads(first) == expected
        batched = {"e": "batched", "g": GROUP, "b": batch_of[value], "q": change["q"]}
        assert json.loads(second) == batched
    assert members[email(1)][2] == 1 and "c" in wanted[email(1)] and "d" in wanted[email(2)]
    assert redis_client.hget(found.keys.subject("email", email(1)), f"w\x1f{GROUP}") == (
        b"%d" % wanted[email(1)]["w"]
    )


def test_a_first_batch_drops_an_enqueued_event_older_than_the_retention(env, redis_client):
    """The take looks at no oldest event of a history it creates (issue 26) unless its own
    first event, the change's arrival, is older than the retention: then it goes."""
    keys = services().keys
    buffer = Buffer(redis_client, keys, retention=Retention(history_ms=300))
    buffer.enqueue([parse_change(row(email(1), "subscribed"))])
    buffer.enqueue([parse_change(row(email(2), "subscribed"))])
    start = server_time_ms(redis_client)
    wait_for(lambda: server_time_ms(redis_client) > start + 300, what="300 ms on Redis's clock")
    now = server_time_ms(redis_client)
    changes, _ = buffer.read_due(now, 10_000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50, linger_ms=0)
    assert len(take_each(buffer, plan, 60_000)) == 1
    for value in (email(1), email(2)):
        story = ConsentHistory(redis_client, keys).events("email", value)
        assert [e.event for e in story] == ["batched"]


def lindex_calls(redis_client: Any) -> int:
    stats = redis_client.info("commandstats")
    return int(stats.get("cmdstat_lindex", {}).get("calls", 0))


def test_a_finish_reads_no_oldest_event_its_take_learnt(env, redis_client):
    """The batch record's members carry their history's oldest time as the take learnt it
    (issue 26): the finish appends its event and trims the history without reading the
    oldest event again, for a history the take created and for one it found (two batches of
    one identifier); the histories are the same as before."""
    found = services()
    enqueue(row(email(1), "subscribed"), row(email(2), "subscribed"))
    first = take_all()
    redis_client.config_resetstat()
    for batch_id in first:
        assert found.batches.claim(batch_id, "w/1", 30_000).status is ClaimStatus.CLAIMED
        assert found.batches.delivered(batch_id, "w/1", http_status=201).status is Ended.ENDED
    assert lindex_calls(redis_client) == 0
    ended = server_time_ms(redis_client)  # the next arrival a millisecond after "posted"
    wait_for(lambda: server_time_ms(redis_client) > ended, what="a millisecond on Redis's clock")
    enqueue(row(email(1), "unsubscribed"))
    [second] = take_all()
    record = json.loads(redis_client.get(found.keys.batch(second)))
    [member] = record["members"]
    oldest = redis_client.lindex(found.keys.history("email", email(1)), 0)
    assert member[5] == int(oldest.split(b"\x1f")[0])  # the take read it: it kept it
    redis_client.config_resetstat()
    assert found.batches.claim(second, "w/1", 30_000).status is ClaimStatus.CLAIMED
    assert found.batches.delivered(second, "w/1", http_status=201).status is Ended.ENDED
    assert lindex_calls(redis_client) == 0
    assert events(email(1)) == ["enqueued", "batched", "posted"] * 2
    assert events(email(2)) == ["enqueued", "batched", "posted"]


def test_a_record_of_the_previous_release_is_finished_as_before(env, redis_client):
    """A batch record a previous release's take wrote (members of four: no digest, no
    oldest time) is finished by this release as it was then: its identifiers' keys named
    by their SHA-1, the oldest event read; a rolling upgrade finishes every record."""
    found = services()
    enqueue(row(email(1), "subscribed"), row(email(2), "unsubscribed"))
    batches = take_all()
    for batch_id in batches:
        key = found.keys.batch(batch_id)
        record = json.loads(redis_client.get(key))
        record["members"] = [member[:4] for member in record["members"]]
        redis_client.set(key, json.dumps(record))
        assert found.batches.claim(batch_id, "w/1", 30_000).status is ClaimStatus.CLAIMED
        assert found.batches.delivered(batch_id, "w/1", http_status=201).status is Ended.ENDED
    for value in (email(1), email(2)):
        assert events(value) == ["enqueued", "batched", "posted"]
        assert redis_client.hget(found.keys.subject("email", value), f"w\x1f{GROUP}")


def test_a_finish_drops_events_past_the_retention_though_its_take_knew_the_oldest(
    env, redis_client
):
    """The oldest time a member carries spares the finish its look at the history only
    while it is within the retention: past it, the finish reads and drops as before. (The
    history lives on meanwhile by a later event: a pending change superseded.)"""
    keys = services().keys
    retention = Retention(history_ms=2_000)
    buffer = Buffer(redis_client, keys, retention=retention)
    batches = BatchStore(redis_client, keys, retention=retention)
    buffer.enqueue([parse_change(row(email(1), "subscribed"))])
    now = server_time_ms(redis_client)
    changes, _ = buffer.read_due(now, 10_000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50, linger_ms=0)
    [(batch_id, size)] = take_each(buffer, plan, 60_000)
    assert size == 1
    assert batches.claim(batch_id, "w/1", 30_000).status is ClaimStatus.CLAIMED
    taken = server_time_ms(redis_client)
    wait_for(lambda: server_time_ms(redis_client) > taken + 1_000, what="1 s on Redis's clock")
    buffer.enqueue([parse_change(row(email(1), s)) for s in ("unsubscribed", "subscribed")])
    history = keys.history("email", email(1))
    held = [raw.partition(b"\x1f")[2] for raw in redis_client.lrange(history, 0, -1)]
    assert [json.loads(event)["e"] for event in held[:2]] == ["enqueued", "batched"]
    wait_for(lambda: server_time_ms(redis_client) > taken + 2_100, what="past the retention")
    assert batches.delivered(batch_id, "w/1", http_status=201).status is Ended.ENDED
    held = [raw.partition(b"\x1f")[2] for raw in redis_client.lrange(history, 0, -1)]
    assert [json.loads(event)["e"] for event in held] == ["enqueued", "superseded", "posted"]
