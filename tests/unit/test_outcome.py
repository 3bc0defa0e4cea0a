"""Unit tests for `core.outcome`: classify, parse_rate_limit, backoff_seconds."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.outcome import (
    MAX_ANSWER_BYTES,
    MAX_ANSWER_DEPTH,
    MAX_DETAIL,
    Outcome,
    RateLimit,
    backoff_seconds,
    braze_message,
    classify,
    parse_answer,
    parse_rate_limit,
)
from core.refusal import delivery_errors

# --------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------


def expected_outcome(status: int, body: str = '{"message":"success"}') -> Outcome:
    """The rules, written independently of the code under test."""
    if 200 <= status <= 299:
        braze = body in ('{"message":"success"}', '{"message":"queued"}')
        return Outcome.DELIVERED if braze else Outcome.UNEXPECTED
    if 300 <= status <= 399:
        return Outcome.REDIRECTED
    if status == 429:
        return Outcome.RATE_LIMITED
    if status in (401, 403, 404):
        return Outcome.CREDENTIALS
    if status == 408 or 500 <= status <= 599:
        return Outcome.RETRYABLE
    if 400 <= status <= 499:
        return Outcome.BAD_REQUEST
    assert 100 <= status <= 199
    return Outcome.UNEXPECTED


@pytest.mark.parametrize(
    "body", ["", '{"message":"x"}', "<html>oops</html>", '{"message":"success"}']
)
def test_every_status_from_100_to_599(body):
    wrong = {
        status: (classify(status, body).outcome, expected_outcome(status, body))
        for status in range(100, 600)
        if classify(status, body).outcome is not expected_outcome(status, body)
    }
    assert wrong == {}


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (201, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (400, Outcome.BAD_REQUEST),
        (401, Outcome.CREDENTIALS),
        (403, Outcome.CREDENTIALS),
        (404, Outcome.CREDENTIALS),
        (408, Outcome.RETRYABLE),
        (409, Outcome.BAD_REQUEST),
        (413, Outcome.BAD_REQUEST),
        (422, Outcome.BAD_REQUEST),
        (429, Outcome.RATE_LIMITED),
        (500, Outcome.RETRYABLE),
        (502, Outcome.RETRYABLE),
        (503, Outcome.RETRYABLE),
        (504, Outcome.RETRYABLE),
        (100, Outcome.UNEXPECTED),
        (301, Outcome.REDIRECTED),
        (302, Outcome.REDIRECTED),
        (307, Outcome.REDIRECTED),
    ],
)
def test_named_statuses(status, outcome):
    assert classify(status, '{"message":"success"}').outcome is outcome


@pytest.mark.parametrize(
    "error", ["ConnectError: [Errno 111] Connection refused", "ReadTimeout: timed out"]
)
def test_no_response_is_retryable_with_the_error_text(error):
    result = classify(None, "", error)
    assert result.outcome is Outcome.RETRYABLE
    assert error in result.detail


def test_no_response_without_error_text_still_has_a_detail():
    result = classify(None)
    assert result.outcome is Outcome.RETRYABLE
    assert result.detail


def test_no_response_detail_is_one_short_line():
    result = classify(None, "", "SSLError: handshake failed\nline two\r\n" + "x" * 1000)
    assert result.outcome is Outcome.RETRYABLE
    assert "\n" not in result.detail and "\r" not in result.detail
    assert len(result.detail) <= MAX_DETAIL + len("HTTP 000: ")


def test_200_with_non_fatal_errors_is_delivered():
    body = json.dumps({"message": "success", "errors": ["invalid email: x"]})
    result = classify(200, body)
    assert result.outcome is Outcome.DELIVERED
    assert "success" in result.detail


def test_201_success_is_delivered():
    assert classify(201, '{"message":"success"}').outcome is Outcome.DELIVERED


def test_202_queued_is_delivered():
    result = classify(202, '{"message":"queued"}')
    assert result.outcome is Outcome.DELIVERED
    assert result.detail == "queued"


def test_400_detail_carries_brazes_message():
    message = "Either an email address or a phone number should be provided, but not both."
    result = classify(400, json.dumps({"message": message}))
    assert result.outcome is Outcome.BAD_REQUEST
    assert message in result.detail
    assert result.detail.startswith("HTTP 400")


def test_400_detail_carries_brazes_errors_too():
    body = json.dumps({"message": "Invalid", "errors": ["bad id: x"]})
    result = classify(400, body)
    assert "Invalid" in result.detail
    assert "bad id: x" in result.detail


def test_non_json_body_is_truncated_to_one_line():
    body = ("<html>\n  <body>Bad Gateway</body>\r\n\t</html>\n" * 40).strip()
    message = braze_message(body)
    assert len(message) == MAX_DETAIL
    assert "\n" not in message and "\r" not in message and "\t" not in message
    assert message.startswith("<html> <body>Bad Gateway</body> </html>")
    result = classify(400, body)
    assert result.outcome is Outcome.BAD_REQUEST
    assert result.detail == f"HTTP 400: {message}"


def test_empty_body_detail_names_the_status():
    assert "500" in classify(500, "").detail
    assert "503" in classify(503, "   ").detail
    assert classify(201, "").detail


# --------------------------------------------------------------------------------------
# only Braze's JSON is a delivery (issue 21 item 2); answers parsed defensively (item 4)
# --------------------------------------------------------------------------------------

HTML_PAGE = "<!DOCTYPE html><html><body>Welcome to the hotel Wi-Fi, user@example.com</body></html>"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (HTML_PAGE, "text/html; charset=utf-8"),
        ("", ""),
        ("OK", "text/plain"),
        ('{"message":"ok"}', "application/json"),
        ('{"status":"success"}', "application/json"),
        ('["success"]', "application/json"),
        ('"success"', "application/json"),
        ('{"message":"success"', "application/json"),
    ],
)
def test_a_2xx_that_is_not_brazes_json_is_not_a_delivery(body, content_type):
    result = classify(200, body, content_type=content_type)
    assert result.outcome is Outcome.UNEXPECTED
    assert result.detail.startswith("HTTP 200: unexpected answer")
    assert (content_type.split(";")[0] or "no content type") in result.detail
    assert len(result.detail) <= MAX_DETAIL + 100 and "\n" not in result.detail


def test_the_first_bytes_of_an_unexpected_answer_are_masked():
    """A proxy may echo the request, a pack's other batches too: whatever is shaped like an
    email or a phone number is masked before the detail is stored or logged."""
    result = classify(200, HTML_PAGE + " +14155550100", content_type="text/html")
    assert "user@example.com" not in result.detail and "u***@example.com" in result.detail
    body = "echo: jane.doe@example.com, +14155550100"
    detail = classify(200, body, content_type="text/plain").detail
    assert "jane.doe@example.com" not in detail and "j***@example.com" in detail
    assert "+14155550100" not in detail and "+1*******100" in detail


def test_a_truncated_2xx_is_not_a_delivery_even_if_its_start_is_brazes():
    result = classify(201, '{"message":"success"}', truncated=True)
    assert result.outcome is Outcome.UNEXPECTED
    assert "over the size cap" in result.detail


def test_a_redirect_is_its_own_outcome_naming_the_status_and_target():
    result = classify(301, "<html>Moved</html>", location="https://u:p@elsewhere.example/x")
    assert result.outcome is Outcome.REDIRECTED
    assert result.detail == "HTTP 301: redirect to https://***@elsewhere.example/x not followed"


@pytest.mark.parametrize("depth", [MAX_ANSWER_DEPTH + 1, 1_000, 100_000])
def test_deeply_nested_json_is_no_answer_and_raises_nothing(depth):
    nested = '{"message":"success","errors":' + "[" * depth + "]" * depth + "}"
    assert parse_answer(nested) is None
    assert classify(201, nested).outcome is Outcome.UNEXPECTED
    assert delivery_errors(nested) == []
    assert classify(400, nested).outcome is Outcome.BAD_REQUEST


def test_nesting_within_the_bound_is_parsed():
    errors = [{"identifier": {"email": ["x"]}}]
    body = json.dumps({"message": "success", "errors": errors})
    assert parse_answer(body) == {"message": "success", "errors": errors}
    assert classify(201, body).outcome is Outcome.DELIVERED


def test_a_body_over_the_cap_is_not_parsed():
    body = json.dumps({"message": "success", "pad": "x" * MAX_ANSWER_BYTES})
    assert parse_answer(body) is None
    assert classify(201, body).outcome is Outcome.UNEXPECTED


@settings(max_examples=200, deadline=None)
@given(status=st.integers(100, 599), body=st.text(max_size=2_000))
def test_detail_is_always_one_bounded_line(status, body):
    detail = classify(status, body).detail
    assert detail
    assert len(detail.splitlines()) == 1
    assert len(detail) <= MAX_DETAIL + len("HTTP 000: ")


# --------------------------------------------------------------------------------------
# parse_rate_limit
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "42", "x-ratelimit-reset": "17"},
        {"X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": "42", "X-RateLimit-Reset": "17"},
        {"X-RATELIMIT-LIMIT": "5000", "X-RATELIMIT-REMAINING": "42", "X-RATELIMIT-RESET": "17"},
        {"x-RateLimit-LIMIT": " 5000 ", "X-ratelimit-remaining": "42", "X-RATELIMIT-reset": "17"},
    ],
)
def test_rate_limit_headers_any_case(headers):
    assert parse_rate_limit(headers) == RateLimit(limit=5000, remaining=42, reset_epoch=17.0)


def test_rate_limit_missing_headers_are_none():
    assert parse_rate_limit({}) == RateLimit(None, None, None)
    assert parse_rate_limit({"content-type": "application/json"}) == RateLimit(None, None, None)
    only_reset = parse_rate_limit({"X-RateLimit-Reset": "1700000000"})
    assert only_reset == RateLimit(None, None, 1_700_000_000.0)


def test_rate_limit_float_reset_is_accepted():
    assert parse_rate_limit({"x-ratelimit-reset": "1700000000.25"}).reset_epoch == 1700000000.25


def test_rate_limit_zero_remaining_is_zero_not_none():
    assert parse_rate_limit({"x-ratelimit-remaining": "0"}).remaining == 0


@pytest.mark.parametrize("raw", ["", "abc", "-1", "-0.5", "nan", "NaN", "12abc", "1,000"])
def test_rate_limit_garbage_is_none(raw):
    headers = {
        "X-RateLimit-Limit": raw,
        "X-RateLimit-Remaining": raw,
        "X-RateLimit-Reset": raw,
    }
    assert parse_rate_limit(headers) == RateLimit(None, None, None)


@pytest.mark.parametrize("raw", ["inf", "Infinity", "1e999", "1e308", "9" * 400, "1e13"])
def test_rate_limit_infinite_or_absurd_is_none(raw):
    headers = {"X-RateLimit-Limit": raw, "X-RateLimit-Remaining": raw, "X-RateLimit-Reset": raw}
    assert parse_rate_limit(headers) == RateLimit(None, None, None)


@settings(max_examples=200, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(
            ["X-RateLimit-Limit", "x-ratelimit-remaining", "X-RATELIMIT-RESET", "other"]
        ),
        # No "e"/"inf": overflowing values are the known bug tested above.
        st.text(alphabet="0123456789.-+ xna_", max_size=8),
    )
)
def test_rate_limit_never_raises_on_numeric_looking_garbage(headers):
    result = parse_rate_limit(headers)
    for value in (result.limit, result.remaining, result.reset_epoch):
        assert value is None or value >= 0


# --------------------------------------------------------------------------------------
# backoff_seconds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 8, 10])
def test_backoff_within_exponential_ceiling(attempt):
    rng = random.Random(1234)
    ceiling = min(300.0, 2.0 * 2 ** (attempt - 1))
    values = [backoff_seconds(attempt, base=2.0, cap=300.0, rng=rng) for _ in range(200)]
    assert all(0.0 <= v <= ceiling for v in values)
    # Full jitter: the values spread over the range, not clustered at the top.
    assert min(values) < ceiling * 0.25
    assert max(values) > ceiling * 0.75


@pytest.mark.parametrize("attempt", [100, 1_000, 10**6])
def test_backoff_cap_for_huge_attempts(attempt):
    rng = random.Random(7)
    values = [backoff_seconds(attempt, base=2.0, cap=300.0, rng=rng) for _ in range(200)]
    assert all(0.0 <= v <= 300.0 for v in values)
    assert max(values) > 200.0  # the cap, not some tiny overflowed number, is the ceiling


@pytest.mark.parametrize("attempt", [0, -1, -1000])
def test_backoff_attempt_below_one_is_like_one(attempt):
    values = [backoff_seconds(attempt, base=2.0, cap=300.0, rng=random.Random(3)) for _ in "ab"]
    assert values == [backoff_seconds(1, base=2.0, cap=300.0, rng=random.Random(3))] * 2
    assert all(0.0 <= v <= 2.0 for v in values)


def test_backoff_is_deterministic_with_a_seeded_rng():
    first = [backoff_seconds(a, base=1.0, cap=60.0, rng=random.Random(42)) for a in range(1, 9)]
    again = [backoff_seconds(a, base=1.0, cap=60.0, rng=random.Random(42)) for a in range(1, 9)]
    assert first == again


def test_backoff_without_rng_uses_the_global_one():
    value = backoff_seconds(3, base=1.0, cap=60.0)
    assert 0.0 <= value <= 4.0


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(-10, 10_000),
    base=st.floats(0.001, 1_000.0),
    cap=st.floats(0.001, 100_000.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_backoff_bounds_property(attempt, base, cap, seed):
    value = backoff_seconds(attempt, base=base, cap=cap, rng=random.Random(seed))
    exponent = max(attempt, 1) - 1
    ceiling = cap if exponent > 1_000 else min(cap, base * 2.0**exponent)
    assert math.isfinite(value)
    assert 0.0 <= value <= ceiling
    assert value <= cap


def test_default_retry_schedule_is_about_twenty_minutes():
    """README: 15 attempts ≈ 20 min of backoff on average, then dead-lettered. Between 15
    attempts there are 14 waits, each uniform in [0, min(cap, base·2^(n-1))] at the default
    base (2 s) and cap (300 s): ceilings 2, 4, … 256, then 300 six times."""
    from config.settings import Settings

    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    attempts = defaults["max_attempts"]
    base = defaults["retry_backoff_base_seconds"]
    cap = defaults["retry_backoff_max_seconds"]
    ceilings = [min(cap, base * 2 ** (n - 1)) for n in range(1, attempts)]
    assert ceilings == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300, 300, 300]
    mean, longest = sum(ceilings) / 2, sum(ceilings)
    assert (mean, longest) == (1155.0, 2310.0)  # 19.25 min on average, 38.5 min at most
    assert 18 * 60 <= mean <= 22 * 60
    rng = random.Random(15)
    runs = [
        sum(backoff_seconds(n, base=base, cap=cap, rng=rng) for n in range(1, attempts))
        for _ in range(2000)
    ]
    assert abs(sum(runs) / len(runs) - mean) < 15  # the jittered schedule averages that
    assert max(runs) <= longest
