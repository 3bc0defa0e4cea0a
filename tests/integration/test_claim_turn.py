"""Issue 26: a v1 post's claim takes the batch's turn of the rate budget in the same call
(claim_batch.lua with `take_turn`, acquire_token.lua's operation shared in _prelude.lua):
one script call a post less. Its interleavings, against a real redis-server (and the
poster against the simulator over real HTTP): a claim not made takes no turn, a renewal
by the same token takes none, a refusal read by the claim takes none, a paused budget and
an open circuit answer as acquire_token.lua does, each lane's turn is its own, a v2 pack
takes one turn, a worker stopping takes none.

The budget here is 1,000 requests per 10 hours (the setting under test): a burst of 10
turns that come back one every ~37 s, so the turns a test spent are the burst less the
budget's `tokens_left`, whatever the machine's load."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from config.settings import load_settings
from core.changes import Lane, parse_change
from delivery.coalescer import Coalescer
from delivery.services import Services, reset_services, services
from delivery.thread_share import ThreadShare
from devtools.processes import wait_until
from stores.batch_records import ClaimStatus
from stores.clock import server_time_ms
from stores.refusals import Refusals
from tests.conftest import cut_one_batch as cut
from tests.conftest import email
from tests.sim_control import sim_stats

GROUP = "news"
LEASE_MS = 30_000
A, B = "worker-a/1", "worker-b/1"
BURST = 10


@pytest.fixture
def found(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Services]:
    for name, value in (
        ("BRAZE_RATE_LIMIT", "1000"),
        ("BRAZE_RATE_LIMIT_WINDOW_SECONDS", "36000"),
    ):
        env[name] = value
        monkeypatch.setenv(name, value)
    reset_services()
    found = services()
    assert found.limiter.budget.burst == BURST
    yield found


def row(value: str, state: str = "subscribed", group: str = GROUP) -> dict[str, Any]:
    return {"subscription_group_id": group, "subscription_state": state, "email": value}


def budget(found: Services) -> dict[bytes, bytes]:
    """Everything the budget and the credentials circuit hold."""
    return {
        **found.redis.hgetall(found.limiter.key),
        **{b"credentials " + k: v for k, v in found.redis.hgetall(found.keys.credentials).items()},
    }


def spent(found: Services) -> int:
    """Turns taken from the budget so far."""
    return BURST - found.limiter.state().tokens_left


# --- the claim and its turn (BatchStore.claim, claim_batch.lua) ----------------------------


def test_a_claim_made_takes_one_turn_as_acquire_does(found):
    store, limiter = found.batches, found.limiter
    first = store.claim(cut([row(email(1))]), A, LEASE_MS, turn=limiter.turn_ask(Lane.BULK))
    assert first.status is ClaimStatus.CLAIMED
    assert first.grant is not None and first.grant.granted and first.grant.wait_seconds == 0
    assert first.grant.send_at_ms is not None and not first.grant.tests_the_key
    assert spent(found) == 1
    # The same budget as acquire_token.lua's: the turns add up, whoever takes them.
    assert limiter.acquire(Lane.BULK).granted
    assert spent(found) == 2
    # Each lane's own: a bulk turn notes that bulk asks, a live one keeps live's own limit.
    assert b"bulk_at" in budget(found) and b"live_tat" not in budget(found)
    live = store.claim(
        cut([row(email(2))], Lane.LIVE), A, LEASE_MS, turn=limiter.turn_ask(Lane.LIVE)
    )
    assert live.grant is not None and live.grant.granted
    assert b"live_tat" in budget(found) and spent(found) == 3
    # Without `turn`, a claim takes none (the v2 pack's siblings, the other callers).
    assert store.claim(cut([row(email(3))]), A, LEASE_MS).grant is None
    assert spent(found) == 3


def test_a_claim_not_made_takes_no_turn(found, redis_client):
    """Busy (another token holds it), waiting in the schedule, gone, emptied (every
    member superseded): no turn, nothing of the budget moved, no turn noted."""
    store, keys = found.batches, found.keys
    ask = found.limiter.turn_ask(Lane.BULK)
    held = cut([row(email(1))])
    assert store.claim(held, B, LEASE_MS).status is ClaimStatus.CLAIMED
    waiting = cut([row(email(2))])
    redis_client.zadd(keys.schedule, {waiting: server_time_ms(redis_client) + 60_000})
    emptied = cut([row(email(3))])
    found.buffer.enqueue([parse_change(row(email(3), "unsubscribed"))], lane=Lane.BULK)
    before = budget(found)
    assert store.claim(held, A, LEASE_MS, turn=ask).status is ClaimStatus.BUSY
    assert store.claim(waiting, A, LEASE_MS, turn=ask).status is ClaimStatus.WAITING
    assert store.claim("no-such-batch", A, LEASE_MS, turn=ask).status is ClaimStatus.GONE
    assert store.claim(emptied, A, LEASE_MS, turn=ask).status is ClaimStatus.EMPTY
    assert budget(found) == before == {}
    assert redis_client.keys(keys.turn("*")) == []


def test_a_renewal_by_the_same_token_answers_its_turn_again_and_takes_none(found, redis_client):
    store, limiter = found.batches, found.limiter
    ask = limiter.turn_ask(Lane.BULK)
    batch_id = cut([row(email(1))])
    first = store.claim(batch_id, A, LEASE_MS, turn=ask)
    assert first.grant is not None and first.grant.granted and spent(found) == 1
    before = budget(found)
    renewed = store.claim(batch_id, A, LEASE_MS, turn=ask)
    assert renewed.status is ClaimStatus.CLAIMED
    assert renewed.grant == first.grant  # granted now, for the same send time
    assert budget(found) == before and spent(found) == 1

    # A turn not granted (the burst spent: the next turn is ~37 s away, past the reach):
    # renewed, the same answer, its wait counted from now; the queue of refused callers
    # not moved on again.
    while limiter.acquire(Lane.BULK).granted:
        pass
    refused_id = cut([row(email(2))])
    refused = store.claim(refused_id, A, LEASE_MS, turn=ask)
    assert refused.grant is not None and not refused.grant.granted
    assert refused.grant.waits_for == "budget"
    before = budget(found)
    again = store.claim(refused_id, A, LEASE_MS, turn=ask)
    assert again.grant is not None and not again.grant.granted
    assert again.grant.waits_for == "budget"
    assert 0 < again.grant.wait_seconds <= refused.grant.wait_seconds
    assert budget(found) == before

    # Another token's claim of a batch whose holder is gone takes a turn of its own (the
    # note is the old holder's), and its renewal answers that one.
    redis_client.hdel(found.keys.claim_tokens, refused_id)
    redis_client.zrem(found.keys.claims, refused_id)
    taken = store.claim(refused_id, B, LEASE_MS, turn=ask)
    assert taken.grant is not None and budget(found) != before


def test_a_renewal_past_the_lease_still_answers_its_turn_and_takes_none(found, redis_client):
    """The poster tries a claim again up to a lease after its first error, which may come
    up to a lease after the first try: past the first lease, the same token's renewal
    still finds the turn its first try noted (kept twice the lease) and takes none. With
    the note kept one lease only, this renewal spent a second turn."""
    store, limiter = found.batches, found.limiter
    lease_ms = 2_000  # the setting under test: a short lease to pass it
    ask = limiter.turn_ask(Lane.BULK)
    batch_id = cut([row(email(1))])
    first = store.claim(batch_id, A, lease_ms, turn=ask)
    assert first.grant is not None and first.grant.granted and spent(found) == 1
    lease_end = float(redis_client.zscore(found.keys.claims, batch_id))
    wait_until(
        lambda: server_time_ms(redis_client) > lease_end + 100, timeout=10, what="the lease's end"
    )
    renewed = store.claim(batch_id, A, lease_ms, turn=ask)
    assert renewed.status is ClaimStatus.CLAIMED
    assert renewed.grant is not None and renewed.grant.granted
    assert spent(found) == 1


def test_a_refusal_read_by_the_claim_takes_no_turn(found):
    """A batch whose group Braze refuses as a whole is dead-lettered unsent: its claim
    carries the refusal and takes no turn."""
    store = found.batches
    batch_id = cut([row(email(1))])
    Refusals(found.redis, found.keys).refuse(
        GROUP, "subscribed", "email", "no such group", seconds=60
    )
    claim = store.claim(batch_id, A, LEASE_MS, turn=found.limiter.turn_ask(Lane.BULK))
    assert claim.status is ClaimStatus.CLAIMED and claim.refusal is not None
    assert claim.grant is None and budget(found) == {}


def test_a_paused_budget_and_an_open_circuit_answer_as_acquire_does(found, redis_client):
    store, limiter = found.batches, found.limiter
    ask = limiter.turn_ask(Lane.BULK)
    now = server_time_ms(redis_client)
    assert limiter.pause_until(now / 1000 + 30, "429 from Braze")
    before = budget(found)
    paused = store.claim(cut([row(email(1))]), A, LEASE_MS, turn=ask).grant
    assert paused is not None and not paused.granted and paused.waits_for == "paused"
    assert 25 < paused.wait_seconds <= 30
    assert budget(found) == before  # nothing reserved
    redis_client.hdel(limiter.key, "paused_until")

    # Braze refused this workspace's key: the next probe's time, nothing granted.
    assert limiter.open_circuit("401 from Braze")
    closed = store.claim(cut([row(email(2))]), A, LEASE_MS, turn=ask).grant
    assert closed is not None and not closed.granted and closed.waits_for == "credentials"
    # Its probe time come: the one probe, granted now.
    redis_client.hset(found.keys.credentials, "probe_at", "0")
    probe = store.claim(cut([row(email(3))]), A, LEASE_MS, turn=ask).grant
    assert probe is not None and probe.granted and probe.probe
    # The circuit names another key (a rotation): granted, marked to test this key.
    redis_client.hset(found.keys.credentials, "workspace", "another workspace")
    check = store.claim(cut([row(email(4))]), A, LEASE_MS, turn=ask).grant
    assert check is not None and check.granted and check.check and spent(found) == 1


# --- the poster: one call for the claim and the turn --------------------------------------


def refuse_acquire(found: Services, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call of `RateLimiter.acquire` (a turn taken in a call of its own)."""
    calls: list[str] = []
    original = found.limiter.acquire

    def acquire(*args: Any, **kwargs: Any) -> Any:
        calls.append("acquire")
        return original(*args, **kwargs)

    monkeypatch.setattr(found.limiter, "acquire", acquire)
    return calls


