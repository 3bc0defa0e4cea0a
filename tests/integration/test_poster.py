"""The poster against the Braze simulator over real HTTP, with batch records in real Redis."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from admin.exporter import read_extras
from admin.status import read_status
from config.settings import Settings, load_settings
from core.changes import parse_change
from core.planning import plan_batches
from delivery.braze_client import BrazeClient
from delivery.coalescer import Coalescer
from delivery.poster import Poster, PostReport
from delivery.services import services
from stores.batch_records import BatchRecord
from stores.clock import server_time_ms
from stores.counters import Counters
from stores.dead_letters import DeadLetters
from stores.keys import buffer_field
from stores.limiter import RateLimiter
from stores.refusals import Refusals
from tests.conftest import come_due, email, take_each, turn_a_moment_off, wait_for
from tests.sim_control import faults, sim_stats, sim_subscriptions

GROUP = "news"
SMS_GROUP = "sms-promos"


def make_batch(rows: list[dict[str, Any]]) -> str:
    found = services()
    buffer = found.buffer
    buffer.enqueue([parse_change(row) for row in rows])
    now = server_time_ms(buffer.client)
    changes, _ = buffer.read_due(now, 1000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)
    [(batch_id, _size)] = take_each(buffer, plan, 60_000)
    return batch_id


def email_batch(values: list[str], state: str = "subscribed") -> str:
    return make_batch(
        [{"subscription_group_id": GROUP, "subscription_state": state, "email": v} for v in values]
    )


def double_opt_in_batch(phones: list[str]) -> str:
    return make_batch(
        [
            {
                "subscription_group_id": SMS_GROUP,
                "subscription_state": "subscribed",
                "phone": p,
                "use_double_opt_in_logic": True,
            }
            for p in phones
        ]
    )


def inflight(redis_client: Any) -> dict[str, str]:
    keys = services().keys
    return {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.inflight).items()}


def record(redis_client: Any, batch_id: str) -> dict[str, Any] | None:
    raw = redis_client.get(services().keys.batch(batch_id))
    return None if raw is None else json.loads(raw)


@pytest.fixture
def poster(env) -> Poster:
    found = services()
    return found.poster()


@pytest.fixture
def limited_poster(env) -> Iterator[Poster]:
    """A poster whose settings allow two attempts, with a Braze client of its own."""
    settings: Settings = load_settings(max_attempts=2)
    assert settings.rest_endpoint is not None and settings.braze_api_key is not None
    braze = BrazeClient(
        settings.rest_endpoint, settings.braze_api_key, timeout_seconds=5, max_connections=2
    )
    yield services().poster(braze, settings)
    braze.close()


def test_delivered_batch_ends_in_the_simulator(sim, poster, redis_client):
    values = [email(n) for n in range(3)]
    batch_id = email_batch(values, "unsubscribed")

    report = poster.post(batch_id)
    assert report.status == "delivered"
    assert report.http_status == 201
    assert report.size == 3
    assert report.attempt == 1

    state = sim_subscriptions(sim)
    assert {key: s["state"] for key, s in state.items()} == {
        (GROUP, "email", v): "unsubscribed" for v in values
    }
    assert record(redis_client, batch_id) is None
    assert inflight(redis_client) == {}
    assert services().batches.count() == 0
    stats = sim_stats(sim, log=True)
    assert stats["malformed"] == 0
    assert stats["requests_ok"] == 1
    assert [(r["identifiers"], r["entries"], r["status"]) for r in stats["requests"]] == [
        (3, 1, 201)
    ]
    # A message for a finished batch finds nothing to do.
    assert poster.post(batch_id).status == "gone"


def test_phone_batch_with_double_opt_in_is_a_valid_v1_body(sim, poster):
    phones = ["+14155550101", "+14155550102"]
    batch_id = double_opt_in_batch(phones)
    assert poster.post(batch_id).status == "delivered"
    state = sim_subscriptions(sim)
    for phone in phones:
        assert state[(SMS_GROUP, "phone", phone)]["state"] == "subscribed"
        assert state[(SMS_GROUP, "phone", phone)]["double_opt_in"] is True
    assert sim_stats(sim)["malformed"] == 0


def test_outage_is_retried_with_the_attempt_counted_and_locks_kept(sim, poster, redis_client):
    keys = services().keys
    batch_id = email_batch([email(1), email(2)])
    locks = inflight(redis_client)
    faults(sim, outage=True)

    report = poster.post(batch_id)
    assert report.status == "retry"
    assert report.http_status == 503
    assert report.attempt == 1
    assert report.retry_in is not None
    assert 0 <= report.retry_in <= services().settings.retry_backoff_max_seconds

    kept = record(redis_client, batch_id)
    assert kept is not None
    assert kept["attempts"] == 1
    assert "503" in kept["error"]
    assert inflight(redis_client) == locks
    assert redis_client.hexists(keys.claim_tokens, batch_id) == 0
    # It waits in Redis, not in this process: a message for it now posts nothing.
    assert redis_client.hget(keys.schedule_reasons, batch_id) == b"retry"
    assert poster.post(batch_id).status == "queued"
    assert sim_subscriptions(sim) == {}
    assert sim_stats(sim)["server_errors"] == 1

    # The outage ends: the next try delivers.
    faults(sim, outage=False)
    assert come_due(batch_id) == [batch_id]
    report = poster.post(batch_id)
    assert (report.status, report.attempt) == ("delivered", 2)
    assert set(sim_subscriptions(sim)) == {(GROUP, "email", email(1)), (GROUP, "email", email(2))}
    assert inflight(redis_client) == {}


def test_dead_lettered_after_max_attempts_with_the_error(sim, limited_poster, redis_client):
    keys = services().keys
    values = [email(1), email(2)]
    batch_id = email_batch(values)
    faults(sim, outage=True)

    first = limited_poster.post(batch_id)
    assert (first.status, first.attempt) == ("retry", 1)
    come_due(batch_id)
    second = limited_poster.post(batch_id)
    assert (second.status, second.attempt) == ("dead_lettered", 2)

    assert record(redis_client, batch_id) is None
    assert inflight(redis_client) == {}
    [entry] = DeadLetters(redis_client, keys).list()
    assert entry.id == batch_id
    assert entry.subscription_group_id == GROUP
    assert entry.subscription_state == "subscribed"
    assert "503" in entry.error
    assert "outage" in entry.error
    assert sorted(i["value"] for i in entry.identifiers) == values
    assert int(redis_client.get(keys.dead_letter_identifiers)) == 2
    assert sim_stats(sim)["malformed"] == 0


def test_dead_letter_entry_counts_every_attempt_made(sim, limited_poster, redis_client):
    batch_id = email_batch([email(1)])
    faults(sim, outage=True)
    limited_poster.post(batch_id)
    come_due(batch_id)
    assert limited_poster.post(batch_id).status == "dead_lettered"
    assert sim_stats(sim)["server_errors"] == 2
    [entry] = DeadLetters(redis_client, services().keys).list()
    assert entry.attempts == 2  # both requests made are counted


def drive(poster: Poster, first: str) -> list[PostReport]:
    """Post a batch and every batch its posting puts into the schedule (halves, a refused
    half waiting for its sibling), like the tick and the workers would, without waiting
    for due times."""
    found = services()
    queue, reports = [first], []
    while queue:
        batch_id = queue.pop(0)
        reports.append(poster.post(batch_id))
        assert len(reports) < 500, [r.status for r in reports]
        waiting = [raw.decode() for raw in found.redis.zrange(found.keys.schedule, 0, -1)]
        queue += [b for b in come_due(*waiting) if b not in queue]
    return reports


@pytest.mark.parametrize("named", [True, False])
def test_only_the_rejected_identifier_is_dead_lettered(sim, poster, redis_client, named):
    values = [email(n) for n in range(50)]
    batch_id = email_batch(values)
    faults(sim, reject=[email(17)])
    if not named:  # Braze's message does not say which identifier: halving finds it
        original = poster.braze.post

        def anonymous(path, body, **options):
            reply = original(path, body, **options)
            return (
                replace(reply, body='{"message": "Bad request"}') if reply.status == 400 else reply
            )

        poster.braze.post = anonymous

    reports = drive(poster, batch_id)

    [entry] = DeadLetters(redis_client, services().keys).list()
    assert [i["value"] for i in entry.identifiers] == [email(17)]
    assert entry.error.startswith("HTTP 400")
    assert entry.attempts == 1
    delivered = {value for (_g, _k, value) in sim_subscriptions(sim)}
    assert delivered == set(values) - {email(17)}
    assert inflight(redis_client) == {}
    extra = sum(r.http_status is not None for r in reports) - 1  # requests after the first
    assert extra <= (2 if named else 2 * math.ceil(math.log2(50))), [r.status for r in reports]
    assert sim_stats(sim)["malformed"] == 0
    # The exporter's totals: every split, and every request by its HTTP status.
    splits = sum(r.status == "split" for r in reports)
    assert splits >= 1
    assert int(redis_client.hget(services().keys.stats, "splits")) == splits
    by_code = {c.status: c.total for c in read_extras(redis_client, services().keys).requests}
    answered = [r.http_status for r in reports if r.http_status is not None]
    assert by_code == {str(code): answered.count(code) for code in set(answered)}


def test_revoked_key_is_retried_without_spending_an_attempt(sim, poster, redis_client):
    batch_id = email_batch([email(1)])
    locks = inflight(redis_client)
    faults(sim, api_keys=["other"])

    report = poster.post(batch_id)
    assert report.status == "retry"
    assert report.http_status == 401
    assert 0 < report.retry_in <= services().settings.credentials_probe_seconds * 1.25
    kept = record(redis_client, batch_id)
    assert kept["attempts"] == 0
    assert "401" in kept["error"]
    assert inflight(redis_client) == locks
    assert sim_stats(sim)["unauthorized"] == 1

    faults(sim, api_keys=["other", "sim-key"])
    assert redis_client.hget(services().keys.schedule_reasons, batch_id) == b"credentials"
    # The next probe is due (a probe interval later): it delivers, and posting resumes.
    redis_client.hset(services().keys.credentials, "probe_at", 0)
    come_due(batch_id)
    report = poster.post(batch_id)
    assert (report.status, report.attempt) == ("delivered", 1)
    assert services().limiter.state().circuit is None
    assert (GROUP, "email", email(1)) in sim_subscriptions(sim)


def test_rate_limited_is_retried_after_the_window_without_spending_an_attempt(
    sim, poster, redis_client
):
    batch_id = email_batch([email(1), email(2)])
    locks = inflight(redis_client)
    # Another client has spent Braze's whole window (a short one, so the test sees it end).
    faults(sim, rate_limit=2, window_seconds=3, spend=2)

    refused_at = time.time()
    report = poster.post(batch_id)
    assert report.status == "retry"
    assert report.http_status == 429
    assert report.attempt == 1
    # Until Braze's reset (at most one window), plus the poster's jitter of up to 0.5 s.
    assert 0 < report.retry_in <= 3 + 0.5
    kept = record(redis_client, batch_id)
    assert kept["attempts"] == 0
    assert inflight(redis_client) == locks
    stats = sim_stats(sim)
    assert stats["rate_limited_429"] == 1
    assert stats["requests_ok"] == 0
    assert stats["malformed"] == 0
    assert sim_subscriptions(sim) == {}

    # After the window: the retry the poster asked for delivers, as attempt 1 still.
    wait_for(
        lambda: (
            time.time() >= refused_at + report.retry_in and sim_stats(sim)["window_remaining"] == 2
        ),
        timeout=10,
        what="Braze's window to reset",
    )
    assert redis_client.hget(services().keys.schedule_reasons, batch_id) == b"paused"
    come_due(batch_id)
    retried = poster.post(batch_id)
    assert (retried.status, retried.attempt) == ("delivered", 1), retried
    assert {key: found["state"] for key, found in sim_subscriptions(sim).items()} == {
        (GROUP, "email", email(1)): "subscribed",
        (GROUP, "email", email(2)): "subscribed",
    }
    assert sim_stats(sim)["rate_limited_429"] == 1
    assert inflight(redis_client) == {}


def test_superseded_member_is_not_sent(sim, poster, redis_client):
    batch_id = email_batch([email(1), email(2)], "subscribed")
    services().buffer.enqueue(
        [
            parse_change(
                {
                    "subscription_group_id": GROUP,
                    "subscription_state": "unsubscribed",
                    "email": email(1),
                }
            )
        ]
    )
    report = poster.post(batch_id)
    assert (report.status, report.size) == ("delivered", 1)
    assert set(sim_subscriptions(sim)) == {(GROUP, "email", email(2))}
    # The newer change is now due, no longer locked.
    field = buffer_field(GROUP, "email", email(1))
    assert redis_client.zscore(services().keys.due_live, field) is not None  # the live lane


# --------------------------------------------------------------------------------------
# Packs: the coalescer sends one message per pack; a v1 poster hands out the rest
# --------------------------------------------------------------------------------------


def cut_pack_of_two(values: list[str]) -> tuple[str, str, str]:
    """The same users change two groups: one tick cuts a pack of two batches and sends
    one message. Returns (lead id, its group, sibling id)."""
    found = services()
    found.buffer.enqueue(
        [
            parse_change(
                {"subscription_group_id": g, "subscription_state": "subscribed", "email": v}
            )
            for g in (GROUP, "promo")
            for v in values
        ]
    )
    sent: list[str] = []
    settings = load_settings(batch_linger_seconds=0, braze_api_version="v2")
    report = Coalescer(
        settings,
        found.buffer,
        found.batches,
        found.limiter,
        found.heartbeats,
        sent.append,
    ).tick()
    assert report.batches == 2
    [lead] = sent
    record = BatchRecord.from_json(found.redis.get(found.keys.batch(lead)))
    [sibling] = [batch_id for batch_id in record.pack if batch_id != lead]
    return lead, record.key.group_id, sibling


def test_v1_sends_every_batch_a_message_of_its_own(sim, redis_client):
    found = services()
    found.buffer.enqueue(
        [
            parse_change(
                {"subscription_group_id": g, "subscription_state": "subscribed", "email": v}
            )
            for g in (GROUP, "promo")
            for v in (email(1), email(2))
        ]
    )
    sent: list[str] = []
    assert found.settings.braze_api_version == "v1"
    assert found.coalescer(sent.append).tick().batches == 2
    assert len(sent) == 2  # no pack: no worker has to hand out messages
    poster = found.poster()
    for batch_id in sent:
        report = poster.post(batch_id)
        assert (report.status, report.size, report.entries) == ("delivered", 2, 1)
    stats = sim_stats(sim)
    assert (stats["requests_ok"], stats["malformed"]) == (2, 0)
    assert inflight(redis_client) == {}


def test_pack_sibling_is_sent_when_its_lead_was_superseded(sim, redis_client):
    found = services()
    values = [email(1), email(2)]
    lead, lead_group, sibling = cut_pack_of_two(values)
    found.buffer.enqueue(
        [
            parse_change(
                {
                    "subscription_group_id": lead_group,
                    "subscription_state": "unsubscribed",
                    "email": v,
                }
            )
            for v in values
        ]
    )
    settings = load_settings(braze_api_version="v2")
    poster = found.poster(settings=settings)

    assert poster.post(lead).status == "empty"
    # The sibling was to travel with the lead's message: it waits in the schedule, due now,
    # and the next tick sends it a message of its own.
    assert found.batches.dispatch_due(10, 120_000) == [sibling]
    report = poster.post(sibling)
    assert (report.status, report.entries) == ("delivered", 1)


def test_a_refused_key_stops_every_worker_until_a_probe_gets_through(sim, redis_client):
    found = services()
    settings = load_settings(credentials_probe_seconds=0.3)
    limiter = RateLimiter(
        redis_client,
        found.limiter.key,
        found.limiter.budget,
        max_wait_seconds=2,
        probe_interval_seconds=settings.credentials_probe_seconds,
        credentials_key=found.keys.credentials,
        workspace=found.settings.workspace_id,
    )
    poster = Poster(
        settings,
        found.batches,
        found.braze,
        limiter,
        found.liveness,
        Counters(found.redis, found.keys),
        Refusals(found.redis, found.keys),
    )
    first, second = email_batch([email(1)]), email_batch([email(2)], "unsubscribed")
    faults(sim, api_keys=["revoked"])

    report = poster.post(first)
    assert (report.status, report.http_status) == ("retry", 401)
    status = read_status(redis_client, found.keys, limiter)
    assert status.credentials_refused and "401" in status.credentials_refused
    assert status.credentials_refused_since is not None
    assert status.paused and status.tokens_left == 0
    # Every other worker stops too: the second batch is not even sent.
    assert poster.post(second).status == "waiting"
    assert sim_stats(sim)["unauthorized"] == 1
    waiting = {raw.decode() for raw in redis_client.hgetall(found.keys.schedule_reasons).values()}
    assert waiting == {"credentials"}
    # A duplicate message while they wait posts nothing.
    assert poster.post(first).status == "queued"

    faults(sim, api_keys=["revoked", "sim-key"])  # the key works again

    reports: dict[str, PostReport] = {}

    def probe() -> PostReport | None:
        # The tick's part: send the batches whose time has come (the probe's).
        for batch_id in found.batches.dispatch_due(10, 120_000):
            reports[batch_id] = poster.post(batch_id)
        delivered = reports.get(first)
        return delivered if delivered and delivered.status == "delivered" else None

    delivered = wait_for(probe, timeout=5, interval=0.05)
    assert delivered.attempt == 1, "a refused key spends no attempt"
    assert limiter.state().circuit is None
    # The probe's success releases the others at once, not a probe interval later.
    if reports.get(second) is None or reports[second].status != "delivered":
        assert found.batches.dispatch_due(10, 120_000) == [second]
        assert poster.post(second).status == "delivered"
    assert DeadLetters(redis_client, found.keys).list() == []
    assert read_status(redis_client, found.keys, limiter).credentials_refused is None


def test_a_working_key_seen_by_any_worker_clears_the_refusal_for_every_reader(sim, redis_client):
    """Issue 27: the credentials state belonged to the budget of the key that saw the 401,
    so after a rotation the exporter, beat and `status` holding the old key kept saying
    posting was stopped. Now it is the deployment's: a success with another key closes it
    for every reader, and every batch that waited for the key is due at once."""
    from delivery.services import Services

    new = services()  # this process holds the key the simulator accepts
    old = Services(load_settings(braze_api_key="the-old-key"))
    try:
        faults(sim, api_keys=["sim-key"])
        old_poster = old.poster()
        first, second = email_batch([email(1)]), email_batch([email(2)], "unsubscribed")
        assert old_poster.post(first).http_status == 401
        assert old_poster.post(second).status == "waiting"  # not sent: the key is refused
        assert sim_stats(sim)["unauthorized"] == 1
        reasons = redis_client.hgetall(new.keys.schedule_reasons)
        assert {r.decode() for r in reasons.values()} == {"credentials"}

        readers = {"old key": old.limiter, "new key": new.limiter, "no key": None}
        for name, limiter in readers.items():
            refused = read_status(redis_client, new.keys, limiter).credentials_refused
            assert refused and "401" in refused, name
        assert old.limiter.state().circuit_here and not new.limiter.state().circuit_here

        # A worker with the new key posts another batch: its success closes the circuit.
        third = email_batch([email(3)])
        assert new.poster().post(third).status == "delivered"
        for name, limiter in readers.items():
            status = read_status(redis_client, new.keys, limiter)
            assert status.credentials_refused is None, name
            assert not status.paused, name
        assert redis_client.exists(new.keys.credentials) == 0
        # Both waiting batches are due now, not a probe interval later.
        assert sorted(new.batches.dispatch_due(10, 120_000)) == sorted([first, second])
        for batch_id in (first, second):
            assert new.poster().post(batch_id).status == "delivered"
        # The old key is no longer fenced off: it would be tried (and refused) again.
        grant = old.limiter.acquire()
        assert grant.granted and not grant.probe and not grant.check
    finally:
        if "braze" in old.__dict__:
            old.braze.close()
        if "liveness" in old.__dict__:
            old.liveness.stop()


def test_a_turn_reserved_before_the_key_was_refused_waits_for_the_key(
    sim, redis_client, monkeypatch
):
    """A worker granted a turn before another worker saw the 401 does not send with the
    refused key after its wait, and its batch waits labelled for the key (not "paused
    after a 429")."""
    found = services()
    poster = found.poster()
    batch_id = email_batch([email(1)])
    real_wait = found.liveness.wait
    spend_the_burst(found.limiter)  # the post's turn is one interval off: it waits
    waits: list[float] = []

    def wait_while_another_worker_sees_a_401(seconds: float) -> bool:
        waits.append(seconds)
        found.limiter.open_circuit("HTTP 401: Invalid API key")
        return real_wait(seconds)

    monkeypatch.setattr(found.liveness, "wait", wait_while_another_worker_sees_a_401)
    report = poster.post(batch_id)
    assert waits and waits[0] > 0
    assert report.status == "waiting"
    assert sim_stats(sim)["requests_total"] == 0
    assert redis_client.hget(found.keys.schedule_reasons, batch_id) == b"credentials"


def test_brazes_headers_reach_the_budget_only_when_they_could_move_it(
    sim, redis_client, monkeypatch
):
    """Braze's rate-limit headers after a request go to observe_rate_limit.lua only when
    they could move the budget (issue 26: one round trip of the worker's CPU a post): not
    for a window with room left, as at the default budget's first request; yes once
    another client has spent most of Braze's window, and the budget then yields."""
    found = services()
    poster = found.poster()
    calls: list[tuple[Any, ...]] = []
    real = found.limiter._observe

    def observed(*args: Any) -> bool:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(found.limiter, "_observe", observed)
    assert poster.post(email_batch([email(1)])).status == "delivered"
    assert calls == []
    # The spend and the post land in one of Braze's minutes: not in its last seconds.
    while 60 - time.time() % 60 < 5:
        time.sleep(0.1)
    faults(sim, spend=4_900)  # of the simulator's 5,000 a minute, as BRAZE_RATE_LIMIT's
    assert poster.post(email_batch([email(2)])).status == "delivered"
    assert [call[2] for call in calls] == ["observe"]
    # Yielded: the next turn is not now. Refused, or (when Braze's reset is within the
    # longest wait a turn may have) granted for later, ahead of Braze's reset.
    assert found.limiter.acquire().wait_seconds > 0


def spend_the_burst(limiter: RateLimiter) -> None:
    """Reserve turns until the next one is not now (the budget's burst is spent)."""
    for _ in range(10_000):
        if limiter.acquire().wait_seconds > 0:
            return
    raise AssertionError("the budget never made a turn wait")


def test_a_turn_granted_for_now_goes_without_reading_the_pause_again(
    sim, redis_client, monkeypatch
):
    """The script that grants a turn for now read the pause and the circuit at that
    instant: the post does not read them again before its request (issue 26: a round trip
    of the worker's CPU a post), and goes out."""
    found = services()
    poster = found.poster()
    batch_id = email_batch([email(1)])

    def must_not_read() -> tuple[float, str]:
        raise AssertionError("the pause was read again for a turn granted for now")

    monkeypatch.setattr(found.limiter, "pause_after_turn", must_not_read)
    assert poster.post(batch_id).status == "delivered"
    assert sim_stats(sim)["requests_total"] == 1


# --------------------------------------------------------------------------------------
# Fencing: the claim is checked right before the send
# --------------------------------------------------------------------------------------


def test_a_claim_lost_while_waiting_for_a_turn_is_never_sent(sim, redis_client, monkeypatch):
    """A worker waits for its turn in the budget (or freezes) past its lease; meanwhile the
    batch is taken back and claimed by another worker. Waking up, it must not post: the new
    holder may already have sent a newer state for these identifiers."""
    found = services()
    batch_id = email_batch([email(1), email(2)])
    # The budget is promised a little ahead: the grant comes with a short wait, which is
    # where the poster waits, and where this test takes the claim away.
    now = server_time_ms(redis_client)
    redis_client.hset(found.limiter.key, "tat", now + found.limiter.budget.tolerance_ms + 300)

    def taken_over(_seconds: float) -> bool:
        redis_client.hset(found.keys.claim_tokens, batch_id, "another-worker/1")
        return True

    monkeypatch.setattr(found.liveness, "wait", taken_over)
    report = found.poster().post(batch_id)

    assert report.status == "lost"
    assert sim_stats(sim, log=True)["requests"] == []  # nothing reached Braze
    assert record(redis_client, batch_id) is not None  # the batch is the new holder's
    assert redis_client.hget(found.keys.claim_tokens, batch_id) == b"another-worker/1"


def test_a_claim_with_too_little_lease_left_is_not_sent(sim, redis_client, monkeypatch):
    """The lease must outlast the whole request (HTTP_TIMEOUT_SECONDS), or a take-over
    could run beside it."""
    found = services()
    batch_id = email_batch([email(3)])
    now = server_time_ms(redis_client)
    redis_client.hset(found.limiter.key, "tat", now + found.limiter.budget.tolerance_ms + 300)
    timeout_ms = round(found.settings.http_timeout_seconds * 1000)

    def lease_runs_short(_seconds: float) -> bool:
        ends = server_time_ms(redis_client) + timeout_ms // 2
        redis_client.zadd(found.keys.claims, {batch_id: ends})
        return True

    monkeypatch.setattr(found.liveness, "wait", lease_runs_short)
    assert found.poster().post(batch_id).status == "lost"
    assert sim_stats(sim, log=True)["requests"] == []


def test_a_stopping_worker_hands_its_batch_back_unsent(sim, redis_client):
    """SIGTERM: a post that has not sent yet puts its batch back, due now, for another
    worker; no attempt is spent and nothing reaches Braze."""
    found = services()
    batch_id = email_batch([email(5)])
    found.liveness.begin_stop()
    report = found.poster().post(batch_id)
    assert report.status == "handed_back"
    assert sim_stats(sim, log=True)["requests"] == []
    assert redis_client.hget(found.keys.schedule_reasons, batch_id) == b"handed_back"
    assert found.batches.dispatch_due(10, 120_000) == [batch_id]
    assert record(redis_client, batch_id)["attempts"] == 0


def test_fence_passes_for_the_holder_with_lease_enough(redis_client, env):
    found = services()
    batch_id = email_batch([email(4)])
    claim = found.batches.claim(batch_id, "me", 60_000)
    assert claim.record is not None
    assert found.batches.fence([batch_id], "me", 10_000)
    assert not found.batches.fence([batch_id], "someone-else", 10_000)
    assert not found.batches.fence([batch_id], "me", 61_000)


def test_the_fence_runs_right_before_the_first_byte(sim, redis_client, monkeypatch):
    """The claim is checked after the connection is ready, immediately before the request
    is written (httpcore's trace hook): a claim taken back while the worker waited for a
    connection still stops the request, and nothing reaches Braze."""
    found = services()
    batch_id = email_batch([email(6)])
    turn_a_moment_off()  # a turn for now: the claim fences (tests/integration/test_claim_fence.py)
    original = found.batches.fence
    checked: list[bool] = []

    def fence_after_take_back(ids: list[str], token: str, need_ms: int) -> bool:
        redis_client.hset(found.keys.claim_tokens, batch_id, "another-worker/1")
        checked.append(original(ids, token, need_ms))
        return checked[-1]

    monkeypatch.setattr(found.batches, "fence", fence_after_take_back)
    report = found.poster().post(batch_id)
    assert (report.status, checked) == ("lost", [False])
    assert sim_stats(sim, log=True)["requests"] == []


def test_an_error_mid_post_gives_the_batch_back_at_once(sim, redis_client, monkeypatch):
    """A bug or a dropped connection in this process while it posts: the batch goes back
    into the schedule (no attempt spent) instead of waiting for its lease to run out."""
    found = services()
    batch_id = email_batch([email(7)])

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(found.braze, "post", broken)
    with pytest.raises(RuntimeError):
        found.poster().post(batch_id)
    assert redis_client.hexists(found.keys.claim_tokens, batch_id) == 0
    assert redis_client.hget(found.keys.schedule_reasons, batch_id) == b"retry"
    assert record(redis_client, batch_id)["attempts"] == 0
    assert found.liveness.held() == {}


def test_a_thawed_post_whose_connection_redis_closed_is_tried_again_and_sends_nothing(
    sim, redis_client, monkeypatch
):
    """A worker frozen mid-call past its lease: the tick took its batch back, and Redis
    closed its idle connection. Thawed, the call raises "Connection closed by server";
    it is tried again like any error of a Redis that does not answer, finds the batch
    another worker's, and the post ends with nothing sent. Before, the post raised (its
    Celery task failed, no report named the batch). The call is the claim, which reads the
    group's refusal too (claim_batch.lua; the refusal check was a call of its own before
    issue 26, where this failure was injected): the claim was made and its answer lost."""
    found = services()
    batch_id = email_batch([email(9)])
    poster = found.poster()
    original = poster.store.claim
    calls: list[str] = []

    def thawed(*args: Any, **kwargs: Any) -> Any:
        calls.append("claim")
        if len(calls) == 1:
            original(*args, **kwargs)  # made, then frozen past the lease: taken back
            redis_client.hset(found.keys.claim_tokens, batch_id, "another-worker/1")
            raise RedisConnectionError("Connection closed by server.")
        return original(*args, **kwargs)

    monkeypatch.setattr(poster.store, "claim", thawed)
    report = poster.post(batch_id)
    assert (report.status, len(calls)) == ("busy", 2)
    assert sim_stats(sim, log=True)["requests"] == []
    assert redis_client.hget(found.keys.claim_tokens, batch_id) == b"another-worker/1"
    assert found.liveness.held() == {}


def test_a_post_failing_on_redis_after_its_claim_was_lost_reports_lost(
    sim, redis_client, monkeypatch
):
    """Any step of a post that Redis fails (a connection it closed while this worker was
    frozen) after the claim was taken back: the give-back finds the batch not this post's,
    and the post reports `lost` instead of raising; the batch stays its new holder's."""
    found = services()
    batch_id = email_batch([email(10)])

    def thawed(*_args: Any, **_kwargs: Any) -> Any:
        redis_client.hset(found.keys.claim_tokens, batch_id, "another-worker/1")
        raise RedisConnectionError("Connection closed by server.")

    poster = found.poster()
    # The first step after the claim (and its turn: one call) for a short v1 batch whose
    # turn comes a moment later (a turn for now: the claim fences and the request goes).
    turn_a_moment_off()
    monkeypatch.setattr(poster.store, "top_up_before_send", thawed)
    report = poster.post(batch_id)
    assert report.status == "lost"
    assert sim_stats(sim, log=True)["requests"] == []
    assert redis_client.hget(found.keys.claim_tokens, batch_id) == b"another-worker/1"
    assert found.liveness.held() == {}


def test_a_double_opt_in_batch_is_posted_once_whatever_the_messages(sim, redis_client):
    """Each post of a double opt-in batch sends another text: duplicate messages (a slow
    queue, the sweep, a late redelivery) arriving while it waits for its turn, while it
    is posted, and after it ended must post nothing."""
    found = services()
    phones = ["+14155550111", "+14155550112"]
    batch_id = double_opt_in_batch(phones)
    poster = found.poster()
    # 1. Its turn is far off: it waits in the schedule, and duplicates find it waiting.
    now = server_time_ms(redis_client)
    redis_client.hset(found.limiter.key, "tat", now + 60_000)
    assert poster.post(batch_id).status == "waiting"
    assert [poster.post(batch_id).status for _ in range(3)] == ["queued"] * 3
    # The sweep sees it waiting, not lost: no message from there either.
    redis_client.zadd(found.keys.batches, {batch_id: 0})
    assert found.batches.sweep(100, 120_000) == []
    # 2. Its turn comes: four messages race for it; one posts.
    redis_client.hdel(found.limiter.key, "tat")
    assert come_due(batch_id) == [batch_id]
    with ThreadPoolExecutor(4) as pool:
        statuses = sorted(r.status for r in pool.map(poster.post, [batch_id] * 4))
    assert statuses.count("delivered") == 1
    assert set(statuses) <= {"delivered", "busy", "gone"}
    # 3. After it ended, a late message finds it gone.
    assert poster.post(batch_id).status == "gone"
    assert len(sim_stats(sim, log=True)["requests"]) == 1
    assert sim_subscriptions(sim)[(SMS_GROUP, "phone", phones[0])]["double_opt_in"] is True


def test_a_post_whose_batch_was_taken_back_and_ended_meanwhile_reports_lost(
    sim, redis_client, monkeypatch
):
    """A worker freezes after its request went out; the batch is taken back, posted and
    ended by another. Thawed, it gets its 201: it reports `lost`, never `delivered`."""
    found = services()
    batch_id = email_batch([email(8)])
    original = found.braze.post

    def frozen_meanwhile(path: str, body: Any, **options: Any) -> Any:
        reply = original(path, body, **options)
        redis_client.hset(found.keys.claim_tokens, batch_id, "next-holder/1")
        assert found.batches.delivered(batch_id, "next-holder/1").status == "ended"
        return reply

    monkeypatch.setattr(found.braze, "post", frozen_meanwhile)
    report = found.poster().post(batch_id)
    assert (report.status, report.http_status) == ("lost", 201)


def test_a_workspace_holding_its_share_of_threads_puts_the_batch_back_unsent(sim, redis_client):
    """Several workspaces served: a post whose workspace holds its share of the process's
    threads sends nothing, spends no attempt, keeps the locks, and puts its batch back into
    the schedule due about when a seat is free; once a seat is free it is delivered, and
    the seat is given back after every post, whatever its end."""
    from delivery.thread_share import ThreadShare

    share = ThreadShare(4, 2)  # two workspaces served: this one alone may hold 3 of 4
    poster = services().poster()
    poster.share = share
    workspace = poster.workspace
    held = [share.take(workspace) for _ in range(3)]
    assert all(seat is not None for seat in held) and share.take(workspace) is None
    keys = services().keys
    batch_id = email_batch([email(1), email(2)])
    locks = inflight(redis_client)

    report = poster.post(batch_id)
    assert report.status == "waiting"
    assert report.http_status is None and report.retry_in is not None
    assert 0.5 <= report.retry_in <= 1.0
    assert redis_client.hget(keys.schedule_reasons, batch_id) == b"budget"
    kept = record(redis_client, batch_id)
    assert kept is not None and kept["attempts"] == 0
    assert "share of the worker's threads" in kept["error"]
    assert inflight(redis_client) == locks
    assert sim_stats(sim)["requests_ok"] == 0
    assert share.held(workspace) == 3  # it took none

    held[0].release()  # a post of the workspace ended: a seat is free
    assert come_due(batch_id) == [batch_id]
    assert poster.post(batch_id).status == "delivered"
    assert share.held(workspace) == 2  # the delivered post gave its seat back
    faults(sim, outage=True)
    assert poster.post(email_batch([email(3)])).status == "retry"
    assert share.held(workspace) == 2  # and so does a failed one


def test_a_claim_lost_with_a_failed_over_master_goes_back_into_the_schedule_at_once(
    sim, redis_client, monkeypatch
):
    """The master that took the claim dies before its replica has it: on the new master
    nobody holds the batch and its message is consumed. The post's finish finds no claim;
    the batch goes back into the schedule due now (not after BATCH_REDISPATCH_SECONDS' sweep),
    its locks kept, and its next post delivers it. A batch someone else holds is left alone."""
    found = services()
    keys = found.keys
    batch_id = email_batch([email(11), email(12)])
    other = email_batch([email(13)])
    locks = inflight(redis_client)
    original = found.braze.post

    def failed_over(path: str, body: Any, **options: Any) -> Any:
        reply = original(path, body, **options)
        for lost in (batch_id, other):  # the new master never saw these claims
            redis_client.zrem(keys.claims, lost)
            redis_client.hdel(keys.claim_tokens, lost)
            redis_client.hdel(keys.fences, lost)
        redis_client.zadd(keys.claims, {other: 10**13})  # ...and `other` was claimed since
        redis_client.hset(keys.claim_tokens, other, "next-holder/1")
        return reply

    monkeypatch.setattr(found.braze, "post", failed_over)
    report = found.poster().post(batch_id)
    assert (report.status, report.http_status) == ("lost", 201)
    assert redis_client.hget(keys.schedule_reasons, batch_id) == b"recovered"
    assert inflight(redis_client) == locks
    assert found.batches.recover_orphans([other], 1000) == []  # someone holds it
    assert redis_client.zscore(keys.schedule, other) is None
    monkeypatch.setattr(found.braze, "post", original)
    assert come_due(batch_id) == [batch_id]
    assert found.poster().post(batch_id).status == "delivered"
    assert found.batches.recover_orphans([batch_id], 1000) == []  # finished: never revived
    assert redis_client.zscore(keys.schedule, batch_id) is None
