"""The Redis change buffer and the coalescer, against a real redis-server.

Covers the guarantees stated at the top of `stores/lua/enqueue.lua` and
`stores/lua/take_batch.lua`, and `delivery.coalescer.Coalescer.tick` with a dispatch that
only records batch ids (no Celery).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from config.settings import load_settings
from core.changes import Change, Lane, SubscriptionState, parse_change
from core.planning import PendingChange, PlannedBatch, plan_batches
from delivery.coalescer import Coalescer
from delivery.services import services
from stores.batch_records import BatchStore
from stores.buffer import Buffer, encode_change
from stores.clock import server_time_ms
from stores.history import ConsentHistory
from stores.keys import buffer_field
from stores.scripts import Scripts
from tests.conftest import email, wait_for
from tests.lost_reply import ReplyLosingRelay

GROUP = "news"


def change(value: str, state: str = "subscribed", *, kind: str = "email", **extra: Any) -> Change:
    row = {"subscription_group_id": extra.pop("group", GROUP), "subscription_state": state}
    row[kind] = value
    row.update(extra)
    return parse_change(row)


def pending_record(buffer: Buffer, group: str, kind: str, value: str) -> dict[str, Any] | None:
    raw = buffer.client.hget(buffer.keys.pending, buffer_field(group, kind, value))
    return None if raw is None else json.loads(raw)


def due_fields(buffer: Buffer) -> set[str]:
    """The due fields of both lanes."""
    k = buffer.keys
    return {
        raw.decode() for name in (k.due, k.due_live) for raw in buffer.client.zrange(name, 0, -1)
    }


def field(value: str, kind: str = "email", group: str = GROUP) -> str:
    return buffer_field(group, kind, value)


def take_each(
    buffer: Buffer, plan: list[PlannedBatch], redispatch_ms: int
) -> list[tuple[str, int]]:
    """Take planned batches, each in a pack of its own; (batch id, members taken) each."""
    return [
        pair for pack in buffer.take([[batch] for batch in plan], redispatch_ms) for pair in pack
    ]


def take_all(buffer: Buffer, redispatch_ms: int = 60_000) -> list[tuple[str, int]]:
    """Cut every due change into batches now (no linger) and take them."""
    now = server_time_ms(buffer.client)
    changes, _ = buffer.read_due(now, 100_000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50, linger_ms=0)
    return take_each(buffer, plan, redispatch_ms)


def batch_record(buffer: Buffer, batch_id: str) -> dict[str, Any]:
    raw = buffer.client.get(buffer.keys.batch(batch_id))
    assert raw is not None, f"no record for batch {batch_id}"
    return json.loads(raw)


def script_calls(client: Any) -> int:
    stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


class Recorder:
    """A dispatch callable that remembers the batch ids it was given."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, batch_id: str) -> None:
        with self._lock:
            self.ids.append(batch_id)


def coalescer(dispatch: Recorder, **overrides: Any) -> Coalescer:
    found = services()
    settings = load_settings(**overrides)
    return Coalescer(
        settings,
        found.buffer,
        found.batches,
        found.limiter,
        found.heartbeats,
        dispatch,
    )


# --------------------------------------------------------------------------------------
# enqueue: last write wins, normalisation, sequence numbers, delays
# --------------------------------------------------------------------------------------


def test_last_write_wins_within_one_call(env):
    buffer = services().buffer
    buffer.enqueue(
        [
            change(email(1), "subscribed"),
            change(email(2), "subscribed"),
            change(email(1), "unsubscribed"),
        ]
    )
    assert buffer.pending_count() == 2
    assert pending_record(buffer, GROUP, "email", email(1))["s"] == "unsubscribed"
    assert pending_record(buffer, GROUP, "email", email(2))["s"] == "subscribed"
    changes, more = buffer.read_due(server_time_ms(buffer.client), 100)
    assert not more
    assert {(c.value, c.state.value) for c in changes} == {
        (email(1), "unsubscribed"),
        (email(2), "subscribed"),
    }


def test_read_due_reads_a_pending_change_whatever_its_json_layout(env):
    """`read_due` decodes a read's changes in one call (msgspec, issue 26): a pending change
    written in another member order, with members it does not read, "o" as a JSON boolean
    and numbers cjson wrote as floats (a replay's, another version's) reads as the same
    change; a change the layout does not describe (an unknown state) fails the read as
    the json module's path always did, naming the state."""
    buffer = services().buffer
    buffer.enqueue([change(email(1), "subscribed"), change(email(2), "unsubscribed")])
    now = server_time_ms(buffer.client)
    written, _ = buffer.read_due(now, 100)
    first = next(c for c in written if c.value == email(1))
    buffer.client.hset(
        buffer.keys.pending,
        field(email(1)),
        f'{{"c":"crm","t":{first.due_ms}.0,"w":1,"q":{first.seq}.0,"o":true,"p":1,'
        '"s":"unsubscribed"}',
    )
    read, more = buffer.read_due(now, 100)
    assert not more
    assert sorted(read) == sorted(
        [
            first._replace(state=SubscriptionState.UNSUBSCRIBED, double_opt_in=True),
            next(c for c in written if c.value == email(2)),
        ]
    )
    buffer.client.hset(
        buffer.keys.pending,
        field(email(1)),
        f'{{"s":"maybe","o":0,"q":{first.seq},"t":{first.due_ms}}}',
    )
    with pytest.raises(KeyError, match="maybe"):
        buffer.read_due(now, 100)


