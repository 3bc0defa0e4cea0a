"""Batch records: claim, fence, finish (delivered / dead-lettered), defer into the schedule,
take back from dead workers, against real Redis.

Covers the guarantees stated at the top of `stores/lua/claim_batch.lua`, `fence_batch.lua`,
`finish_batch.lua`, `defer_batch.lua`, `take_back.lua`, `dispatch_due.lua`,
`sweep_batches.lua`, `release_waiting.lua` and `heartbeat.lua`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from admin.status import read_status
from config.settings import load_settings
from core.changes import parse_change
from core.planning import plan_batches
from core.waiting import WaitReason
from delivery.coalescer import Coalescer
from delivery.services import services
from stores.batch_records import (
    BatchStore,
    ClaimStatus,
    Deferral,
    Deferred,
    Ended,
    Finish,
    TakeBack,
)
from stores.buffer import Buffer
from stores.clock import server_time_ms
from stores.dead_letters import DeadLetters
from stores.keys import buffer_field
from stores.scripts import Scripts
from tests.conftest import email, take_each, wait_for
from tests.lost_reply import ReplyLosingRelay

GROUP = "news"
LEASE_MS = 30_000
GRACE_MS = 120_000
# Claim tokens name their worker ("worker id/random"); the worker's heartbeat keeps them.
A, B, C, D = "worker-a/1", "worker-b/1", "worker-c/1", "worker-d/1"


def beat(worker: str, ttl_ms: int = 60_000) -> None:
    services().heartbeats.beat(worker, ttl_ms)


def defer(batch_id: str, token: str, **options: Any) -> Deferral:
    values: dict[str, Any] = {
        "error": "HTTP 503",
        "count_attempt": True,
        "due_in_ms": 5_000,
        "reason": WaitReason.RETRY,
        "grace_ms": GRACE_MS,
    }
    values.update(options)
    return services().batches.defer(batch_id, token, **values)


def take_back(on_wire_ms: int = 0) -> TakeBack:
    """The tick's take-back, with every listed worker a suspect (the script checks each
    heartbeat itself); `on_wire_ms`: how long a dead holder's sent request is waited for."""
    workers = [raw.decode() for raw in services().redis.zrange(services().keys.workers, 0, -1)]
    return services().batches.take_back(workers, on_wire_ms=on_wire_ms, grace_ms=GRACE_MS)


def claimed(batch_id: str, token: str) -> None:
    assert services().batches.claim(batch_id, token, LEASE_MS).status is ClaimStatus.CLAIMED


def field(value: str) -> str:
    return buffer_field(GROUP, "email", value)


def enqueue(buffer: Buffer, values: list[str], state: str = "subscribed", **extra: Any) -> None:
    buffer.enqueue(
        [
            parse_change(
                {"subscription_group_id": GROUP, "subscription_state": state, "email": v, **extra}
            )
            for v in values
        ]
    )


def make_batch(values: list[str], state: str = "subscribed") -> str:
    """Enqueue the values and take them into one batch; returns its id."""
    buffer = services().buffer
    enqueue(buffer, values, state)
    now = server_time_ms(buffer.client)
    changes, _ = buffer.read_due(now, 1000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)
    [(batch_id, size)] = take_each(buffer, plan, 60_000)
    assert size == len(values)
    return batch_id


def inflight(redis_client: Any) -> dict[str, str]:
    keys = services().keys
    return {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.inflight).items()}


def due(redis_client: Any) -> set[str]:
    """The due fields of both lanes."""
    keys = services().keys
    return {
        raw.decode()
        for name in (keys.due, keys.due_live)
        for raw in redis_client.zrange(name, 0, -1)
    }


def raw_record(redis_client: Any, batch_id: str) -> dict[str, Any] | None:
    raw = redis_client.get(services().keys.batch(batch_id))
    return None if raw is None else json.loads(raw)


# --------------------------------------------------------------------------------------
# claim
# --------------------------------------------------------------------------------------


def test_claim_returns_the_record_and_a_second_token_is_busy(env, redis_client):
    store, keys = services().batches, services().keys
    batch_id = make_batch([email(1), email(2)])

    first = store.claim(batch_id, A, LEASE_MS)
    assert first.status is ClaimStatus.CLAIMED
    assert first.record is not None
    assert first.record.id == batch_id
    assert sorted(first.record.values) == [email(1), email(2)]
    assert first.record.key.group_id == GROUP
    assert first.record.attempts == 0
    assert redis_client.hget(keys.claim_tokens, batch_id) == A.encode()

    second = store.claim(batch_id, B, LEASE_MS)
    assert second.status is ClaimStatus.BUSY
    assert second.record is None
    # The holder may renew its own claim.
    assert store.claim(batch_id, A, LEASE_MS).status is ClaimStatus.CLAIMED
    # A claim pushes the sweep deadline and the lease to the lease's end.
    now = server_time_ms(redis_client)
    assert redis_client.zscore(keys.batches, batch_id) >= now + LEASE_MS - 5_000
    assert redis_client.zscore(keys.claims, batch_id) >= now + LEASE_MS - 5_000


