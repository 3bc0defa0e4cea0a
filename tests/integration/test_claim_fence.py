"""Issue 26, the eighth step: a v1 post's claim, told its turn and the lease the fence asks
for, also fences the batch when nothing can come between the claim and the request
(claim_batch.lua: the turn granted for now, no top-up left to make, no opt-out to read, no
pack to hand off), and the poster sends without fence_batch.lua: one script call a post
less. Its interleavings against a real redis-server (and the poster against the simulator
over real HTTP): the mark written by the claim before any byte, with the fence's lease
check; no fence where something may still come between (a turn that waits, a refusal, an
opt-out read, a pack, a renewal's short batch); a renewal after a lost reply answers the
same fenced state; a worker frozen between the claim and the request sends nothing past
the exchange's deadline counted from before the claim; a previous release's claim (no
fence asked) answers as before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from config.settings import load_settings
from core.changes import Lane, parse_change
from delivery.coalescer import Coalescer
from delivery.services import Services, reset_services, services
from stores.batch_records import ClaimStatus
from stores.clock import server_time_ms
from stores.refusals import Refusals
from tests.conftest import cut_one_batch as cut
from tests.conftest import email, turn_a_moment_off
from tests.sim_control import sim_stats

GROUP = "news"
LEASE_MS = 30_000
NEED_MS = 10_000  # the HTTP timeout's default, as the poster asks
A, B = "worker-a/1", "worker-b/1"


@pytest.fixture
def found(env: dict[str, str]) -> Iterator[Services]:
    reset_services()
    yield services()


def row(value: str, state: str = "subscribed", **options: Any) -> dict[str, Any]:
    return {
        "subscription_group_id": options.pop("group", GROUP),
        "subscription_state": state,
        "email": value,
        **options,
    }


def claim(found: Services, batch_id: str, token: str = A, **options: Any) -> Any:
    """The poster's v1 claim: its turn, and the fence if nothing can come between."""
    options.setdefault("fence_ms", NEED_MS)
    options.setdefault("opt_out_reads", True)
    return found.batches.claim(
        batch_id,
        token,
        LEASE_MS,
        top_up_to=50,
        turn=found.limiter.turn_ask(Lane.BULK),
        **options,
    )


def mark(found: Services, batch_id: str) -> int | None:
    raw = found.redis.hget(found.keys.fences, batch_id)
    return None if raw is None else int(raw)


# --- the claim that fences (BatchStore.claim, claim_batch.lua) -----------------------------


def test_a_claim_whose_turn_is_for_now_fences_as_fence_batch_does(found):
    full = cut([row(email(n)) for n in range(50)])
    before = server_time_ms(found.redis)
    made = claim(found, full)
    assert made.status is ClaimStatus.CLAIMED and made.fenced
    assert made.grant is not None and made.grant.granted and made.grant.wait_seconds == 0
    sent_at = mark(found, full)
    assert sent_at is not None and before <= sent_at <= server_time_ms(found.redis)
    # The lease the fence asks for: a claim with no more lease than that fences nothing.
    short = cut([row(email(n)) for n in range(100, 150)])
    assert not claim(found, short, fence_ms=LEASE_MS).fenced
    assert mark(found, short) is None
    # A fresh short batch: its claim's top-up just looked, no top-up before the send would
    # take more; it fences too.
    few = cut([row(email(200)), row(email(201))])
    assert claim(found, few).fenced and mark(found, few) is not None


def test_a_claim_of_the_previous_release_fences_nothing(found):
    """No fence asked (a previous release's poster, a v2 pack's siblings): the same reply
    as before, no mark; the poster fences right before the first byte."""
    batch_id = cut([row(email(1))])
    made = found.batches.claim(
        batch_id, A, LEASE_MS, top_up_to=50, turn=found.limiter.turn_ask(Lane.BULK)
    )
    assert made.grant is not None and made.grant.granted and not made.fenced
    assert mark(found, batch_id) is None