def test_read_due_passes_over_a_due_entry_whose_change_is_gone_and_any_double_opt_in(env):
    """A due entry whose pending change another coalescer's take removed between the due
    set's range and the HMGET is passed over, the others read as they are (issue 26, the
    seventh step: the read makes no pair of field and payload unless one is gone); "o"
    written as 1.0 or 2 (no layout of enqueue.lua's) still reads as a double opt-in, by
    the json module's path."""
    buffer = services().buffer
    buffer.enqueue([change(email(n), "subscribed") for n in range(1, 4)])
    now = server_time_ms(buffer.client)
    written, _ = buffer.read_due(now, 100)
    assert len(written) == 3
    buffer.client.zadd(buffer.keys.due, {field(email(9)): 0})  # its change taken since
    read, more = buffer.read_due(now, 100)
    assert not more and sorted(read) == sorted(written)
    one, two, three = (next(c for c in written if c.value == email(n)) for n in (1, 2, 3))
    for value, o in ((one, "1.0"), (two, "2")):
        buffer.client.hset(
            buffer.keys.pending,
            field(value.value),
            f'{{"s":"subscribed","o":{o},"q":{value.seq},"t":{value.due_ms}}}',
        )
    read, _ = buffer.read_due(now, 100)
    assert sorted(read) == sorted(
        [one._replace(double_opt_in=True), two._replace(double_opt_in=True), three]
    )


def test_a_cut_reads_on_when_its_first_read_leaves_room(env):
    """A tick's cut reads its room's worth plus at most MIN_READ first, and the rest of
    READ_AHEAD's read only when that did not fill the room (issue 26: under a backlog the
    rest was read again by the next tick). Here the first read (4,500 changes for a room
    of 50 batches) holds 90 keys' 49 oldest changes each — remainders, held while more is
    due — and the next 500 complete them: the cut still takes 50 full batches, as one read
    of 5,000 did, and reads 5,000 changes in all."""
    buffer = services().buffer
    groups = [f"g{n:02}" for n in range(90)]

    def enqueue_after_a_tick(changes: list[Change]) -> None:
        # Due times rise from call to call (equal ones would order by field, not by call).
        last = server_time_ms(buffer.client)
        wait_for(lambda: server_time_ms(buffer.client) > last, interval=0.001, what="Redis's clock")
        buffer.enqueue(changes, lane=Lane.BULK)

    enqueue_after_a_tick([change(email(n), group=group) for group in groups for n in range(49)])
    enqueue_after_a_tick([change(email(n), group="h") for n in range(90)])
    enqueue_after_a_tick([change(email(49), group=group) for group in groups])
    enqueue_after_a_tick([change(email(n), group="z") for n in range(1000)])
    reads: list[int] = []
    read_due = buffer.read_due

    def counted(*args: Any, **kwargs: Any) -> tuple[list[PendingChange], bool]:
        changes, more = read_due(*args, **kwargs)
        reads.append(len(changes))
        return changes, more

    buffer.read_due = counted  # type: ignore[method-assign]
    recorder = Recorder()
    ticker = coalescer(recorder)
    ticker.buffer = buffer
    cut = ticker._cut(Lane.BULK, server_time_ms(buffer.client), 50)
    assert (cut.batches, cut.identifiers, cut.more) == (50, 2_500, True)
    assert reads == [4_500, 500]
    records = [batch_record(buffer, batch_id) for batch_id in recorder.ids]
    assert all(len(record["members"]) == 50 for record in records)
    assert {record["group"] for record in records} <= set(groups)