def test_an_expired_lease_is_not_claimable_until_the_tick_takes_it_back(env, redis_client):
    store = services().batches
    batch_id = make_batch([email(1)])
    beat("worker-a")
    assert store.claim(batch_id, A, 50).status is ClaimStatus.CLAIMED
    wait_for(
        lambda: (
            server_time_ms(redis_client) > redis_client.zscore(services().keys.claims, batch_id)
        ),
        timeout=5,
        what="the lease to end",
    )
    # Only take_back ends a claim that is not the caller's: a message cannot.
    assert store.claim(batch_id, B, LEASE_MS).status is ClaimStatus.BUSY
    assert take_back().batch_ids == (batch_id,)
    # Taken back: it waits in the schedule, due now, until the tick sends it a message.
    assert store.claim(batch_id, B, LEASE_MS).status is ClaimStatus.WAITING
    assert store.dispatch_due(1000, GRACE_MS) == [batch_id]
    claimed(batch_id, B)
    # The old holder's operations change nothing.
    assert store.delivered(batch_id, A) == Finish(Ended.LOST)
    assert defer(batch_id, A) == Deferral(Deferred.LOST)
    assert store.delivered(batch_id, B) == Finish(Ended.ENDED, 1)


def test_claim_of_a_finished_batch_is_gone(env):
    store = services().batches
    batch_id = make_batch([email(1)])
    claimed(batch_id, A)
    assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 1)
    assert store.claim(batch_id, A, LEASE_MS).status is ClaimStatus.GONE
    assert store.claim("no-such-batch", A, LEASE_MS).status is ClaimStatus.GONE


def test_claim_prunes_superseded_members_and_releases_their_lock(env, redis_client):
    found = services()
    buffer, store = found.buffer, found.batches
    batch_id = make_batch([email(1), email(2), email(3)], "subscribed")

    enqueue(buffer, [email(2)], "unsubscribed")  # newer: waits for the lock
    assert field(email(2)) not in due(redis_client)

    claim = store.claim(batch_id, A, LEASE_MS)
    assert claim.status is ClaimStatus.CLAIMED
    assert sorted(claim.record.values) == [email(1), email(3)]
    assert sorted(m[0] for m in raw_record(redis_client, batch_id)["members"]) == [
        email(1),
        email(3),
    ]
    assert inflight(redis_client) == {field(email(1)): batch_id, field(email(3)): batch_id}
    assert due(redis_client) == {field(email(2))}
    changes, _ = buffer.read_due(server_time_ms(redis_client), 100)
    assert [(c.value, c.state.value) for c in changes] == [(email(2), "unsubscribed")]

    # Finishing the batch ends only the members it still holds.
    assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 2)
    assert inflight(redis_client) == {}
    assert buffer.pending_count() == 1


def test_claim_with_every_member_superseded_is_empty_and_ends_the_batch(env, redis_client):
    found = services()
    buffer, store = found.buffer, found.batches
    keys = found.keys
    batch_id = make_batch([email(1), email(2)], "subscribed")
    enqueue(buffer, [email(1), email(2)], "unsubscribed")

    claim = store.claim(batch_id, A, LEASE_MS)
    assert claim.status is ClaimStatus.EMPTY
    # The record as it was, so the rest of its pack can still be sent.
    assert claim.record is not None and claim.record.id == batch_id
    assert redis_client.exists(keys.batch(batch_id)) == 0
    assert redis_client.hexists(keys.claim_tokens, batch_id) == 0
    assert redis_client.zscore(keys.claims, batch_id) is None
    assert redis_client.zscore(keys.batches, batch_id) is None
    assert inflight(redis_client) == {}
    assert due(redis_client) == {field(email(1)), field(email(2))}
    assert store.claim(batch_id, A, LEASE_MS).status is ClaimStatus.GONE


# Values a batch record's JSON must carry exactly: JSON's punctuation unescaped (a
# member's `]`, `,`, `[`, `]]}`, `:`) and UTF-8, which the claim reads without decoding
# the members; and the escaped (a quote, a backslash, cjson's `\/`), which it decodes.
PLAIN = ["a],[b", "c,members:[d", "k\u00e9l", "m]]}", "[n]", "o:p"]
ESCAPED = ['q"r', "s\\t", "u/v", 'w",["x', '"members":["y']