def test_no_fence_when_the_turn_waits_or_is_refused_or_the_group_is(found, redis_client):
    waits = cut([row(email(1))])
    turn_a_moment_off()
    made = claim(found, waits)
    assert made.grant is not None and made.grant.granted and made.grant.wait_seconds > 0
    assert not made.fenced and mark(found, waits) is None
    redis_client.hdel(found.limiter.key, "tat")

    now = server_time_ms(redis_client)
    assert found.limiter.pause_until(now / 1000 + 30, "429 from Braze")
    paused = claim(found, cut([row(email(2))]))
    assert paused.grant is not None and not paused.grant.granted and not paused.fenced
    redis_client.hdel(found.limiter.key, "paused_until")

    refused = cut([row(email(3))])
    Refusals(found.redis, found.keys).refuse(GROUP, "subscribed", "email", "no", seconds=60)
    made = claim(found, refused)
    assert made.refusal is not None and made.grant is None and not made.fenced
    assert mark(found, refused) is None


@pytest.mark.parametrize("size", [50, 2], ids=["full: read off the text", "short: decoded"])
def test_no_fence_before_an_opt_out_read(found, size):
    """A subscribed change that asks to respect Braze's opt-out is read first
    (delivery/opt_outs.py): its batch is not fenced by the claim when the poster reads
    them. A full batch's members are read off the record's text (record_head), a short
    one's decoded: the last member asks, where a scan that stops early misses it."""
    rows = [row(email(n)) for n in range(size - 1)]
    asks = cut([*rows, row(email(size - 1), respect_opt_out=True)])
    assert not claim(found, asks).fenced and mark(found, asks) is None
    # Without opt-out reads the same batch has nothing to wait for.
    again = cut(
        [row(email(n), group="other") for n in range(size - 1)]
        + [row(email(size - 1), group="other", respect_opt_out=True)]
    )
    assert claim(found, again, opt_out_reads=False).fenced
    # Not subscribed: nothing to read, whatever the change asked.
    unsubscribed = cut(
        [row(email(n), "unsubscribed", group="third", respect_opt_out=True) for n in range(size)]
    )
    assert claim(found, unsubscribed).fenced
    # No member asks: fenced.
    plain = cut([row(email(n), group="fourth") for n in range(size)])
    assert claim(found, plain).fenced


def test_no_fence_for_a_renewals_short_batch_nor_a_v2_pack(found, redis_client):
    """A renewal does not top up: a short batch then may take members right before the
    send (top_up_batch.lua), so its claim does not fence. A v2 pack claimed by a v1 worker
    hands its other batches off first."""
    short = cut([row(email(1))])
    assert found.batches.claim(short, A, LEASE_MS, top_up_to=50).status is ClaimStatus.CLAIMED
    renewed = claim(found, short)
    assert renewed.grant is not None and renewed.grant.granted and not renewed.fenced
    full = cut([row(email(n)) for n in range(100, 150)])
    assert found.batches.claim(full, A, LEASE_MS, top_up_to=50).status is ClaimStatus.CLAIMED
    assert claim(found, full).fenced  # full: nothing left to take

    found.buffer.enqueue(
        [parse_change(row(email(n), group=group)) for n, group in ((7, "a"), (8, "b"))]
    )
    sent: list[str] = []
    Coalescer(
        load_settings(batch_linger_seconds=0, braze_api_version="v2"),
        found.buffer,
        found.batches,
        found.limiter,
        found.heartbeats,
        sent.append,
    ).tick()
    [lead] = sent
    made = claim(found, lead)
    assert made.record is not None and len(made.record.pack) == 2 and not made.fenced
    assert mark(found, lead) is None


def test_a_renewal_after_a_fenced_first_try_answers_fenced_again(found, redis_client):
    """The claim fenced, its reply was lost: the poster claims again with the same token
    and must find the same state (fenced, its turn, no refusal: the first try read none),
    the mark moved to now (the poster sends from this answer on), no second turn. Another
    token's claim after a take-back starts afresh."""
    batch_id = cut([row(email(1))])
    first = claim(found, batch_id)
    assert first.fenced
    first_mark = mark(found, batch_id)
    turns = dict(redis_client.hgetall(found.limiter.key))
    Refusals(found.redis, found.keys).refuse(GROUP, "subscribed", "email", "no", seconds=60)
    time.sleep(0.01)
    renewed = claim(found, batch_id)
    assert renewed.fenced and renewed.refusal is None and renewed.grant == first.grant
    assert first_mark is not None and (mark(found, batch_id) or 0) > first_mark
    assert dict(redis_client.hgetall(found.limiter.key)) == turns

    # Taken back (the mark goes with the claim), then claimed by another: a turn of its
    # own, and now the refusal (no request goes out).
    redis_client.hdel(found.keys.claim_tokens, batch_id)
    redis_client.zrem(found.keys.claims, batch_id)
    redis_client.hdel(found.keys.fences, batch_id)
    other = claim(found, batch_id, B)
    assert other.refusal is not None and not other.fenced and mark(found, batch_id) is None