def test_one_call_writes_each_field_once_in_its_lane_whatever_its_changes(env, redis_client):
    """enqueue.lua writes a call's changes with one HSET and one ZADD per lane: a field
    changed several times in the call ends with its last change, due in one lane only (a
    bulk field that a later change turns live leaves the bulk set), a locked field is not
    made due, and a dead letter is superseded once."""
    buffer = services().buffer
    k = buffer.keys
    redis_client.hset(k.inflight, field(email(3)), "batch-x")
    redis_client.hset(k.dead_letter_fields, field(email(4)), "entry-x")
    buffer.enqueue([change(email(1), "subscribed")], lane=Lane.BULK)  # pending before
    buffer.enqueue(
        [
            change(email(1), "unsubscribed"),  # bulk, replacing the pending one
            change(email(2), "subscribed"),  # bulk ...
            change(email(1), "subscribed", lane="live"),  # ... email(1) turns live
            change(email(3), "unsubscribed"),  # locked: pending, not due
            change(email(4), "unsubscribed"),  # supersedes the dead letter
            change(email(2), "unsubscribed"),  # email(2) last: unsubscribed, bulk
            change(email(4), "subscribed"),
        ],
        lane=Lane.BULK,
    )
    assert pending_record(buffer, GROUP, "email", email(1))["s"] == "subscribed"
    assert pending_record(buffer, GROUP, "email", email(1))["l"] == 1
    assert pending_record(buffer, GROUP, "email", email(2))["s"] == "unsubscribed"
    assert pending_record(buffer, GROUP, "email", email(4))["s"] == "subscribed"
    live = {raw.decode() for raw in redis_client.zrange(k.due_live, 0, -1)}
    bulk = {raw.decode() for raw in redis_client.zrange(k.due, 0, -1)}
    assert live == {field(email(1))}
    assert bulk == {field(email(2)), field(email(4))}
    assert pending_record(buffer, GROUP, "email", email(3))["s"] == "unsubscribed"
    assert redis_client.hget(k.dead_letter_fields, field(email(4))) is None
    assert int(redis_client.hget(k.stats, "enqueued")) == 8
    found = services()
    history = ConsentHistory(found.redis, found.keys)
    # (the pending change's own "enqueued" is read from the buffer, last)
    assert [e.event for e in history.events("email", email(4))] == [
        "superseded",
        "enqueued",
        "superseded",
        "enqueued",
    ]
    assert [e.event for e in history.events("email", email(1))] == [
        "enqueued",
        "superseded",
        "enqueued",
        "superseded",
        "enqueued",
    ]


@pytest.mark.parametrize("start", [0, 985, 99_990, 999_999_999_999_990, 9_007_199_254_739_990])
def test_each_change_gets_the_next_sequence_number_written_as_an_integer(env, redis_client, start):
    """enqueue.lua writes a change's "q" without formatting a number a change (issue 26):
    the thousands once, the tens and units looked up. Whatever the counter stood at —
    a fresh Redis (below 1,000, written whole), across a thousand, a hundred thousand,
    10^15 (beyond %.14g's digits) and near 2^53 — every change of a call gets the next
    number, as JSON's integer text, through `enqueue` and the import's pipelined calls."""
    buffer = services().buffer
    redis_client.set(buffer.keys.seq, start)
    values = [email(n) for n in range(30)]
    buffer.enqueue([change(value) for value in values[:15]], lane=Lane.BULK)
    with buffer.pipelined() as enqueuer:
        enqueuer.add([arg for value in values[15:] for arg in encode_change(change(value))])
        enqueuer.finish()
    for n, value in enumerate(values, 1):
        raw = redis_client.hget(buffer.keys.pending, field(value))
        text = raw.decode().split('"q":', 1)[1].split(",", 1)[0]
        assert text == str(start + n), (n, raw)
        assert json.loads(raw)["q"] == start + n
    assert int(redis_client.get(buffer.keys.seq)) == start + len(values)


def test_last_write_wins_across_calls(env):
    buffer = services().buffer
    buffer.enqueue([change(email(1), "unsubscribed")])
    buffer.enqueue([change(email(1), "subscribed")])
    buffer.enqueue([change(email(1), "unsubscribed")])
    assert buffer.pending_count() == 1
    record = pending_record(buffer, GROUP, "email", email(1))
    assert record["s"] == "unsubscribed"
    assert record["q"] == 3


def test_same_identifier_in_other_group_or_kind_is_another_slot(env):
    buffer = services().buffer
    buffer.enqueue(
        [
            change("u1", kind="external_id"),
            change("u1", kind="external_id", group="promo"),
            change(email(1)),
        ]
    )
    assert buffer.pending_count() == 3


def test_normalised_spellings_share_one_slot(env):
    buffer = services().buffer
    buffer.enqueue([change(" Jane@Example.COM ", "subscribed")])
    buffer.enqueue([change("jane@example.com", "unsubscribed")])
    assert buffer.pending_count() == 1
    assert pending_record(buffer, GROUP, "email", "jane@example.com")["s"] == "unsubscribed"

    buffer.enqueue([change("+1 (415) 555-0101", kind="phone", group="sms")])
    buffer.enqueue([change("+14155550101", "unsubscribed", kind="phone", group="sms")])
    assert buffer.pending_count() == 2
    assert pending_record(buffer, "sms", "phone", "+14155550101")["s"] == "unsubscribed"