@pytest.mark.parametrize("awkward", [[], PLAIN, PLAIN + ESCAPED])
def test_a_full_batch_is_claimed_as_stored_and_its_superseded_member_still_leaves(
    env, redis_client, awkward
):
    """The claim reads a record without decoding its members when the layout allows
    (`record_head` in _prelude.lua, issue 26: no backslash anywhere) and decodes it whole
    otherwise: the same answers either way. A full batch (no room for a top-up) with no
    member superseded is answered and kept byte for byte as stored; one with a superseded
    member (each awkward value in turn) loses exactly that member, whose lock is released
    and whose newer change becomes due."""
    found = services()
    buffer, store, keys = found.buffer, found.batches, found.keys
    values = awkward + [f"user-{n}" for n in range(50 - len(awkward))]

    def ext(value: str, state: str = "subscribed") -> Any:
        return parse_change(
            {"subscription_group_id": GROUP, "subscription_state": state, "external_id": value}
        )

    def full_batch() -> str:
        buffer.enqueue([ext(v) for v in values])
        now = server_time_ms(redis_client)
        changes, _ = buffer.read_due(now, 1000)
        [(batch_id, size)] = take_each(
            buffer, plan_batches(changes, now_ms=now, max_identifiers=50), 60_000
        )
        assert size == 50
        return batch_id

    batch_id = full_batch()
    stored = redis_client.get(keys.batch(batch_id))
    claim = store.claim(batch_id, A, LEASE_MS, top_up_to=50)
    assert claim.status is ClaimStatus.CLAIMED
    assert claim.record is not None and sorted(claim.record.values) == sorted(values)
    assert redis_client.get(keys.batch(batch_id)) == stored
    assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 50)

    for n, value in enumerate(awkward or values[:1]):
        batch_id = full_batch()
        buffer.enqueue([ext(value, "unsubscribed")])  # newer: waits for the lock
        claim = store.claim(batch_id, A, LEASE_MS, top_up_to=50)
        assert claim.status is ClaimStatus.CLAIMED, value
        assert claim.record is not None
        assert sorted(claim.record.values) == sorted(v for v in values if v != value), value
        superseded = buffer_field(GROUP, "external_id", value)
        assert superseded not in inflight(redis_client), value
        assert due(redis_client) == {superseded}, value
        assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 49), value
        changes, _ = buffer.read_due(server_time_ms(redis_client), 100)
        [(drained, size)] = take_each(
            buffer,
            plan_batches(changes, now_ms=server_time_ms(redis_client), max_identifiers=50),
            60_000,
        )
        assert size == 1
        claimed(drained, B)
        assert store.delivered(drained, B) == Finish(Ended.ENDED, 1)
        assert inflight(redis_client) == {} and buffer.pending_count() == 0, n


# --------------------------------------------------------------------------------------
# delivered / dead_letter
# --------------------------------------------------------------------------------------


def test_delivered_releases_locks_and_deletes_the_record(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2)])
    claimed(batch_id, A)

    assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 2)
    assert inflight(redis_client) == {}
    assert redis_client.exists(keys.batch(batch_id)) == 0
    assert redis_client.hlen(keys.claim_tokens) == 0
    assert redis_client.zcard(keys.claims) == 0
    assert redis_client.zscore(keys.batches, batch_id) is None
    assert store.count() == 0
    status = read_status(redis_client, keys)
    assert (status.in_flight, status.batches_in_flight, status.delivered_total) == (0, 0, 2)
    # Ends exactly once: the claim ended with it.
    assert store.delivered(batch_id, A) == Finish(Ended.LOST)


def test_finish_by_a_token_that_does_not_hold_the_claim_changes_nothing(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2)])
    # Unclaimed: nobody may end it.
    assert store.delivered(batch_id, A) == Finish(Ended.LOST)
    claimed(batch_id, A)
    before = raw_record(redis_client, batch_id)
    locks = inflight(redis_client)

    assert store.delivered(batch_id, B) == Finish(Ended.LOST)
    assert store.dead_letter(batch_id, B, "nope") == Finish(Ended.LOST)
    assert raw_record(redis_client, batch_id) == before
    assert inflight(redis_client) == locks
    assert redis_client.hget(keys.claim_tokens, batch_id) == A.encode()
    assert redis_client.zscore(keys.batches, batch_id) is not None
    assert redis_client.hlen(keys.dead_letters) == 0

    assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 2)


def test_finish_releases_the_lock_of_a_waiting_newer_change(env, redis_client):
    found = services()
    buffer, store = found.buffer, found.batches
    batch_id = make_batch([email(1)], "subscribed")
    claimed(batch_id, A)
    enqueue(buffer, [email(1)], "unsubscribed", delay_seconds=120)

    assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 1)
    # The waiting change keeps its own due time (its delay) once it becomes due.
    score = redis_client.zscore(found.keys.due_live, field(email(1)))  # enqueued live
    assert score >= server_time_ms(redis_client) + 100_000
    assert buffer.read_due(server_time_ms(redis_client), 10) == ([], False)


