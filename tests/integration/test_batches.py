"""Batch records: claim, finish (delivered / dead-lettered) and defer, against real Redis.

Covers the guarantees stated at the top of `stores/lua/claim_batch.lua`,
`finish_batch.lua` and `defer_batch.lua`.
"""

from __future__ import annotations

import json
from typing import Any

from admin.status import read_status
from core.changes import parse_change
from core.planning import plan_batches
from delivery.services import services
from stores.batch_records import ClaimStatus
from stores.buffer import Buffer, server_time_ms
from stores.dead_letters import DeadLetters
from stores.keys import buffer_field
from tests.conftest import email, take_each, wait_for

GROUP = "news"
LEASE_MS = 30_000


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
    return {raw.decode() for raw in redis_client.zrange(services().keys.due, 0, -1)}


def raw_record(redis_client: Any, batch_id: str) -> dict[str, Any] | None:
    raw = redis_client.get(services().keys.batch(batch_id))
    return None if raw is None else json.loads(raw)


# --------------------------------------------------------------------------------------
# claim
# --------------------------------------------------------------------------------------


def test_claim_returns_the_record_and_a_second_token_is_busy(env, redis_client):
    store = services().batches
    batch_id = make_batch([email(1), email(2)])

    first = store.claim(batch_id, "worker-a", LEASE_MS)
    assert first.status is ClaimStatus.CLAIMED
    assert first.record is not None
    assert first.record.id == batch_id
    assert sorted(first.record.values) == [email(1), email(2)]
    assert first.record.key.group_id == GROUP
    assert first.record.attempts == 0

    second = store.claim(batch_id, "worker-b", LEASE_MS)
    assert second.status is ClaimStatus.BUSY
    assert second.record is None
    # The holder may renew its own claim.
    assert store.claim(batch_id, "worker-a", LEASE_MS).status is ClaimStatus.CLAIMED
    # A claim pushes the sweep deadline to the lease's end.
    score = redis_client.zscore(services().keys.batches, batch_id)
    assert score >= server_time_ms(redis_client) + LEASE_MS - 5_000


def test_another_token_can_claim_after_the_lease_expired(env):
    store = services().batches
    batch_id = make_batch([email(1)])
    assert store.claim(batch_id, "worker-a", 50).status is ClaimStatus.CLAIMED
    wait_for(
        lambda: store.claim(batch_id, "worker-b", LEASE_MS).status is ClaimStatus.CLAIMED,
        timeout=5,
        what="the lease to expire",
    )
    assert store.claim(batch_id, "worker-a", LEASE_MS).status is ClaimStatus.BUSY


def test_claim_of_a_finished_batch_is_gone(env):
    store = services().batches
    batch_id = make_batch([email(1)])
    assert store.delivered(batch_id, "t") == 1
    assert store.claim(batch_id, "t", LEASE_MS).status is ClaimStatus.GONE
    assert store.claim("no-such-batch", "t", LEASE_MS).status is ClaimStatus.GONE


def test_claim_prunes_superseded_members_and_releases_their_lock(env, redis_client):
    found = services()
    buffer, store = found.buffer, found.batches
    batch_id = make_batch([email(1), email(2), email(3)], "subscribed")

    enqueue(buffer, [email(2)], "unsubscribed")  # newer: waits for the lock
    assert field(email(2)) not in due(redis_client)

    claim = store.claim(batch_id, "worker-a", LEASE_MS)
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
    assert store.delivered(batch_id, "worker-a") == 2
    assert inflight(redis_client) == {}
    assert buffer.pending_count() == 1


def test_claim_with_every_member_superseded_is_empty_and_ends_the_batch(env, redis_client):
    found = services()
    buffer, store = found.buffer, found.batches
    keys = found.keys
    batch_id = make_batch([email(1), email(2)], "subscribed")
    enqueue(buffer, [email(1), email(2)], "unsubscribed")

    claim = store.claim(batch_id, "worker-a", LEASE_MS)
    assert claim.status is ClaimStatus.EMPTY
    # The record as it was, so the rest of its pack can still be sent.
    assert claim.record is not None and claim.record.id == batch_id
    assert redis_client.exists(keys.batch(batch_id)) == 0
    assert redis_client.exists(keys.claim(batch_id)) == 0
    assert redis_client.zscore(keys.batches, batch_id) is None
    assert inflight(redis_client) == {}
    assert due(redis_client) == {field(email(1)), field(email(2))}
    assert store.claim(batch_id, "worker-a", LEASE_MS).status is ClaimStatus.GONE


# --------------------------------------------------------------------------------------
# delivered / dead_letter
# --------------------------------------------------------------------------------------


def test_delivered_releases_locks_and_deletes_the_record(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2)])
    assert store.claim(batch_id, "worker-a", LEASE_MS).status is ClaimStatus.CLAIMED

    assert store.delivered(batch_id, "worker-a") == 2
    assert inflight(redis_client) == {}
    assert redis_client.exists(keys.batch(batch_id), keys.claim(batch_id)) == 0
    assert redis_client.zscore(keys.batches, batch_id) is None
    assert store.count() == 0
    status = read_status(redis_client, keys)
    assert (status.in_flight, status.batches_in_flight, status.delivered_total) == (0, 0, 2)
    # Ends exactly once.
    assert store.delivered(batch_id, "worker-a") == 0