def test_sequence_numbers_increase_in_enqueue_order(env, redis_client):
    buffer = services().buffer
    buffer.enqueue([change(email(n)) for n in range(5)])
    buffer.enqueue([change(email(n)) for n in range(5, 8)])
    seqs = [pending_record(buffer, GROUP, "email", email(n))["q"] for n in range(8)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 8
    assert int(redis_client.get(buffer.keys.seq)) == seqs[-1] == 8


def test_delayed_change_is_not_due_until_its_delay_passed(env):
    buffer = services().buffer
    now = server_time_ms(buffer.client)
    buffer.enqueue([change(email(1), delay_seconds=60)])
    assert buffer.pending_count() == 1
    assert buffer.read_due(server_time_ms(buffer.client), 100) == ([], False)
    assert buffer.read_due(now + 30_000, 100) == ([], False)
    later, _ = buffer.read_due(server_time_ms(buffer.client) + 61_000, 100)
    assert [c.value for c in later] == [email(1)]
    assert later[0].due_ms >= now + 60_000


def test_newer_undelayed_change_replaces_a_delayed_one(env):
    buffer = services().buffer
    buffer.enqueue([change(email(1), "subscribed", delay_seconds=3600)])
    buffer.enqueue([change(email(1), "unsubscribed")])
    changes, _ = buffer.read_due(server_time_ms(buffer.client), 100)
    assert [(c.value, c.state.value) for c in changes] == [(email(1), "unsubscribed")]
    assert buffer.pending_count() == 1


def test_one_script_call_per_chunk(env, redis_client):
    buffer = services().buffer
    buffer.enqueue([change("warm-up", kind="external_id")])  # the script is loaded now
    before = script_calls(redis_client)
    count = buffer.enqueue(
        (change(f"user-{n}", kind="external_id") for n in range(2500)), chunk_size=1000
    )
    after = script_calls(redis_client)
    assert count == 2500
    assert after - before == 3
    assert buffer.pending_count() == 2501


# --------------------------------------------------------------------------------------
# take: the buffer -> batch record step
# --------------------------------------------------------------------------------------


def test_take_moves_members_into_a_locked_batch_record(env, redis_client):
    buffer = services().buffer
    keys = buffer.keys
    buffer.enqueue([change(email(n)) for n in range(3)])
    now = server_time_ms(redis_client)
    changes, _ = buffer.read_due(now, 100)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)
    assert len(plan) == 1

    taken = take_each(buffer, plan, 60_000)
    assert len(taken) == 1
    batch_id, size = taken[0]
    assert size == 3

    assert buffer.pending_count() == 0
    assert redis_client.zcard(keys.due) == redis_client.zcard(keys.due_live) == 0
    inflight = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.inflight).items()}
    assert inflight == {field(email(n)): batch_id for n in range(3)}

    record = batch_record(buffer, batch_id)
    assert record["group"] == GROUP
    assert record["state"] == "subscribed"
    assert record["kind"] == "email"
    assert record["attempts"] == 0
    assert sorted(member[0] for member in record["members"]) == [email(n) for n in range(3)]

    score = redis_client.zscore(keys.batches, batch_id)
    assert score is not None
    assert now + 60_000 <= score <= server_time_ms(redis_client) + 60_000
    assert BatchStore(redis_client, keys).count() == 1


def test_change_rewritten_after_read_stays_in_the_buffer(env, redis_client):
    buffer = services().buffer
    buffer.enqueue([change(email(n), "subscribed") for n in range(3)])
    now = server_time_ms(redis_client)
    changes, _ = buffer.read_due(now, 100)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)

    buffer.enqueue([change(email(1), "unsubscribed")])  # after planning, before take
    (batch_id, size), *rest = take_each(buffer, plan, 60_000)
    assert rest == []
    assert size == 2
    assert sorted(m[0] for m in batch_record(buffer, batch_id)["members"]) == [email(0), email(2)]

    assert buffer.pending_count() == 1
    assert pending_record(buffer, GROUP, "email", email(1))["s"] == "unsubscribed"
    assert redis_client.hget(buffer.keys.inflight, field(email(1))) is None
    later, _ = buffer.read_due(server_time_ms(redis_client), 100)
    assert [(c.value, c.state.value) for c in later] == [(email(1), "unsubscribed")]


def test_take_with_nothing_current_writes_no_record(env, redis_client):
    buffer = services().buffer
    buffer.enqueue([change(email(1))])
    now = server_time_ms(redis_client)
    plan = plan_batches(buffer.read_due(now, 10)[0], now_ms=now, max_identifiers=50)
    buffer.enqueue([change(email(1), "unsubscribed")])
    assert take_each(buffer, plan, 1000) == []
    assert redis_client.zcard(buffer.keys.batches) == 0
    assert redis_client.hlen(buffer.keys.inflight) == 0