def test_dead_letter_writes_an_entry_and_counts_its_identifiers(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2), email(3)], "unsubscribed")
    claimed(batch_id, A)
    assert defer(batch_id, A, due_in_ms=0) == Deferral(Deferred.DEFERRED, 1)
    assert store.dispatch_due(1000, GRACE_MS) == [batch_id]
    claimed(batch_id, A)

    assert store.dead_letter(batch_id, A, "HTTP 400: Invalid email") == Finish(Ended.ENDED, 3)

    raw = redis_client.hget(keys.dead_letters, batch_id)
    assert raw is not None
    entry = json.loads(raw)
    assert entry["id"] == batch_id
    assert entry["subscription_group_id"] == GROUP
    assert entry["subscription_state"] == "unsubscribed"
    assert entry["error"] == "HTTP 400: Invalid email"
    assert entry["attempts"] == 2  # the deferred attempt and the one that gave up
    assert sorted((i["kind"], i["value"]) for i in entry["identifiers"]) == [
        ("email", email(n)) for n in (1, 2, 3)
    ]
    assert int(redis_client.get(keys.dead_letter_identifiers)) == 3
    assert redis_client.zscore(keys.dead_letter_index, batch_id) is not None
    assert inflight(redis_client) == {}
    assert redis_client.exists(keys.batch(batch_id)) == 0
    assert store.count() == 0

    [listed] = DeadLetters(redis_client, keys).list()
    assert listed.id == batch_id
    assert listed.attempts == 2
    assert read_status(redis_client, keys).dead_letter == 3

    # A second batch adds to the count.
    other = make_batch([email(4)])
    claimed(other, A)
    assert store.dead_letter(other, A, "boom") == Finish(Ended.ENDED, 1)
    assert int(redis_client.get(keys.dead_letter_identifiers)) == 4


# --------------------------------------------------------------------------------------
# defer: the schedule
# --------------------------------------------------------------------------------------


def test_defer_puts_the_batch_into_the_schedule_and_keeps_locks(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2)])
    locks = inflight(redis_client)

    claimed(batch_id, A)
    deferred = defer(
        batch_id, A, error="429 from Braze", count_attempt=False, reason=WaitReason.PAUSED
    )
    assert deferred == Deferral(Deferred.DEFERRED, 0)
    record = raw_record(redis_client, batch_id)
    assert record["attempts"] == 0
    assert record["error"] == "429 from Braze"
    assert inflight(redis_client) == locks
    assert redis_client.hlen(keys.claim_tokens) == 0  # the claim is released
    now = server_time_ms(redis_client)
    assert now < redis_client.zscore(keys.schedule, batch_id) <= now + 5_000
    assert redis_client.hget(keys.schedule_reasons, batch_id) == b"paused"

    # A message for it now (a duplicate, a late one) posts nothing: it waits.
    assert store.claim(batch_id, B, LEASE_MS).status is ClaimStatus.WAITING
    assert store.dispatch_due(1000, GRACE_MS) == []  # not due yet


def test_due_batches_leave_the_schedule_once_and_attempts_accumulate(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2)])
    locks = inflight(redis_client)

    for attempt, token in enumerate((A, B, C), start=1):
        claimed(batch_id, token)
        assert defer(batch_id, token, error=f"e{attempt}", due_in_ms=0) == Deferral(
            Deferred.DEFERRED, attempt
        )
        assert store.dispatch_due(1000, GRACE_MS) == [batch_id]
        assert store.dispatch_due(1000, GRACE_MS) == []  # taken once: one message
    claim = store.claim(batch_id, D, LEASE_MS)
    assert claim.record.attempts == 3
    assert claim.record.last_error == "e3"
    assert inflight(redis_client) == locks
    assert redis_client.zcard(keys.schedule) == 0
    assert redis_client.hlen(keys.schedule_reasons) == 0

    # A newer change for a member still waits: defer keeps the lock.
    enqueue(found.buffer, [email(1)], "unsubscribed")
    assert defer(batch_id, D, count_attempt=False) == Deferral(Deferred.DEFERRED, 3)
    assert field(email(1)) not in due(redis_client)


def test_defer_by_another_token_or_of_a_gone_batch_is_refused(env, redis_client):
    store = services().batches
    batch_id = make_batch([email(1)])
    claimed(batch_id, A)
    before = raw_record(redis_client, batch_id)
    assert defer(batch_id, B) == Deferral(Deferred.LOST)
    assert raw_record(redis_client, batch_id) == before
    assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 1)
    assert defer(batch_id, A) == Deferral(Deferred.LOST)


def test_release_makes_the_batches_waiting_for_a_reason_due_now(env, redis_client):
    store, keys = services().batches, services().keys
    waiting_key = make_batch([email(1)])
    retrying = make_batch([email(2)], "unsubscribed")
    claimed(waiting_key, A)
    claimed(retrying, A)
    defer(waiting_key, A, due_in_ms=60_000, reason=WaitReason.CREDENTIALS, count_attempt=False)
    defer(retrying, A, due_in_ms=60_000)
    assert store.dispatch_due(1000, GRACE_MS) == []

    assert store.release_waiting(WaitReason.CREDENTIALS) == 1
    assert store.dispatch_due(1000, GRACE_MS) == [waiting_key]
    assert redis_client.zscore(keys.schedule, retrying) is not None


# --------------------------------------------------------------------------------------
# fence, heartbeats, take back, the sweep
# --------------------------------------------------------------------------------------


def test_fence_passes_only_for_the_holder_with_lease_enough_left(env, redis_client):
    store, keys = services().batches, services().keys
    batch_id = make_batch([email(1)])
    other = make_batch([email(2)], "unsubscribed")
    assert store.fence([batch_id], A, 10_000) is False  # unclaimed
    claimed(batch_id, A)
    assert store.fence([batch_id], B, 10_000) is False
    assert store.fence([batch_id], A, LEASE_MS + 1_000) is False  # the lease is too short
    assert redis_client.hlen(keys.fences) == 0
    assert store.fence([batch_id], A, 10_000) is True
    assert redis_client.hexists(keys.fences, batch_id)
    # All batches of one request, or none.
    assert store.fence([batch_id, other], A, 10_000) is False