def test_a_v1_post_takes_its_turn_with_its_claim(found, sim, monkeypatch):
    acquired = refuse_acquire(found, monkeypatch)
    batch_id = cut([row(email(n)) for n in range(3)])
    assert found.poster().post(batch_id).status == "delivered"
    assert acquired == [] and spent(found) == 1
    assert sim_stats(sim)["requests_ok"] == 1


def test_a_claim_tried_again_after_a_lost_reply_takes_one_turn(found, sim, monkeypatch):
    """The claim ran (and took the turn) but its reply was lost (a failover's closed
    connection): the poster claims again with the same token; that renewal answers the
    turn taken and takes no second one."""
    poster = found.poster()
    original = poster.store.claim
    calls: list[str] = []

    def reply_lost(*args: Any, **kwargs: Any) -> Any:
        calls.append("claim")
        reply = original(*args, **kwargs)
        if len(calls) == 1:
            raise RedisConnectionError("Connection closed by server.")
        return reply

    monkeypatch.setattr(poster.store, "claim", reply_lost)
    assert poster.post(cut([row(email(1))])).status == "delivered"
    assert calls == ["claim", "claim"] and spent(found) == 1
    assert sim_stats(sim)["requests_ok"] == 1


def tick_v2() -> list[str]:
    """One coalescer tick as a v2 beat runs it: the ids its messages carry."""
    found = services()
    sent: list[str] = []
    settings = load_settings(batch_linger_seconds=0, braze_api_version="v2")
    Coalescer(
        settings, found.buffer, found.batches, found.limiter, found.heartbeats, sent.append
    ).tick()
    return sent