@pytest.mark.parametrize("client", ["cluster-like-resend", "plain-coalescer-resend"])
def test_a_cut_whose_reply_was_lost_and_sent_again_sends_every_batch_its_message(
    env, redis_client, client
):
    """The take's pipeline runs on Redis, then its reply is lost (the connection dropped:
    in e2e/test_redis_cluster.py a master killed mid-pipeline, whose replica had the
    writes) and redis-py sends it again with the same batch ids, as RedisCluster does after
    a ConnectionError (REDIS_URL=redis+cluster://; a plain client given the same `Retry`
    stands for it here, behind a relay that loses the reply). The second run takes nothing
    more and answers what the first took, so each batch cut gets its message. Before, it
    answered 0 ("nothing written"): the records stayed, holding their members' locks,
    with no message, for the sweep (BATCH_REDISPATCH_SECONDS, 120 s) to post.

    `plain-coalescer-resend`: a plain client (REDIS_URL=redis://, which sends nothing again
    itself), or a cluster client whose own resends ran out. The take's call raises a
    ConnectionError after Redis ran it; the coalescer sends the same take again (the same
    batch ids), which answers what the first run took, and each batch gets its message in
    this tick. Before, the tick raised and the 3 records waited for the sweep (120 s)."""
    found = services()
    relay = ReplyLosingRelay(env["REDIS_URL"])
    redis = relay.retrying_client() if client == "cluster-like-resend" else relay.plain_client()
    buffer = Buffer(redis, found.keys, Scripts(redis), found.retention)
    buffer.enqueue([change(email(n)) for n in range(120)])
    # The take names each member as "value SEP seq" (take_batch.lua ARGV[13]); no other
    # command of the tick does: its three scripts' replies (one integer each) are lost.
    relay.lose_reply(email(0).encode() + b"\x1f", lines=3)
    recorder = Recorder()
    settings = load_settings(batch_linger_seconds=0)
    cutter = Coalescer(settings, buffer, found.batches, found.limiter, found.heartbeats, recorder)
    try:
        report = cutter.tick()
    finally:
        redis.close()
        relay.close()
    assert relay.lost.is_set()
    cut = {raw.decode() for raw in redis_client.zrange(buffer.keys.batches, 0, -1)}
    assert len(cut) == 3
    assert sorted(recorder.ids) == sorted(cut)
    assert (report.batches, report.identifiers) == (3, 120)
    assert sorted(len(batch_record(buffer, bid)["members"]) for bid in cut) == [20, 50, 50]
    assert redis_client.hlen(buffer.keys.inflight) == 120
    assert buffer.pending_count() == 0


def test_a_take_sent_again_after_claims_absorbed_its_batch_answers_what_its_record_holds(
    env, redis_client, monkeypatch
):
    """The take's resend (redis-py after a lost reply, as above) may come after another
    batch's claim absorbed members of the batch it wrote (the record is listed in the short
    batches from its first run, and the failover's retries last seconds): it answers the
    members the record holds then, and takes nothing again. Partly absorbed: 1 of 3 is
    left, so 1 (a message for it); wholly absorbed (the record ended): nothing, and no
    record written again. Before take_batch.lua answered a second run from its record
    (e1110fb), the partly absorbed batch answered 0: no message for its member."""
    import stores.buffer as buffer_module

    found = services()
    buffer, store, keys = found.buffer, found.batches, found.keys
    buffer.enqueue([change(email(n)) for n in range(3)])
    now = server_time_ms(redis_client)  # as take_all cuts: every due change, no linger
    [plan] = plan_batches(buffer.read_due(now, 100)[0], now_ms=now, max_identifiers=50, linger_ms=0)

    class _Id:  # the take's batch id, the same in the first run and in its resend
        hex = "a" * 32

    def take_x() -> list[list[tuple[str, int]]]:
        with monkeypatch.context() as patched:
            patched.setattr(buffer_module.uuid, "uuid4", lambda: _Id())
            return buffer.take([[plan]], 60_000, top_up_to=50)

    x = _Id.hex
    assert take_x() == [[(x, 3)]]  # the first run; its reply is the one lost
    buffer.enqueue([change(email(n)) for n in (3, 4)])
    [(y, members)] = take_all(buffer)
    assert members == 2
    assert store.claim(y, "worker-a/1", 60_000, top_up_to=4).record is not None
    assert len(batch_record(buffer, y)["members"]) == 4  # two of x's absorbed
    batched = redis_client.hget(keys.stats, "batches")

    assert take_x() == [[(x, 1)]]  # the resend: what the record holds now
    assert [m[0] for m in batch_record(buffer, x)["members"]] == [email(2)]
    assert redis_client.hget(keys.stats, "batches") == batched  # nothing taken again

    buffer.enqueue([change(email(5))])
    [(z, members)] = take_all(buffer)
    assert members == 1
    assert store.claim(z, "worker-b/1", 60_000, top_up_to=2).record is not None
    assert redis_client.get(keys.batch(x)) is None  # emptied into z: ended
    batched = redis_client.hget(keys.stats, "batches")

    assert take_x() == []  # sent again once more: nothing to send, nothing written
    assert redis_client.get(keys.batch(x)) is None
    assert redis_client.zscore(keys.batches, x) is None
    assert redis_client.hget(keys.stats, "batches") == batched
    locks = {f.decode(): b.decode() for f, b in redis_client.hgetall(keys.inflight).items()}
    assert locks == {field(email(n)): (y if n in (0, 1, 3, 4) else z) for n in range(6)}