def test_heartbeat_extends_the_leases_of_claims_still_held(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1)])
    other = make_batch([email(2)], "unsubscribed")
    assert store.claim(batch_id, A, 1_000).status is ClaimStatus.CLAIMED
    assert store.claim(other, B, 1_000).status is ClaimStatus.CLAIMED
    extended = found.heartbeats.beat(
        "worker-a", 5_000, claims=[(batch_id, A), (other, A)], lease_ms=LEASE_MS
    )
    assert extended == 1  # `other` is not worker-a's
    now = server_time_ms(redis_client)
    assert redis_client.zscore(keys.claims, batch_id) >= now + LEASE_MS - 5_000
    assert redis_client.zscore(keys.claims, other) <= now + 1_000
    assert found.heartbeats.alive("worker-a")
    assert found.heartbeats.suspects(now, 5_000) == []
    # A clean stop: gone at once, and a suspect for the next tick (whatever it held).
    found.heartbeats.stop("worker-a")
    assert not found.heartbeats.alive("worker-a")
    assert found.heartbeats.suspects(now, 5_000) == ["worker-a"]
    assert take_back().batch_ids == (batch_id,)
    assert found.heartbeats.suspects(now, 5_000) == []  # reaped: it held nothing more


def test_take_back_takes_only_from_workers_whose_heartbeat_is_gone(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    alive_batch = make_batch([email(1)])
    dead_batch = make_batch([email(2)], "unsubscribed")
    beat("worker-a")
    beat("worker-b", ttl_ms=200)
    claimed(alive_batch, A)
    claimed(dead_batch, B)
    assert store.fence([dead_batch], B, 10_000)  # it was sent: the outcome is unknown
    assert take_back().batch_ids == ()  # both alive

    wait_for(lambda: not found.heartbeats.alive("worker-b"), timeout=5, what="b's heartbeat")
    # Its request may still be on the wire: not taken back before it has timed out.
    assert take_back(on_wire_ms=60_000).batch_ids == ()
    taken = take_back()
    assert (taken.batch_ids, taken.sent_before) == ((dead_batch,), 1)
    assert redis_client.hget(keys.claim_tokens, alive_batch) == A.encode()
    assert redis_client.hget(keys.schedule_reasons, dead_batch) == b"recovered"
    assert take_back().batch_ids == ()  # once
    # The dead worker, thawed, can neither send nor end it; a live one posts it.
    assert store.fence([dead_batch], B, 10_000) is False
    assert store.dispatch_due(1000, GRACE_MS) == [dead_batch]
    claimed(dead_batch, C)
    assert store.delivered(dead_batch, B) == Finish(Ended.LOST)
    assert store.delivered(dead_batch, C) == Finish(Ended.ENDED, 1)
    assert inflight(redis_client) == {field(email(1)): alive_batch}


def test_a_workers_death_schedules_every_batch_between_message_and_claim_once(env, redis_client):
    """A message fetched from the broker is gone from it before the worker reads it: if
    the worker dies then, the message dies with it, and nothing tells which batch it was
    for. So the first take-back after a death schedules every batch whose message is out,
    once; a message still queued finds its batch waiting and posts nothing."""
    found = services()
    store = found.batches
    messaged = make_batch([email(1)])  # its message is out: with whom, no one knows
    held = make_batch([email(2)])
    waiting = make_batch([email(3)])
    beat("worker-a")
    beat("worker-b", ttl_ms=200)
    claimed(held, A)
    claimed(waiting, A)
    defer(waiting, A, due_in_ms=60_000)
    assert take_back().batch_ids == ()  # no one dead: nothing moves

    wait_for(lambda: not found.heartbeats.alive("worker-b"), timeout=5, what="b's heartbeat")
    assert take_back().batch_ids == (messaged,)  # held (a live holder) and waiting stay
    assert redis_client.hget(found.keys.schedule_reasons, messaged) == b"recovered"
    # The old message, if it was still queued, posts nothing; the tick sends a new one.
    assert store.claim(messaged, C, LEASE_MS).status is ClaimStatus.WAITING
    assert store.dispatch_due(1000, GRACE_MS) == [messaged]
    # Once per death: the next ticks leave messages alone (and b, holding nothing, is gone).
    assert take_back().batch_ids == ()
    assert redis_client.zscore(found.keys.workers, "worker-b") is None
    claimed(messaged, C)


def test_the_sweep_sends_again_only_batches_neither_claimed_nor_waiting(env, redis_client):
    store = services().batches
    sent = make_batch([email(1)])
    held = make_batch([email(2)])
    waiting = make_batch([email(3)])
    claimed(held, A)
    claimed(waiting, A)
    defer(waiting, A, due_in_ms=0)
    assert store.sweep(1000, 0) == []  # nothing past its deadline (take_batch: 60 s)
    redis_client.zadd(services().keys.batches, {sent: 0, held: 0, waiting: 0})
    assert store.sweep(1000, GRACE_MS) == [sent]
    assert store.sweep(1000, GRACE_MS) == []  # its deadline moved on


def test_split_halves_wait_in_the_schedule_due_now(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(n) for n in range(1, 5)])
    claimed(batch_id, A)
    assert store.split(batch_id, B, isolate=None, grace_ms=GRACE_MS) is None  # not B's
    first, second = store.split(batch_id, A, isolate=email(3), grace_ms=GRACE_MS)
    # No message is left to the splitting worker: the tick sends both.
    assert sorted(store.dispatch_due(1000, GRACE_MS)) == sorted([first, second])
    assert redis_client.exists(keys.batch(batch_id)) == 0
    assert redis_client.hlen(keys.claim_tokens) == 0
    assert [m[0] for m in raw_record(redis_client, first)["members"]] == [email(3)]
    assert set(inflight(redis_client).values()) == {first, second}