def test_a_v2_pack_takes_one_turn(found, sim, monkeypatch):
    """A v2 request is its pack: the lead's claim and its siblings' take no turn, the
    request takes one (acquire_token.lua, once the pack is claimed)."""
    acquired = refuse_acquire(found, monkeypatch)
    found.buffer.enqueue(
        [parse_change(row(email(n), group=group)) for n, group in ((1, "a"), (2, "b"), (3, "c"))]
    )
    [lead] = tick_v2()
    poster = found.poster(settings=load_settings(braze_api_version="v2"))
    report = poster.post(lead)
    assert (report.status, report.entries) == ("delivered", 3)
    assert acquired == ["acquire"] and spent(found) == 1
    assert sim_stats(sim)["requests_ok"] == 1


def test_a_worker_stopping_takes_no_turn(found, sim, monkeypatch):
    """A post that begins while the worker stops hands its batch back, due now for another
    worker: no turn is spent on a request that is not sent."""
    acquired = refuse_acquire(found, monkeypatch)
    poster = found.poster()
    poster.liveness.ensure_started()
    poster.liveness.stopping.set()
    assert poster.post(cut([row(email(1))])).status == "handed_back"
    assert acquired == [] and spent(found) == 0
    assert sim_stats(sim)["requests_ok"] == 0


def test_a_post_without_a_thread_of_its_workspace_takes_no_turn(found, sim, monkeypatch):
    """Two workspaces served by one thread: while this workspace holds its share, its post
    puts the batch back into the schedule to wait for a thread, and takes no turn."""
    acquired = refuse_acquire(found, monkeypatch)
    poster = found.poster()
    poster.share = ThreadShare(1, 2)
    held = poster.share.take(poster.workspace)
    assert held is not None and poster.share.take(poster.workspace) is None
    try:
        report = poster.post(cut([row(email(1))]))
    finally:
        held.release()
    assert report.status == "waiting" and report.retry_in is not None
    assert acquired == [] and spent(found) == 0
    assert sim_stats(sim)["requests_ok"] == 0