def test_delivered_with_a_foreign_live_claim_changes_nothing(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2)])
    assert store.claim(batch_id, "worker-a", LEASE_MS).status is ClaimStatus.CLAIMED
    before = raw_record(redis_client, batch_id)
    locks = inflight(redis_client)

    assert store.delivered(batch_id, "worker-b") == -1
    assert store.dead_letter(batch_id, "worker-b", "nope") == -1
    assert raw_record(redis_client, batch_id) == before
    assert inflight(redis_client) == locks
    assert redis_client.get(keys.claim(batch_id)) == b"worker-a"
    assert redis_client.zscore(keys.batches, batch_id) is not None
    assert redis_client.hlen(keys.dead_letters) == 0

    assert store.delivered(batch_id, "worker-a") == 2


def test_finish_releases_the_lock_of_a_waiting_newer_change(env, redis_client):
    found = services()
    buffer, store = found.buffer, found.batches
    batch_id = make_batch([email(1)], "subscribed")
    enqueue(buffer, [email(1)], "unsubscribed", delay_seconds=120)

    assert store.delivered(batch_id, "t") == 1
    # The waiting change keeps its own due time (its delay) once it becomes due.
    score = redis_client.zscore(found.keys.due, field(email(1)))
    assert score >= server_time_ms(redis_client) + 100_000
    assert buffer.read_due(server_time_ms(redis_client), 10) == ([], False)


def test_dead_letter_writes_an_entry_and_counts_its_identifiers(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2), email(3)], "unsubscribed")
    assert store.claim(batch_id, "worker-a", LEASE_MS).status is ClaimStatus.CLAIMED
    assert (
        store.defer(batch_id, "worker-a", error="HTTP 503", count_attempt=True, redispatch_ms=10)
        == 1
    )

    assert store.dead_letter(batch_id, "worker-a", "HTTP 400: Invalid email") == 3

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
    assert store.dead_letter(other, "t", "boom") == 1
    assert int(redis_client.get(keys.dead_letter_identifiers)) == 4


# --------------------------------------------------------------------------------------
# defer
# --------------------------------------------------------------------------------------


def test_defer_counts_attempts_only_when_asked_and_keeps_locks(env, redis_client):
    found = services()
    store, keys = found.batches, found.keys
    batch_id = make_batch([email(1), email(2)])
    locks = inflight(redis_client)

    assert store.claim(batch_id, "worker-a", LEASE_MS).status is ClaimStatus.CLAIMED
    attempts = store.defer(
        batch_id, "worker-a", error="429 from Braze", count_attempt=False, redispatch_ms=5_000
    )
    assert attempts == 0
    record = raw_record(redis_client, batch_id)
    assert record["attempts"] == 0
    assert record["error"] == "429 from Braze"
    assert inflight(redis_client) == locks
    assert redis_client.exists(keys.claim(batch_id)) == 0  # the claim is released
    score = redis_client.zscore(keys.batches, batch_id)
    now = server_time_ms(redis_client)
    assert now < score <= now + 5_000

    # Another worker may claim it straight away; counted attempts accumulate.
    assert store.claim(batch_id, "worker-b", LEASE_MS).status is ClaimStatus.CLAIMED
    assert store.defer(batch_id, "worker-b", error="e1", count_attempt=True, redispatch_ms=1) == 1
    assert store.claim(batch_id, "worker-c", LEASE_MS).status is ClaimStatus.CLAIMED
    assert store.defer(batch_id, "worker-c", error="e2", count_attempt=True, redispatch_ms=1) == 2
    claim = store.claim(batch_id, "worker-d", LEASE_MS)
    assert claim.record.attempts == 2
    assert claim.record.last_error == "e2"
    assert inflight(redis_client) == locks

    # A newer change for a member still waits: defer keeps the lock.
    enqueue(found.buffer, [email(1)], "unsubscribed")
    assert store.defer(batch_id, "worker-d", error="e3", count_attempt=False, redispatch_ms=1) == 2
    assert field(email(1)) not in due(redis_client)


def test_defer_with_a_foreign_live_claim_or_a_gone_batch_is_refused(env, redis_client):
    store = services().batches
    batch_id = make_batch([email(1)])
    assert store.claim(batch_id, "worker-a", LEASE_MS).status is ClaimStatus.CLAIMED
    before = raw_record(redis_client, batch_id)
    assert store.defer(batch_id, "worker-b", error="x", count_attempt=True, redispatch_ms=1) == -1
    assert raw_record(redis_client, batch_id) == before
    assert store.delivered(batch_id, "worker-a") == 1
    assert store.defer(batch_id, "worker-a", error="x", count_attempt=True, redispatch_ms=1) == -1


def test_overdue_lists_batches_past_their_deadline(env, redis_client):
    store = services().batches
    batch_id = make_batch([email(1)])
    now = server_time_ms(redis_client)
    assert store.overdue(now) == []
    assert store.overdue(now + 61_000) == [batch_id]
    store.postpone([batch_id], now + 120_000)
    assert store.overdue(now + 61_000) == []
    assert store.overdue(now + 121_000) == [batch_id]