def test_an_emptied_lead_schedules_the_rest_of_its_pack(env, redis_client):
    found = services()
    buffer, store, keys = found.buffer, found.batches, found.keys
    enqueue(buffer, [email(1)])
    enqueue(buffer, [email(2)], "unsubscribed")
    now = server_time_ms(redis_client)
    changes, _ = buffer.read_due(now, 10)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)
    [pack] = buffer.take([plan], 60_000)  # one v2 pack of two batches
    (lead, _), (sibling, _) = pack
    lead_value = email(1) if raw_record(redis_client, lead)["state"] == "subscribed" else email(2)
    flipped = "unsubscribed" if lead_value == email(1) else "subscribed"
    enqueue(buffer, [lead_value], flipped)  # the lead's only member is superseded

    assert store.claim(lead, A, LEASE_MS).status is ClaimStatus.EMPTY
    # Its sibling was to travel with the lead's message: it is due now instead.
    assert redis_client.hget(keys.schedule_reasons, sibling) == b"ready"
    assert store.dispatch_due(1000, GRACE_MS) == [sibling]
    claimed(sibling, A)


def test_expedite_makes_a_waiting_batch_due_now_and_never_later(env, redis_client):
    store, keys = services().batches, services().keys
    batch_id = make_batch([email(1)])
    assert store.expedite(batch_id) is False  # not waiting
    claimed(batch_id, A)
    defer(batch_id, A, due_in_ms=60_000, reason=WaitReason.HELD, count_attempt=False)
    assert store.dispatch_due(1000, GRACE_MS) == []
    assert store.expedite(batch_id) is True
    assert store.dispatch_due(1000, GRACE_MS) == [batch_id]
    assert redis_client.zscore(keys.schedule, batch_id) is None


def test_a_claim_taken_back_and_ended_by_the_next_holder_is_lost_not_gone(env, redis_client):
    """The old holder froze after sending, the batch was taken back and ended by its next
    holder: the old holder's finish must say `lost` (it must not report a delivery), not
    `gone` (which it could take for its own success)."""
    store = services().batches
    batch_id = make_batch([email(1)])
    beat("worker-a")
    beat("worker-b", ttl_ms=200)
    claimed(batch_id, B)
    assert store.fence([batch_id], B, 10_000)
    wait_for(lambda: not services().heartbeats.alive("worker-b"), timeout=5, what="b's beat")
    assert take_back().batch_ids == (batch_id,)
    assert store.dispatch_due(1000, GRACE_MS) == [batch_id]
    claimed(batch_id, A)
    assert store.delivered(batch_id, A) == Finish(Ended.ENDED, 1)
    assert store.delivered(batch_id, B) == Finish(Ended.LOST)
    assert defer(batch_id, B) == Deferral(Deferred.LOST)
    assert store.dead_letter(batch_id, B, "late") == Finish(Ended.LOST)


# --------------------------------------------------------------------------------------
# ends lost with a failed-over master (recover_orphans.lua through the heartbeat)
# --------------------------------------------------------------------------------------