def test_locked_field_waits_in_pending_until_its_batch_is_finished(env, redis_client):
    found = services()
    buffer, store = found.buffer, found.batches
    buffer.enqueue([change(email(1), "subscribed"), change(email(2), "subscribed")])
    [(batch_id, _)] = take_all(buffer)
    store.claim(batch_id, "some-token", 60_000)  # being posted

    buffer.enqueue([change(email(1), "unsubscribed")])
    assert buffer.pending_count() == 1
    assert field(email(1)) not in due_fields(buffer)
    assert buffer.read_due(server_time_ms(redis_client) + 3_600_000, 100) == ([], False)
    # Nor can a coalescer take it while it is locked.
    assert take_all(buffer) == []

    assert store.delivered(batch_id, "some-token").members == 2
    assert due_fields(buffer) == {field(email(1))}
    changes, _ = buffer.read_due(server_time_ms(redis_client), 100)
    assert [(c.value, c.state.value) for c in changes] == [(email(1), "unsubscribed")]
    [(second, size)] = take_all(buffer)
    assert size == 1
    assert second != batch_id


def test_interleaved_coalescers_never_share_a_change(env, redis_client):
    buffer = services().buffer
    buffer.enqueue([change(email(n)) for n in range(120)])
    now = server_time_ms(redis_client)
    changes_a, _ = buffer.read_due(now, 1000)
    changes_b, _ = buffer.read_due(now, 1000)
    plan_a = plan_batches(changes_a, now_ms=now, max_identifiers=50)
    plan_b = plan_batches(changes_b, now_ms=now, max_identifiers=50)
    assert sum(len(b.members) for b in plan_a) == 120

    taken_a = take_each(buffer, plan_a, 60_000)
    taken_b = take_each(buffer, plan_b, 60_000)
    assert taken_b == []
    assert sum(size for _, size in taken_a) == 120
    assert redis_client.hlen(buffer.keys.inflight) == 120


def test_concurrent_coalescer_ticks_never_put_a_change_in_two_batches(env, redis_client):
    """Four coalescers tick at once, bypassing the tick lock (as two beats without it would):
    the take script alone must keep every change in one batch."""
    buffer = services().buffer
    distinct = 1200
    changes = [change(f"user-{n % distinct}", kind="external_id") for n in range(2000)]
    changes += [change(f"user-{n}", "unsubscribed", kind="external_id") for n in range(0, 600, 3)]
    buffer.enqueue(changes)

    recorder = Recorder()
    workers = [
        coalescer(
            recorder,
            batch_linger_seconds=0,
            coalesce_max_changes_per_tick=400,
            max_batches_in_flight=10_000,
        )
        for _ in range(4)
    ]
    barrier = threading.Barrier(len(workers))
    failures: list[BaseException] = []

    def run(worker: Coalescer) -> None:
        try:
            for _ in range(10):
                barrier.wait(timeout=30)
                worker._tick()  # no lock: the scripts must keep the guarantee alone
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert buffer.pending_count() == 0

    assert len(recorder.ids) == len(set(recorder.ids))
    seen: dict[str, str] = {}
    total = 0
    for batch_id in recorder.ids:
        record = batch_record(buffer, batch_id)
        assert 1 <= len(record["members"]) <= 50
        for value, _seq, *_ in record["members"]:
            assert value not in seen, f"{value} in batches {seen[value]} and {batch_id}"
            seen[value] = batch_id
            total += 1
    assert total == distinct == len(seen)
    assert redis_client.hlen(buffer.keys.inflight) == distinct
    unsubscribed = {f"user-{n}" for n in range(0, 600, 3)}
    for batch_id in recorder.ids:
        record = batch_record(buffer, batch_id)
        expected = {v[0] in unsubscribed for v in record["members"]}
        assert expected == {record["state"] == "unsubscribed"}


# --------------------------------------------------------------------------------------
# Coalescer.tick
# --------------------------------------------------------------------------------------


# A budget under full pressure: partial batches linger the whole BATCH_LINGER_SECONDS.
BUSY = {"batch_linger_pressure_low": 0.0, "batch_linger_pressure_high": 0.0}