# --- the poster: the claim's fence, and no fence_batch.lua --------------------------------


def record_fences(found: Services, poster: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every fence_batch.lua call, and check that every request begins with its
    batch's mark written (by the claim or by the fence)."""
    calls: list[str] = []
    original_fence, original_post = poster.store.fence, poster.braze.post

    def fence(*args: Any, **kwargs: Any) -> Any:
        calls.append("fence")
        return original_fence(*args, **kwargs)

    def post(path: str, body: Any, *, fence: Any = None, **kwargs: Any) -> Any:
        def checked() -> bool:
            passed = bool(fence())
            assert not passed or found.redis.hlen(found.keys.fences) > 0
            return passed

        return original_post(path, body, fence=checked, **kwargs)

    monkeypatch.setattr(poster.store, "fence", fence)
    monkeypatch.setattr(poster.braze, "post", post)
    return calls


def test_a_v1_post_whose_turn_is_for_now_sends_without_another_fence(found, sim, monkeypatch):
    poster = found.poster()
    fences = record_fences(found, poster, monkeypatch)
    for n in range(3):
        batch_id = cut([row(email(10 * n + k)) for k in range(3)])
        assert poster.post(batch_id).status == "delivered"
        assert mark(found, batch_id) is None  # the finish took it away
    assert fences == [] and sim_stats(sim)["requests_ok"] == 3
    # A turn a moment off: the claim fences nothing, fence_batch.lua runs before the byte.
    turn_a_moment_off()
    assert poster.post(cut([row(email(99))])).status == "delivered"
    assert fences == ["fence"] and sim_stats(sim)["requests_ok"] == 4


def test_a_post_that_reads_opt_outs_first_is_fenced_after_the_read(found, sim, monkeypatch):
    poster = found.poster()
    fences = record_fences(found, poster, monkeypatch)
    batch_id = cut([row(email(1), respect_opt_out=True), row(email(2))])
    assert poster.post(batch_id).status == "delivered"
    assert fences == ["fence"] and sim_stats(sim)["requests_ok"] == 1


def test_a_fencing_claim_tried_again_after_a_lost_reply_sends_once(found, sim, monkeypatch):
    poster = found.poster()
    fences = record_fences(found, poster, monkeypatch)
    original = poster.store.claim
    calls: list[bool] = []

    def reply_lost(*args: Any, **kwargs: Any) -> Any:
        made = original(*args, **kwargs)
        calls.append(made.fenced)
        if len(calls) == 1:
            raise RedisConnectionError("Connection closed by server.")
        return made

    monkeypatch.setattr(poster.store, "claim", reply_lost)
    assert poster.post(cut([row(email(1))])).status == "delivered"
    assert calls == [True, True] and fences == []
    assert sim_stats(sim)["requests_ok"] == 1


def test_a_worker_frozen_between_its_fencing_claim_and_the_request_sends_nothing(
    found, sim, monkeypatch
):
    """The claim fenced, then the worker froze (a paused container) for the HTTP timeout:
    the exchange's deadline counts from before the claim was sent, so the request that
    would begin past it (past the lease the claim found, and past the mark's timeout the
    take-back waits for) sends no byte; the batch is retried."""
    poster = found.poster()
    original = poster.store.claim
    frozen = [0.0]
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + frozen[0])

    def then_freeze(*args: Any, **kwargs: Any) -> Any:
        made = original(*args, **kwargs)
        assert made.fenced
        frozen[0] = found.settings.http_timeout_seconds + 0.1
        return made

    monkeypatch.setattr(poster.store, "claim", then_freeze)
    batch_id = cut([row(email(1))])
    assert poster.post(batch_id).status == "retry"
    assert sim_stats(sim, log=True)["requests"] == []
    assert mark(found, batch_id) is None  # deferred: its outcome is known