def test_ends_lost_with_the_master_are_found_by_the_beat_after_redis_failed(
    env, redis_client, monkeypatch
):
    """This process ended three claims, then a beat failed (the master was killed). On the
    new master one of them is still claimed in its ended token (the end was lost), one was
    ended for real, one was taken over by another worker. The next beat that goes through
    puts the first back into the schedule, due now, and leaves the others alone; a beat
    that follows no failure checks nothing, and an end older than RECENT_ENDS_SECONDS
    before the failure is not checked (the lease frees it)."""
    import delivery.liveness as liveness_module

    store, keys = services().batches, services().keys
    live = services().liveness
    lost, ended, taken_over, old = (make_batch([email(n)]) for n in (1, 2, 3, 4))
    tokens = {lost: "me/lost", ended: "me/ended", taken_over: "me/taken", old: "me/old"}
    for batch_id, token in tokens.items():
        claimed(batch_id, token)
        live.hold(batch_id, token)
    monkeypatch.setattr(liveness_module, "RECENT_ENDS_SECONDS", 0.5)
    live.release_token(tokens[old])  # long before the failure
    time.sleep(0.6)  # past RECENT_ENDS_SECONDS: the one thing this test waits out
    assert store.delivered(ended, tokens[ended]).status is Ended.ENDED
    beat("worker-b")
    redis_client.hset(keys.claim_tokens, taken_over, B)  # the take-over and B's new claim
    for batch_id in (lost, ended, taken_over):
        live.release_token(tokens[batch_id])

    live.beat()  # no failure: nothing is checked
    assert redis_client.hget(keys.claim_tokens, lost) == tokens[lost].encode()

    live.redis_failed()
    live.beat()
    assert redis_client.hget(keys.schedule_reasons, lost) == b"recovered"
    assert redis_client.hget(keys.claim_tokens, lost) is None
    assert store.dispatch_due(1000, GRACE_MS) == [lost]
    assert redis_client.hget(keys.claim_tokens, taken_over) == B.encode()
    assert redis_client.hget(keys.claim_tokens, old) == tokens[old].encode()  # the lease's
    assert raw_record(redis_client, ended) is None  # finished: never revived
    live.beat()  # checked once
    assert store.dispatch_due(1000, GRACE_MS) == []


def test_an_end_lost_with_the_master_is_found_after_a_beat_that_rode_the_outage_out(
    env, redis_client
):
    """redis-py's cluster client tries a command again for seconds, following the slot map
    to the promoted replica: a beat during a failover may go through late, without an
    error (the kill test's worker logged no failed beat in 16 runs of 29 here, and took
    nothing back in 15 of those: an end lost there waited for the lease). Redis holds
    the beat back (CLIENT PAUSE WRITE, 0.8 s) after this process ended a claim whose end
    the "new master" does not have: the slow beat checks it, due now. Before, only a beat
    that raised did: the lease (60 s) freed it."""
    keys, live = services().keys, services().liveness
    lost = make_batch([email(1)])
    claimed(lost, "me/lost")
    live.hold(lost, "me/lost")
    live.release_token("me/lost")  # ended on the master that died; not on this one
    redis_client.execute_command("CLIENT", "PAUSE", 800, "WRITE")
    live.beat()
    assert redis_client.hget(keys.schedule_reasons, lost) == b"recovered"
    assert redis_client.hget(keys.claim_tokens, lost) is None
    assert services().batches.dispatch_due(1000, GRACE_MS) == [lost]


def test_the_end_of_a_post_in_progress_when_redis_failed_is_checked_once_it_ends(env, redis_client):
    """A post ended its claim on the master just before it died, then waited out the
    outage in its next Redis call (the rate-limit headers, the counters) and let the claim
    go only after a beat had failed: that end is checked by the next beat too. Before, the
    check took only the ends let go of before the failure: the lease (60 s) freed it."""
    keys, live = services().keys, services().liveness
    lost = make_batch([email(1)])
    claimed(lost, "me/lost")
    live.hold(lost, "me/lost")
    live.redis_failed()  # a beat failed while the post was in progress
    live.release_token("me/lost")  # its end was lost with the master
    live.beat()
    assert redis_client.hget(keys.schedule_reasons, lost) == b"recovered"
    assert services().batches.dispatch_due(1000, GRACE_MS) == [lost]
    live.hold(lost, "me/again")  # a later post of the same process, after the check
    live.release_token("me/again")
    live.beat()  # not watched: nothing checked
    assert redis_client.zscore(keys.schedule, lost) is None


def test_a_slow_beat_without_a_failover_changes_no_batch_that_ended_waits_or_is_held(
    env, redis_client
):
    """A beat slow for another reason than a failover (a busy Redis; CLIENT PAUSE WRITE
    holds it 0.8 s here) counts as a failed one: the ends before it, and those of the posts
    in progress at it once they end, are checked. With no end lost, the check changes
    nothing: a batch delivered stays ended, one waiting in the schedule keeps its due time
    and reason, one another worker claimed since keeps that claim (a live holder is never
    taken from), and a post still in progress keeps its claim. (The false alarm's cost,
    README's failover section: one recover_orphans call.)"""
    store, keys, live = services().batches, services().keys, services().liveness
    done, reclaimed, waiting, later, ongoing = (make_batch([email(n)]) for n in range(1, 6))
    tokens = {
        done: "me/done",
        reclaimed: "me/re",
        waiting: "me/wait",
        later: "me/later",
        ongoing: "me/on",
    }
    for batch_id, token in tokens.items():
        claimed(batch_id, token)
        live.hold(batch_id, token)
    # Ended before the slow beat: one delivered, one given back due now and claimed since
    # by another worker, whose post is in progress.
    assert store.delivered(done, tokens[done]).status is Ended.ENDED
    live.release_token(tokens[done])
    defer(reclaimed, tokens[reclaimed], count_attempt=False, due_in_ms=0, reason=WaitReason.READY)
    live.release_token(tokens[reclaimed])
    assert store.dispatch_due(1000, GRACE_MS) == [reclaimed]
    beat("worker-b")
    claimed(reclaimed, B)

    redis_client.execute_command("CLIENT", "PAUSE", 800, "WRITE")
    started = time.monotonic()
    live.beat()  # slow: checked as after a failure
    assert time.monotonic() - started >= 0.5
    # The posts in progress at it end: one waits for its retry, one is delivered.
    defer(waiting, tokens[waiting])
    live.release_token(tokens[waiting])
    due_at = redis_client.zscore(keys.schedule, waiting)
    assert store.delivered(later, tokens[later]).status is Ended.ENDED
    live.release_token(tokens[later])
    live.beat()  # their ends are checked

    assert raw_record(redis_client, done) is None
    assert raw_record(redis_client, later) is None
    assert redis_client.hget(keys.claim_tokens, reclaimed) == B.encode()
    assert redis_client.zscore(keys.schedule, reclaimed) is None
    assert redis_client.hget(keys.claim_tokens, ongoing) == tokens[ongoing].encode()
    assert redis_client.zscore(keys.schedule, waiting) == due_at
    assert redis_client.hget(keys.schedule_reasons, waiting) == b"retry"
    assert b"recovered" not in redis_client.hvals(keys.schedule_reasons)
    assert store.dispatch_due(1000, GRACE_MS) == []