def test_tick_cuts_full_batches_at_once_and_holds_a_partial_one_for_linger(env, redis_client):
    buffer = services().buffer
    buffer.enqueue([change(email(n)) for n in range(120)])

    recorder = Recorder()
    report = coalescer(recorder, batch_linger_seconds=3600, **BUSY).tick()
    assert report.batches == 2
    assert report.identifiers == 100
    assert len(recorder.ids) == 2
    assert [len(batch_record(buffer, bid)["members"]) for bid in recorder.ids] == [50, 50]
    assert buffer.pending_count() == 20

    # Still lingering: a second tick cuts nothing.
    assert coalescer(recorder, batch_linger_seconds=3600, **BUSY).tick().batches == 0
    assert buffer.pending_count() == 20

    report = coalescer(recorder, batch_linger_seconds=0).tick()
    assert (report.batches, report.identifiers) == (1, 20)
    assert len(batch_record(buffer, recorder.ids[-1])["members"]) == 20
    assert buffer.pending_count() == 0
    assert redis_client.hlen(buffer.keys.inflight) == 120


def test_tick_sends_a_lone_change_once_its_linger_passed(env, redis_client):
    buffer = services().buffer
    buffer.enqueue([change(email(1))])
    due_ms = pending_record(buffer, GROUP, "email", email(1))["t"]
    recorder = Recorder()
    worker = coalescer(recorder, batch_linger_seconds=1, **BUSY)
    assert worker.tick().batches == 0
    wait_for(lambda: worker.tick().batches == 1, timeout=10, what="the linger to pass")
    assert server_time_ms(redis_client) - due_ms >= 1000
    assert len(recorder.ids) == 1


def test_an_idle_budget_sends_a_partial_batch_at_the_first_tick(env, redis_client):
    """Defaults: nothing spent recently, nothing promised ahead, little due: no linger."""
    buffer = services().buffer
    buffer.enqueue([change(email(n)) for n in range(3)])
    report = coalescer(Recorder()).tick()
    assert (report.batches, report.identifiers, report.linger_ms) == (1, 3, 0)
    assert report.pressure < 0.25


def test_a_budget_spent_ahead_makes_partial_batches_wait(env, redis_client):
    """Defaults, but the shared budget is promised 2 s ahead (our reservations, or Braze
    reporting the workspace's other clients spending it): a partial batch waits."""
    found = services()
    now = server_time_ms(redis_client)
    redis_client.hset(found.limiter.key, "tat", now + 2500)
    # Bulk: live's linger follows live's own due work only (it goes ahead of what is
    # promised anyway).
    found.buffer.enqueue([change(email(n)) for n in range(3)], lane=Lane.BULK)
    report = coalescer(Recorder()).tick()
    assert report.batches == 0
    assert report.linger_ms == round(found.settings.batch_linger_seconds * 1000)
    assert report.next_check_ms is not None and report.next_check_ms > now


