"""The request counters a poster writes (stores/counters.py, count_request.lua), against a
real redis-server: what `status`, the linger's pressure and the exporter read back."""

from __future__ import annotations

from delivery.services import services
from stores.clock import server_time_ms
from stores.counters import RETENTION_SECONDS, Counters, last_minute, request_totals


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
