"""The dead-letter store (`stores.dead_letters.DeadLetters`) against real Redis.

Covers `replay_dead_letter.lua` and `purge_dead_letter.lua`: entries leave in one step
with their share of the identifier count, and a replay never overwrites a newer change.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from admin.status import read_status
from core.changes import parse_change
from core.planning import plan_batches
from delivery.dead_letter_retention import expire_dead_letters
from delivery.services import services
from stores.clock import server_time_ms
from stores.dead_letters import DeadLetters
from stores.keys import buffer_field
from tests.conftest import email, take_each, wait_for


def row(group: str, value: str, state: str = "subscribed", kind: str = "email", **extra: Any):
    return parse_change(
        {"subscription_group_id": group, "subscription_state": state, kind: value, **extra}
    )


def take_one_batch(changes: list) -> str:
    buffer = services().buffer
    buffer.enqueue(changes)
    now = server_time_ms(buffer.client)
    wanted = {(c.group_id, c.kind, c.value) for c in changes}
    due = [c for c in buffer.read_due(now, 1000)[0] if (c.group_id, c.kind, c.value) in wanted]
    plan = plan_batches(due, now_ms=now, max_identifiers=50)
    [(batch_id, size)] = take_each(buffer, plan, 60_000)
    assert size == len(changes)
    return batch_id


def dead_letter(group: str, values: list[str], state: str = "subscribed", **extra: Any) -> str:
    batch_id = take_one_batch([row(group, v, state, **extra) for v in values])
    services().batches.claim(batch_id, "t", 60_000)
    ended = services().batches.dead_letter(batch_id, "t", f"error of {group}")
    assert ended.members == len(values)
    return batch_id


def store() -> DeadLetters:
    found = services()
    return DeadLetters(found.redis, found.keys)


def assert_count_consistent(redis_client: Any) -> int:
    keys = services().keys
    entries = store().list()
    held = sum(len(entry.identifiers) for entry in entries)
    counted = int(redis_client.get(keys.dead_letter_identifiers) or 0)
    assert counted == held
    assert read_status(redis_client, keys).dead_letter == held
    assert redis_client.hlen(keys.dead_letters) == len(entries)
    assert redis_client.zcard(keys.dead_letter_index) == len(entries)
    return held


def pending(redis_client: Any) -> dict[str, dict[str, Any]]:
    keys = services().keys
    return {
        raw_field.decode(): json.loads(raw)
        for raw_field, raw in redis_client.hgetall(keys.pending).items()
    }


def test_list_is_oldest_first(env, redis_client):
    ids = []
    for group in ("g-c", "g-a", "g-b", "g-d"):
        before = server_time_ms(redis_client)
        ids.append(dead_letter(group, [email(1)]))
        # The next entry is dead-lettered at a later millisecond.
        wait_for(lambda before=before: server_time_ms(redis_client) > before + 1, timeout=2)

    entries = store().list()
    assert [entry.id for entry in entries] == ids
    assert [entry.subscription_group_id for entry in entries] == ["g-c", "g-a", "g-b", "g-d"]
    times = [entry.dead_lettered_at for entry in entries]
    assert times == sorted(times)
    assert store().ids() == ids
    first = entries[0].as_dict()
    assert first["error"] == "error of g-c"
    assert first["identifiers"] == [{"kind": "email", "value": email(1)}]
    assert first["created_at"] <= first["dead_lettered_at"]
    assert assert_count_consistent(redis_client) == 4


def test_empty_store(env, redis_client):
    assert store().list() == []
    report = store().replay(None)
    assert (report.entries, report.requeued, report.superseded, report.missing) == (0, 0, 0, [])
    purge = store().purge(None)
    assert (purge.entries, purge.identifiers, purge.missing) == (0, 0, [])
    assert assert_count_consistent(redis_client) == 0


def test_replay_counts_requeued_superseded_and_missing(env, redis_client):
    first = dead_letter("news", [email(1), email(2), email(3)], "unsubscribed")
    second = dead_letter("promo", [email(1), email(2)], "subscribed")
    assert assert_count_consistent(redis_client) == 5

    # A newer pending change for news/email(2) and an in-flight batch holding promo/email(1).
    services().buffer.enqueue([row("news", email(2), "subscribed")])
    newer = pending(redis_client)[buffer_field("news", "email", email(2))]
    holder = take_one_batch([row("promo", email(1), "unsubscribed")])

    report = store().replay([first, "no-such-entry", second])
    assert report.entries == 2
    assert report.requeued == 3
    assert report.superseded == 2
    assert report.missing == ["no-such-entry"]
    assert store().list() == []
    assert assert_count_consistent(redis_client) == 0

    now = pending(redis_client)
    assert now[buffer_field("news", "email", email(2))] == newer  # never overwritten
    assert now[buffer_field("news", "email", email(1))]["s"] == "unsubscribed"
    assert now[buffer_field("news", "email", email(3))]["s"] == "unsubscribed"
    assert now[buffer_field("promo", "email", email(2))]["s"] == "subscribed"
    assert buffer_field("promo", "email", email(1)) not in now  # the batch holds a change
    assert redis_client.hget(services().keys.inflight, buffer_field("promo", "email", email(1)))
    assert holder

    # Replayed changes are due at once, with fresh sequence numbers.
    due, _ = services().buffer.read_due(server_time_ms(redis_client), 100)
    assert {(c.group_id, c.value) for c in due} == {
        ("news", email(1)),
        ("news", email(2)),
        ("news", email(3)),
        ("promo", email(2)),
    }
    assert len({c.seq for c in due}) == 4

    again = store().replay([first])
    assert (again.entries, again.requeued, again.missing) == (0, 0, [first])


def test_replay_all_keeps_the_double_opt_in_flag(env, redis_client):
    dead_letter("sms", ["+14155550101"], "subscribed", kind="phone", use_double_opt_in_logic=True)
    dead_letter("news", [email(1)])
    report = store().replay(None)
    assert (report.entries, report.requeued, report.superseded) == (2, 2, 0)
    now = pending(redis_client)
    assert now[buffer_field("sms", "phone", "+14155550101")]["o"] == 1
    assert now[buffer_field("news", "email", email(1))]["o"] == 0
    assert assert_count_consistent(redis_client) == 0


def test_purge_counts_and_missing_ids(env, redis_client):
    first = dead_letter("news", [email(1), email(2)])
    second = dead_letter("promo", [email(3)])
    third = dead_letter("other", [email(4), email(5), email(6)])
    assert assert_count_consistent(redis_client) == 6

    report = store().purge([second, "nope"])
    assert (report.entries, report.identifiers, report.missing) == (1, 1, ["nope"])
    assert [entry.id for entry in store().list()] == [first, third]
    assert assert_count_consistent(redis_client) == 5

    report = store().purge([second])
    assert (report.entries, report.identifiers, report.missing) == (0, 0, [second])

    report = store().purge(None)
    assert (report.entries, report.identifiers, report.missing) == (2, 5, [])
    assert assert_count_consistent(redis_client) == 0
    # Purging puts nothing back in the buffer.
    assert pending(redis_client) == {}


def test_count_stays_consistent_through_mixed_operations(env, redis_client):
    ids = [dead_letter(f"g{n}", [email(m) for m in range(n + 1)]) for n in range(5)]
    assert assert_count_consistent(redis_client) == 15
    store().replay([ids[0], ids[3]])
    assert assert_count_consistent(redis_client) == 10
    store().purge([ids[1]])
    assert assert_count_consistent(redis_client) == 8
    ids.append(dead_letter("late", [email(90), email(91)]))
    assert assert_count_consistent(redis_client) == 10
    store().replay(None)
    assert assert_count_consistent(redis_client) == 0
    assert int(redis_client.get(services().keys.dead_letter_identifiers)) == 0


def batch_everything_due() -> str:
    buffer = services().buffer
    now = server_time_ms(buffer.client)
    plan = plan_batches(buffer.read_due(now, 1000)[0], now_ms=now, max_identifiers=50)
    [(batch_id, _size)] = take_each(buffer, plan, 60_000)
    return batch_id


def test_replay_never_resurrects_a_state_a_newer_delivered_change_replaced(env, redis_client):
    found = services()
    old = take_one_batch([row("news", email(1), "subscribed")])
    found.batches.claim(old, "t", 60_000)
    # A newer change arrives while the old batch is in flight, and waits for its lock.
    found.buffer.enqueue([row("news", email(1), "unsubscribed")])
    assert found.batches.dead_letter(old, "t", "HTTP 400: Invalid email").members == 1
    # The newer change is batched and delivered before anyone replays the old one.
    newer = batch_everything_due()
    found.batches.claim(newer, "t2", 60_000)
    assert found.batches.delivered(newer, "t2").members == 1
    assert pending(redis_client) == {}

    report = store().replay(None)
    assert (report.entries, report.requeued, report.superseded) == (1, 0, 1)
    assert pending(redis_client) == {}, "the dead-lettered 'subscribed' must not come back"
    assert_count_consistent(redis_client)


def test_a_change_enqueued_after_dead_lettering_supersedes_the_dead_letter(env, redis_client):
    found = services()
    entry = dead_letter("news", [email(1), email(2)], "subscribed")
    found.buffer.enqueue([row("news", email(2), "unsubscribed")])
    batch = batch_everything_due()
    found.batches.claim(batch, "t", 60_000)
    found.batches.delivered(batch, "t")

    report = store().replay([entry])
    assert (report.requeued, report.superseded) == (1, 1)
    assert set(pending(redis_client)) == {buffer_field("news", "email", email(1))}


def test_entries_past_retention_expire_counted_and_logged(env, redis_client, caplog):
    from config.settings import load_settings

    found = services()
    old = dead_letter("news", [email(1), email(2)])
    young = dead_letter("promo", [email(3)])
    # Make the first entry 31 days old.
    now = server_time_ms(redis_client)
    redis_client.zadd(found.keys.dead_letter_index, {old: now - 31 * 86_400_000})

    settings = load_settings(dead_letter_retention_days=30)
    # Our loggers may not propagate to the root (worker.app configures them): listen directly.
    logger = logging.getLogger("braze_subs.dead_letters")
    logger.addHandler(caplog.handler)
    try:
        assert expire_dead_letters(settings, found.dead_letters) == 1
    finally:
        logger.removeHandler(caplog.handler)

    assert [entry.id for entry in store().list()] == [young]
    assert any(old in record.getMessage() for record in caplog.records)
    status = read_status(redis_client, found.keys)
    assert status.dead_letters_expired == 1
    assert status.dead_letter == 1
    assert_count_consistent(redis_client)


def test_an_expired_entry_is_logged_without_the_identifiers_its_error_names(
    env, redis_client, caplog
):
    """Issue 21, item 8: Braze's text in a dead letter names its identifier (kept whole in
    the entry, which is that identifier's record); the expiry's WARNING line masks it."""
    from config.settings import load_settings

    found = services()
    batch_id = take_one_batch([row("news", email(1), "subscribed")])
    found.batches.claim(batch_id, "t", 60_000)
    found.batches.dead_letter(batch_id, "t", f"HTTP 400: Invalid email: {email(1)}")
    assert email(1) in store().list()[0].error
    now = server_time_ms(redis_client)
    redis_client.zadd(found.keys.dead_letter_index, {batch_id: now - 31 * 86_400_000})
    logger = logging.getLogger("braze_subs.dead_letters")
    logger.addHandler(caplog.handler)
    try:
        assert expire_dead_letters(load_settings(), found.dead_letters) == 1
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if batch_id in r.getMessage()]
    assert lines and all(email(1) not in line for line in lines), lines
    assert any("Invalid email: u***@" in line for line in lines), lines
