"""The request counters a poster writes (stores/counters.py, count_request.lua), against a
real redis-server: what `status`, the linger's pressure and the exporter read back."""

from __future__ import annotations

from typing import Any

from config.settings import load_settings
from delivery.braze_client import V1_PATH, V2_PATH
from delivery.services import services
from stores.clock import server_time_ms
from stores.counters import RETENTION_SECONDS, Counters, last_minute, request_totals
from tests.conftest import email
from tests.integration.test_poster import cut_pack_of_two, email_batch
from tests.sim_control import faults, sim_stats


def test_a_request_is_counted_in_redis_second_and_in_the_totals(env, redis_client):
    """One round trip counts a post in the per-second hash of Redis's clock (which expires)
    and in the totals by endpoint and status; a 429 counts as throttled, without its
    identifiers; an answerless request is status "none"."""
    found = services()
    counters = Counters(found.redis, found.keys, found.scripts)
    before = server_time_ms(redis_client)
    counters.request(identifiers=50, throttled=False, endpoint="/v1", status=201)
    counters.request(identifiers=50, throttled=True, endpoint="/v1", status=429)
    counters.request(identifiers=7, throttled=False, endpoint="/v2", status=None)
    after = server_time_ms(redis_client)

    seconds = {before // 1000, after // 1000}
    counted = [found.keys.metrics(second) for second in seconds]
    assert any(redis_client.exists(key) for key in counted)
    for key in counted:
        if redis_client.exists(key):
            assert 0 < redis_client.ttl(key) <= RETENTION_SECONDS
    totals = last_minute(redis_client, found.keys, after)
    assert (totals.requests, totals.identifiers, totals.throttled) == (3, 57, 1)
    by_status = {
        (c.endpoint, c.status): c.total
        for c in request_totals(redis_client.hgetall(found.keys.request_totals))
    }
    assert by_status == {("/v1", "201"): 1, ("/v1", "429"): 1, ("/v2", "none"): 1}


def counted_by_status(redis_client: Any, keys: Any) -> dict[tuple[str, str], int]:
    return {
        (c.endpoint, c.status): c.total
        for c in request_totals(redis_client.hgetall(keys.request_totals))
    }


def test_a_delivered_post_is_counted_by_its_finish_a_v2_pack_once(sim, redis_client, monkeypatch):
    """Issue 26: a request Braze accepted is counted by the finish that records its outcome,
    in the same call (finish_batch.lua, after the outcome): no count_request.lua call; a v2
    pack's request once, by its first batch's finish. A request the finish does not end
    (here Braze's outage: a retry) is counted on its own, as before."""
    found = services()
    counts: list[Any] = []
    original = found.scripts.count_request

    def count_request(*args: Any, **kwargs: Any) -> Any:
        counts.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(found.scripts, "count_request", count_request)
    assert found.poster().post(email_batch([email(1), email(2)])).status == "delivered"
    lead, _, _ = cut_pack_of_two([email(3), email(4)])
    v2 = found.poster(settings=load_settings(braze_api_version="v2"))
    assert (v2.post(lead).status, v2.post(lead).status) == ("delivered", "gone")
    assert counts == []
    totals = last_minute(redis_client, found.keys, server_time_ms(redis_client))
    assert (totals.requests, totals.identifiers, totals.throttled) == (2, 4, 0)
    assert counted_by_status(redis_client, found.keys) == {(V1_PATH, "201"): 1, (V2_PATH, "201"): 1}

    faults(sim, outage=True)
    assert found.poster().post(email_batch([email(5)])).status == "retry"
    assert len(counts) == 1
    totals = last_minute(redis_client, found.keys, server_time_ms(redis_client))
    assert (totals.requests, totals.identifiers) == (3, 5)
    assert counted_by_status(redis_client, found.keys)[(V1_PATH, "503")] == 1


def test_a_finish_that_finds_its_claim_lost_still_counts_the_request(env, redis_client):
    """The request was sent whoever ends the batch: a finish told it counts it even when
    the claim was taken back meanwhile (it ends nothing then), as the count after the
    finish did; a finish told no request counts nothing."""
    found = services()
    counters = Counters(found.redis, found.keys, found.scripts)
    batch_id = email_batch([email(6)])
    assert found.batches.claim(batch_id, "w/1", 60_000).status == "claimed"
    redis_client.hset(found.keys.claim_tokens, batch_id, "another-worker/1")
    tally = counters.tally(identifiers=1, throttled=False, endpoint="/v1", status=201)
    assert found.batches.delivered(batch_id, "w/1", tally=tally).status == "lost"
    assert found.batches.delivered(batch_id, "another-worker/1").status == "ended"
    totals = last_minute(redis_client, found.keys, server_time_ms(redis_client))
    assert (totals.requests, totals.identifiers) == (1, 1)
    assert counted_by_status(redis_client, found.keys) == {("/v1", "201"): 1}


def test_a_count_that_fails_in_the_finish_leaves_every_outcome_recorded(sim, redis_client, caplog):
    """The count rides on the finish (issue 26), after its outcome: a count that fails
    there (here the totals key of another type: WRONGTYPE) is bookkeeping, logged and
    skipped as the count after the finish was. Before this was fixed, the first finish of a
    v2 pack raised after recording its own outcome: the pack's other batch was never
    finished, was given back as "outcome unknown" with an attempt counted, and its members
    went to Braze a second time though Braze had accepted them; a v1 post raised too."""
    found = services()
    redis_client.set(found.keys.request_totals, "not a hash")
    lead, _group, sibling = cut_pack_of_two([email(1), email(2)])
    v2 = found.poster(settings=load_settings(braze_api_version="v2"))

    assert v2.post(lead).status == "delivered"

    for batch_id in (lead, sibling):
        assert redis_client.get(found.keys.batch(batch_id)) is None  # ended, not given back
        assert redis_client.zscore(found.keys.schedule, batch_id) is None
    assert len(sim_stats(sim, log=True)["requests"]) == 1
    assert found.poster().post(email_batch([email(3)])).status == "delivered"
    assert "count the request failed after its outcome" in caplog.text
    assert email(1) not in caplog.text