# --------------------------------------------------------------------------------------
# a tick's hand-outs sent again after their reply was lost (redis-py's resend)
# --------------------------------------------------------------------------------------


def test_dispatch_and_sweep_sent_again_after_a_lost_reply_answer_the_same_batches(
    env, redis_client
):
    """dispatch_due and the sweep take batches off the schedule (or push their sweep
    deadline on) and hand the ids to the tick, which sends their messages. Their reply
    lost after Redis ran them (the connection dropped: a master killed, its replica had
    the writes), redis-py's cluster client sends the same call again: it answers the same
    ids. Before, it answered none: the batches had no message until the sweep (120 s)."""
    keys = services().keys
    relay = ReplyLosingRelay(env["REDIS_URL"])
    retrying = relay.retrying_client()
    store = BatchStore(retrying, keys)
    try:
        due = sorted(make_batch([email(n)]) for n in (1, 2))
        lost = sorted(make_batch([email(n)]) for n in (3, 4))
        assert store.dispatch_due(1000, GRACE_MS) == []  # the scripts loaded
        assert store.sweep(1000, GRACE_MS) == []
        redis_client.zadd(keys.schedule, dict.fromkeys(due, 0))  # due now
        redis_client.zadd(keys.batches, dict.fromkeys(lost, 0))  # past their deadline
        # Each reply: an array of two ids, five lines. Only these calls name these keys.
        relay.lose_reply(keys.schedule_reasons.encode(), lines=5)
        assert sorted(store.dispatch_due(1000, GRACE_MS)) == due
        assert relay.lost.is_set()
        relay.lost.clear()
        relay.lose_reply(keys.claims.encode(), lines=5)
        assert sorted(store.sweep(1000, GRACE_MS)) == lost
        assert relay.lost.is_set()
    finally:
        retrying.close()
        relay.close()
    # Each call hands its batches out once: the next call finds none.
    assert store.dispatch_due(1000, GRACE_MS) == [] == services().batches.sweep(1000, GRACE_MS)
    assert redis_client.zcard(keys.schedule) == 0


def test_a_tick_whose_dispatch_or_sweep_reply_was_lost_on_a_plain_client_sends_their_messages(
    env, redis_client
):
    """As above, in a coalescer tick on a plain client (REDIS_URL=redis://, no resend of
    its own; or a cluster client whose resends ran out): the dispatch's (then the sweep's)
    call raises a ConnectionError after Redis ran it. The tick sends the same call again
    under the same name, which answers the same ids, and their messages go out in this
    tick. Before, the tick raised: those batches had no message until the sweep (120 s)."""
    found = services()
    keys = found.keys
    relay = ReplyLosingRelay(env["REDIS_URL"])
    plain = relay.plain_client()
    scripts = Scripts(plain)
    sent: list[str] = []
    tick = Coalescer(
        load_settings(),
        Buffer(plain, keys, scripts, found.retention),
        BatchStore(plain, keys),
        found.limiter,
        found.heartbeats,
        sent.append,
    ).tick
    try:
        due = sorted(make_batch([email(n)]) for n in (1, 2))
        lost = sorted(make_batch([email(n)]) for n in (3, 4))
        tick()  # the scripts loaded (EVALSHA finds them): nothing due yet
        assert sent == []
        # Only the call of that script names its sha; its reply: two ids, five lines.
        redis_client.zadd(keys.schedule, dict.fromkeys(due, 0))  # due now
        relay.lose_reply(scripts.dispatch_due.sha.encode(), lines=5)
        assert tick().dispatched == 2
        assert relay.lost.is_set()
        assert sorted(sent) == due
        sent.clear()
        relay.lost.clear()
        redis_client.zadd(keys.batches, dict.fromkeys(lost, 0))  # past their deadline
        relay.lose_reply(scripts.sweep_batches.sha.encode(), lines=5)
        assert tick().redispatched == 2
        assert relay.lost.is_set()
        assert sorted(sent) == lost
    finally:
        plain.close()
        relay.close()
