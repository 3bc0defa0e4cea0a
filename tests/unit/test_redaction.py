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


# --------------------------------------------------------------------------------------
# confine: a stored text names only the identifiers of the record it is written to
# --------------------------------------------------------------------------------------


def test_confine_masks_every_identifier_but_the_records_own():
    from core.redaction import confine

    text = "Invalid email: jane@example.com; user-7 unknown; +14155550100; bob@example.org"
    request = [
        ("email", "jane@example.com"),
        ("external_id", "user-7"),
        ("phone", "+14155550100"),
        ("email", "bob@example.org"),
    ]
    assert confine(text, request, keep=["bob@example.org"]) == (
        "Invalid email: j***@example.com; u*** unknown; +1*******100; bob@example.org"
    )
    assert "bob@example.org" not in confine(text, request)


def test_confine_masks_whole_words_only():
    """An external id `7` must not eat the 7 of `HTTP 400 at 17:07`."""
    from core.redaction import confine

    assert confine("HTTP 400 at 17:07 for 7", [("external_id", "7")]) == (
        "HTTP 400 at 17:07 for ***"
    )
    assert confine("user-77 and user-7.", [("external_id", "user-7")]) == "user-77 and u***."


def test_confine_masks_emails_and_phones_it_was_not_told_about():
    """A refusal's detail from an earlier batch, quoted in a later one."""
    from core.redaction import confine

    assert confine("group refused: carl@example.net, +447700900123", []) == (
        "group refused: c***@example.net, +4********123"
    )
    assert confine("", [("email", "a@b.c")]) == ""
