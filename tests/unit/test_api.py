"""The HTTP API's pure parts: token checks, the OpenAPI document, the metrics' reading."""

from __future__ import annotations

import pytest

from api.openapi import openapi_document
from api.tokens import BearerTokens
from config.settings import SettingsError, load_settings
from core.changes import KNOWN_FIELDS
from stores.api_metrics import DURATION_BUCKETS, INF, read_api_totals


def test_tokens_accept_only_a_bearer_of_one_of_them():
    tokens = BearerTokens(["first-token-0123456", "second-token-012345"])
    assert tokens.accepts("Bearer first-token-0123456")
    assert tokens.accepts("bearer  second-token-012345 ")
    for header in (
        None,
        "",
        "Bearer",
        "Bearer first-token-012345",
        "Basic first-token-0123456",
        "first-token-0123456",
        "Bearer first-token-01234567",
    ):
        assert not tokens.accepts(header), header
    assert "first" not in repr(tokens) and "012345" not in repr(tokens)


def test_tokens_come_from_the_variable_and_the_file_and_short_ones_stop_the_start(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\n\nfile-token-0123456789\n")
    settings = load_settings(api_tokens="a-token-0123456789ab,", api_tokens_file=str(path))
    assert settings.require_api_tokens() == ["a-token-0123456789ab", "file-token-0123456789"]
    assert "a-token" not in repr(settings)
    with pytest.raises(SettingsError, match="API_TOKENS: missing"):
        load_settings(api_tokens=None).require_api_tokens()
    with pytest.raises(SettingsError, match="token 2 must be at least 16"):
        load_settings(api_tokens="a-token-0123456789ab,short").require_api_tokens()
    with pytest.raises(SettingsError, match="API_TOKENS_FILE: no such file"):
        load_settings(api_tokens_file=str(tmp_path / "missing"))


def test_the_openapi_document_lists_exactly_the_fields_the_parser_knows():
    document = openapi_document(1000)
    assert set(document["components"]["schemas"]["Change"]["properties"]) == set(KNOWN_FIELDS)
    responses = document["paths"]["/v1/changes"]["post"]["responses"]
    assert set(responses) == {"202", "401", "413", "415", "422", "503"}


def test_api_totals_read_back_as_a_cumulative_histogram():
    raw = {
        b"status 202": b"3",
        b"status 401": b"1",
        b"changes accepted": b"7",
        b"duration 0.001": b"2",
        b"duration 0.01": b"1",
        b"duration +Inf": b"1",
        b"duration sum": b"9.5",
    }
    totals = read_api_totals(raw)
    assert totals.requests == {"202": 3, "401": 1}
    assert totals.changes == {"accepted": 7, "stale": 0}
    assert totals.buckets[0] == ("0.001", 2)
    assert dict(totals.buckets)["0.01"] == 3
    assert totals.buckets[-1] == (INF, 4) and len(totals.buckets) == len(DURATION_BUCKETS) + 1
    assert totals.duration_sum == 9.5


def test_the_pending_estimate_reads_redis_at_most_every_tenth_and_counts_its_own(monkeypatch):
    from api import app

    reads = []
    clock = [100.0]
    monkeypatch.setattr(app.time, "monotonic", lambda: clock[0])
    estimate = app.PendingEstimate(lambda: reads.append(1) or 5)
    assert estimate.current() == 5 and estimate.current() == 5 and len(reads) == 1
    estimate.added(3)
    assert estimate.current() == 8 and len(reads) == 1
    clock[0] += 2 * app.PENDING_READ_SECONDS
    assert estimate.current() == 5 and len(reads) == 2  # Redis's count again
