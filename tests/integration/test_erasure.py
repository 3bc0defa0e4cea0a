"""Erasure covers other identifiers' records and batches in flight (issue 21, item 6):
Braze's error texts are stored per identifier, so `forget` finds every trace; and nothing
is sent for an identifier after `forget` returns, even while its batch is claimed and
waits for its turn or its opt-out read. Real Redis, the simulator over HTTP, `forget` run
as an operator runs it (a subprocess)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx
from redis import Redis

from config.settings import load_settings
from core.changes import parse_change
from delivery.coalescer import Coalescer
from delivery.poster import Poster
from delivery.services import services
from stores.history import ConsentHistory
from stores.keys import FIELD_SEPARATOR
from tests.cli_runs import run_real
from tests.conftest import come_due, keyspace_traces, turn_a_moment_off
from tests.sim_control import faults, set_in_braze, sim_states, sim_stats

# Distinct masks (j***@example.com, b***@…, c***@…): the texts can be read back.
JANE, BOB, CARL = "jane.doe@example.com", "bob@example.org", "carl@example.net"


def enqueue(*pairs: tuple[str, str], **extra: Any) -> None:
    """(group, email) changes to `subscribed`."""
    services().buffer.enqueue(
        [
            parse_change(
                {"subscription_group_id": g, "subscription_state": "subscribed", "email": v} | extra
            )
            for g, v in pairs
        ]
    )


def v2() -> Poster:
    return services().poster(settings=load_settings(braze_api_version="v2"))


def tick(version: str = "v2") -> list[str]:
    """One coalescer tick as a v1 or v2 beat runs it: the ids its messages carry."""
    found = services()
    sent: list[str] = []
    settings = load_settings(batch_linger_seconds=0, braze_api_version=version)
    Coalescer(
        settings, found.buffer, found.batches, found.limiter, found.heartbeats, sent.append
    ).tick()
    return sent


def post_due(poster: Poster) -> list[str]:
    """Post every batch waiting in the schedule (made due now), as the next ticks would."""
    found = services()
    waiting = [b.decode() for b in found.redis.zrange(found.keys.schedule, 0, -1)]
    return [poster.post(batch_id).status for batch_id in come_due(*waiting)]


def stored_forms(kind: str, value: str) -> list[str]:
    """Every form in which braze-subs stores an identifier: itself (in buffer fields, batch
    records, dead letters, texts), JSON-escaped (cjson writes `/` as `\\/`)."""
    return sorted({value, json.dumps(value)[1:-1], value.replace("/", "\\/")})


def assert_no_trace(client: Redis, kind: str, value: str) -> None:
    """Every key and value of Redis scanned: no stored form of the identifier anywhere,
    and its SHA-1 only in the name of its history, which holds the one `erased` event."""
    for form in stored_forms(kind, value):
        assert keyspace_traces(client, form) == [], form
    digest = hashlib.sha1(f"{kind}{FIELD_SEPARATOR}{value}".encode()).hexdigest()
    found = services()
    where = keyspace_traces(client, digest)
    assert where == [f"{found.keys.history(kind, value)} (list)"], where
    events = ConsentHistory(found.redis, found.keys).events(kind, value)
    assert [e.event for e in events] == ["erased"]


def forget(value: str) -> None:
    result = run_real("forget", "--email", value)
    assert result.returncode == 0, result.stderr


def applied_values(sim: Any) -> str:
    """Everything the simulator applied, as text (every state of every identifier)."""
    return httpx.get(f"{sim.url}/_sim/applied", timeout=30).text + json.dumps(
        [list(key) for key in sim_states(sim)]
    )


# --------------------------------------------------------------------------------------
# Error texts are stored per identifier
# --------------------------------------------------------------------------------------


def test_error_texts_name_no_one_else_and_forget_leaves_no_trace(env, sim, redis_client):
    """A v2 pack's 400 names jane: the retry of every batch of the pack is in every
    member's history (bob's too), and the 2xx `errors` of another pack name jane and carl,
    dead-lettered in two groups. Each record keeps Braze's text, with only its own
    identifiers left whole; after `forget`, no key or value of Redis holds jane."""
    found = services()
    poster = v2()
    # 1. One pack, two groups: Braze refuses it naming jane; each batch then goes alone.
    enqueue(("a", JANE), ("b", BOB))
    [lead] = tick()
    faults(sim, reject=[JANE])
    assert poster.post(lead).status == "retry"
    assert sorted(post_due(poster)) == ["dead_lettered", "delivered"]
    # 2. Another pack, two groups: a 201 whose errors name jane and carl.
    faults(sim, reject=[], soft_errors=[JANE, CARL])
    enqueue(("c", JANE), ("d", CARL))
    [lead] = tick()
    assert poster.post(lead).status == "delivered"
    faults(sim, soft_errors=[])

    # Bob's history tells of the refused pack, with jane masked.
    history = ConsentHistory(found.redis, found.keys)
    retried = [e for e in history.events("email", BOB) if e.event == "retried"]
    assert retried and all(JANE not in json.dumps(e.describe()) for e in retried)
    assert any("j***@" in e.describe() for e in retried), [e.describe() for e in retried]
    # Carl's dead letter keeps Braze's errors: carl whole, jane masked.
    entries = {entry.subscription_group_id: entry for entry in found.dead_letters.list()}
    assert set(entries) == {"a", "c", "d"}
    assert CARL in entries["d"].error and JANE not in entries["d"].error
    assert "j***@" in entries["d"].error
    # Jane's own dead letters name her (the text says which identifier Braze refused).
    assert JANE in entries["a"].error and JANE in entries["c"].error
    assert CARL not in entries["c"].error
    # Nothing of jane outside her own records: not in bob's or carl's history.
    for other in (BOB, CARL):
        assert JANE not in json.dumps([e.describe() for e in history.events("email", other)])

    forget(JANE)
    assert_no_trace(redis_client, "email", JANE)
    # The others' records are all there, still telling what Braze said.
    assert [e.subscription_group_id for e in found.dead_letters.list()] == ["d"]
    assert "retried" in [e.event for e in history.events("email", BOB)]
    assert sim_states(sim)[("b", "email", BOB)] == "subscribed"


# --------------------------------------------------------------------------------------
# Nothing is sent after forget returns: a claimed batch not yet sent is fenced
# --------------------------------------------------------------------------------------


def test_forget_while_the_batch_waits_for_its_turn_sends_nothing_for_it(env, sim, redis_client):
    """The worker has claimed the batch (jane and bob in memory) and waits for its turn in
    the budget when `forget` runs: the check before the first byte finds the claim gone,
    nothing is sent; the batch goes out from the schedule without jane."""
    found = services()
    poster = found.poster()
    enqueue(("news", JANE), ("news", BOB))
    [batch_id] = tick("v1")
    # A v1 claim takes the batch's turn in the same call: the wait for it comes next (a
    # turn a moment off: one for now, the claim fences the batch and the request goes).
    turn_a_moment_off()
    original = poster.liveness.wait

    def turn_after_forget(seconds: float) -> bool:
        forget(JANE)
        return original(seconds)

    poster.liveness.wait = turn_after_forget  # type: ignore[method-assign]
    try:
        report = poster.post(batch_id)
    finally:
        poster.liveness.wait = original  # type: ignore[method-assign]
    assert report.status == "lost"
    assert JANE not in applied_values(sim)
    assert_no_trace(redis_client, "email", JANE)
    # Due now in the schedule: the next tick's message posts bob alone.
    assert post_due(poster) == ["delivered"]
    assert sim_states(sim) == {("news", "email", BOB): "subscribed"}
    assert JANE not in applied_values(sim)
    assert_no_trace(redis_client, "email", JANE)


def test_forget_stops_every_batch_of_a_v2_request_not_yet_sent(env, sim, redis_client):
    """Jane's batch travels in a v2 pack with bob's (another group): the whole request
    stops, and both batches wait in the schedule, due now, not for a lease to run out."""
    poster = v2()
    enqueue(("a", JANE), ("b", BOB), ("b", CARL))
    [lead] = tick()
    original = poster.limiter.acquire

    def turn_after_forget(*args: Any, **options: Any) -> Any:
        forget(JANE)
        return original(*args, **options)

    poster.limiter.acquire = turn_after_forget  # type: ignore[method-assign]
    try:
        assert poster.post(lead).status == "lost"
    finally:
        poster.limiter.acquire = original  # type: ignore[method-assign]
    assert JANE not in applied_values(sim)
    # Both due now. Whichever message comes first: jane's emptied batch ends unsent, and
    # bob's goes in that request or, handed on as a pack's sibling, in the next round.
    statuses: list[str] = []
    for _ in range(3):
        statuses += post_due(poster)
        if services().batches.count() == 0:
            break
    assert "delivered" in statuses and services().batches.count() == 0, statuses
    assert sim_states(sim) == {
        ("b", "email", BOB): "subscribed",
        ("b", "email", CARL): "subscribed",
    }
    assert JANE not in applied_values(sim)
    assert_no_trace(redis_client, "email", JANE)


def test_forget_while_the_batch_waits_for_its_opt_out_read_sends_nothing_for_it(
    env, sim, redis_client
):
    """A `respect_opt_out` batch: the worker reads Braze's opt-outs, and `forget` runs
    before the answer is used: the post is fenced; bob goes out later, jane never."""
    found = services()
    poster = found.poster()
    assert poster.opt_outs is not None
    set_in_braze(sim.url, "news", "subscribed", [BOB])
    enqueue(("news", JANE), ("news", BOB), respect_opt_out=True)
    [batch_id] = tick("v1")
    original = poster.opt_outs.screen

    def screen_then_forget(records: Any) -> Any:
        screened = original(records)
        forget(JANE)
        return screened

    poster.opt_outs.screen = screen_then_forget  # type: ignore[method-assign]
    try:
        assert poster.post(batch_id).status == "lost"
    finally:
        poster.opt_outs.screen = original  # type: ignore[method-assign]
    assert ("news", "email", JANE) not in sim_states(sim)
    assert post_due(poster) == ["delivered"]
    assert ("news", "email", JANE) not in sim_states(sim)
    assert_no_trace(redis_client, "email", JANE)


def test_forget_before_the_opt_out_read_keeps_the_identifier_out_of_the_read(
    env, sim, redis_client
):
    """The opt-out read asks Braze about each identifier of the batch: when `forget` runs
    while the worker waits for its turn, the read is fenced like the post (its identifiers
    still locked by their batches, checked right before the first byte): no read names
    jane; the batch is read and posted again without her."""
    found = services()
    poster = found.poster()
    set_in_braze(sim.url, "news", "subscribed", [BOB])
    enqueue(("news", JANE), ("news", BOB), respect_opt_out=True)
    [batch_id] = tick("v1")
    # A v1 claim takes the batch's turn in the same call: the wait for it comes next.
    original = poster.liveness.wait

    def turn_after_forget(seconds: float) -> bool:
        forget(JANE)
        return original(seconds)

    poster.liveness.wait = turn_after_forget  # type: ignore[method-assign]
    try:
        assert poster.post(batch_id).status in ("lost", "waiting", "queued")
    finally:
        poster.liveness.wait = original  # type: ignore[method-assign]
    statuses: list[str] = []
    for _ in range(3):
        statuses += post_due(poster)
        if found.batches.count() == 0:
            break
    assert "delivered" in statuses, statuses
    reads = sim_stats(sim, log=True)["reads"]["requests"]
    assert reads and all(read["identifiers"] == 1 for read in reads), reads
    assert sim_states(sim) == {("news", "email", BOB): "subscribed"}
    assert_no_trace(redis_client, "email", JANE)
