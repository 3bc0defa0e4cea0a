"""The scrubber: credentials out of whatever an exception or an answer says."""

from __future__ import annotations

from core.outcome import Outcome, classify
from core.redaction import scrub

KEY = "sk-live-0123456789abcdef"


def test_the_key_goes_in_every_form_an_exception_quotes_it():
    h11 = f"LocalProtocolError: Illegal header value b'Bearer {KEY}\\n'"
    assert KEY not in scrub(h11, [KEY + "\n"])
    assert KEY not in scrub(f"key={KEY!r}", [KEY])
    assert scrub("nothing secret here", [KEY]) == "nothing secret here"


def test_bearer_tokens_and_authorization_values_go_without_knowing_the_key():
    assert scrub(f"header Bearer {KEY} refused") == "header Bearer *** refused"
    assert KEY not in scrub(f"{{'Authorization': '{KEY}'}}")
    assert KEY not in scrub(f"authorization: {KEY}")


def test_url_userinfo_goes_and_the_rest_of_the_url_stays():
    text = "ConnectError: rediss://default:p4ss@redis.internal:6380/0 and https://u@h/x"
    assert scrub(text) == "ConnectError: rediss://***@redis.internal:6380/0 and https://***@h/x"


def test_classify_scrubs_transport_errors_and_bodies():
    assert KEY not in classify(None, error=f"Boom Bearer {KEY}").detail
    result = classify(400, f'{{"message": "bad auth Bearer {KEY}"}}')
    assert result.outcome is Outcome.BAD_REQUEST
    assert KEY not in result.detail