def test_recent_requests_raise_the_linger_smoothly(env, redis_client):
    """Our own recent requests count: three quarters of the budget spent over the last
    seconds gives a linger between none and the whole."""
    found = services()
    now = server_time_ms(redis_client)
    per_second = found.limiter.requests_per_second
    for past in range(5):
        requests = round(per_second * 0.75)
        redis_client.hset(found.keys.metrics(now // 1000 - past), "requests", requests)
    # Bulk: a live change's linger follows live's own pressure, not the budget's use.
    found.buffer.enqueue([change(email(1))], lane=Lane.BULK)
    report = coalescer(Recorder()).tick()
    assert 0.7 < report.pressure < 0.95  # 5 seconds of counts over 4 to 5 seconds
    assert 0 < report.linger_ms < round(found.settings.batch_linger_seconds * 1000)


def test_a_large_due_backlog_keeps_batches_full_from_the_first_tick(env, redis_client):
    """A bulk import at an idle budget: due work alone is pressure; the remainder waits."""
    buffer = services().buffer
    rate = services().limiter.requests_per_second
    count = 50 * round(rate * 2) + 10  # more full requests than one linger can send
    buffer.enqueue([change(email(n)) for n in range(count)])
    # At the default linger (2 s): the shared env's 0.3 s is shorter than enqueuing 8,000
    # changes takes on a loaded machine, and the remainder would go out for its age.
    report = coalescer(
        Recorder(), coalesce_max_changes_per_tick=count + 1, batch_linger_seconds=2.0
    ).tick()
    assert report.pressure == 1.0
    assert report.identifiers == count - 10  # full batches only


def test_a_fast_producer_in_small_calls_is_pressure(env, redis_client):
    """Changes arriving faster than the budget could send even in full batches: partial
    batches wait, though each tick sees only a few hundred due."""
    found = services()
    recorder = Recorder()
    worker = coalescer(recorder)
    worker.tick()  # the first arrival sample
    per_second = found.limiter.requests_per_second
    # Bulk: a live change's linger follows live's own pressure, not the arrivals (which a
    # backfill fills).
    found.buffer.enqueue([change(email(n)) for n in range(round(60 * per_second))], lane=Lane.BULK)
    wait_for(
        lambda: worker.tick().pressure == 1.0,
        timeout=10,
        what="the arrival rate to register",
    )


def test_run_ticks_again_on_a_nudge_while_idle(env, redis_client):
    """The tick is not the floor: a coalescer waiting in `run` cuts a change enqueued
    after it started, at once, not at the next beat."""
    found = services()
    recorder = Recorder()
    worker = coalescer(recorder)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(worker.run(3)))
    thread.start()
    try:
        # `run` ticked once (nothing due) and now waits for a nudge.
        wait_for(
            lambda: any(c.get("cmd") == "blpop" for c in redis_client.client_list()),
            what="the coalescer to wait for a nudge",
        )
        found.buffer.enqueue([change(email(1))])
        wait_for(lambda: len(recorder.ids) == 1, timeout=5, what="a batch cut on the nudge")
    finally:
        thread.join(timeout=10)  # the run ends at its deadline
    assert result and result[0].ticks >= 2 and result[0].identifiers == 1


def test_tick_respects_max_batches_in_flight(env, redis_client):
    found = services()
    buffer = found.buffer
    buffer.enqueue([change(email(n)) for n in range(120)])
    recorder = Recorder()
    limited = coalescer(recorder, batch_linger_seconds=0, max_batches_in_flight=1)

    assert limited.tick().batches == 1
    assert buffer.pending_count() == 70
    # The budget is used up: nothing more leaves the buffer.
    assert limited.tick().batches == 0
    assert buffer.pending_count() == 70
    # A change for a buffered identifier still replaces the older one for free.
    waiting = sorted(redis_client.hkeys(buffer.keys.pending))[0].decode().split("\x1f")[2]
    buffer.enqueue([change(waiting, "unsubscribed")])
    assert buffer.pending_count() == 70
    assert pending_record(buffer, GROUP, "email", waiting)["s"] == "unsubscribed"

    [first] = recorder.ids
    found.batches.claim(first, "t", 60_000)
    assert found.batches.delivered(first, "t").members == 50
    assert limited.tick().batches == 1
    assert buffer.pending_count() == 20


def test_tick_skips_while_another_tick_holds_the_lock(env, redis_client):
    buffer = services().buffer
    buffer.enqueue([change(email(1))])
    recorder = Recorder()
    lock = redis_client.lock(buffer.keys.coalesce_lock, timeout=30)
    assert lock.acquire(blocking=False)
    try:
        assert coalescer(recorder, batch_linger_seconds=0).tick().skipped
    finally:
        lock.release()
    assert coalescer(recorder, batch_linger_seconds=0).tick().batches == 1


def test_a_tick_that_outlived_its_lock_still_reports_and_marks_its_tick(env, redis_client):
    """A tick slower than its lock's lease (a slow Redis, or sends again after lost
    replies): the lock is gone by the time it releases it (the key deleted here, as its
    expiry would). Its batches are cut and their messages sent; the tick ends as usual
    and marks its progress. Before, its release raised LockNotOwnedError out of the task."""
    buffer = services().buffer
    buffer.enqueue([change(email(1))])

    class LeaseRunsOut(Recorder):
        def __call__(self, batch_id: str) -> None:
            redis_client.delete(buffer.keys.coalesce_lock)  # the lease ran out meanwhile
            super().__call__(batch_id)

    recorder = LeaseRunsOut()
    assert redis_client.get(buffer.keys.coalesce_last_tick) is None
    report = coalescer(recorder, batch_linger_seconds=0).tick()
    assert (report.batches, len(recorder.ids)) == (1, 1)
    assert redis_client.get(buffer.keys.coalesce_last_tick) is not None


def test_sweep_redispatches_a_batch_whose_message_was_lost(env, redis_client):
    buffer = services().buffer
    keys = buffer.keys
    buffer.enqueue([change(email(n)) for n in range(3)])
    [(lost, _)] = take_all(buffer, redispatch_ms=0)  # taken, but its message never left

    recorder = Recorder()
    report = coalescer(recorder, batch_redispatch_seconds=120).tick()
    assert report.redispatched == 1
    assert report.batches == 0
    assert recorder.ids == [lost]
    # The sweep pushed its deadline forward: the next tick does not send it again.
    assert redis_client.zscore(keys.batches, lost) > server_time_ms(redis_client) + 60_000
    assert coalescer(recorder).tick().redispatched == 0
    assert recorder.ids == [lost]
    assert batch_record(buffer, lost)["attempts"] == 0
