"""Unit and property tests for `core.changes.parse_change` and its normalisers."""

from __future__ import annotations

import time
from typing import Any

import phonenumbers
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from core.changes import (
    MAX_DELAY_SECONDS,
    MAX_EXTERNAL_ID_LENGTH,
    MAX_FUTURE_SECONDS,
    MAX_SOURCE_LENGTH,
    Change,
    IdentifierKind,
    InvalidChange,
    SubscriptionState,
    _normalise_email_fully,
    change_to_row,
    normalise_email,
    parse_change,
)

BASE: dict[str, Any] = {"subscription_group_id": "group-1", "subscription_state": "subscribed"}


def row(**fields: Any) -> dict[str, Any]:
    return {**BASE, **fields}


def error_of(data: dict[str, Any]) -> InvalidChange:
    with pytest.raises(InvalidChange) as caught:
        parse_change(data)
    return caught.value


# --------------------------------------------------------------------------------------
# Valid input and normalisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "kind", "value"),
    [
        ({"external_id": "user-1"}, IdentifierKind.EXTERNAL_ID, "user-1"),
        ({"external_id": "  user-1 \u00a0"}, IdentifierKind.EXTERNAL_ID, "user-1"),
        ({"external_id": "x" * MAX_EXTERNAL_ID_LENGTH}, IdentifierKind.EXTERNAL_ID, "x" * 512),
        ({"email": "alice@example.com"}, IdentifierKind.EMAIL, "alice@example.com"),
        ({"email": "  Alice.Smith@Example.COM "}, IdentifierKind.EMAIL, "alice.smith@example.com"),
        ({"email": "INFO@Example.com"}, IdentifierKind.EMAIL, "info@example.com"),
        ({"email": "a+tag@sub.example.co.uk"}, IdentifierKind.EMAIL, "a+tag@sub.example.co.uk"),
        ({"email": "Ünïcode@Bücher.de"}, IdentifierKind.EMAIL, "ünïcode@bücher.de"),
        ({"email": "bob@xn--bcher-kva.de"}, IdentifierKind.EMAIL, "bob@bücher.de"),
        ({"phone": "+14155550100"}, IdentifierKind.PHONE, "+14155550100"),
        ({"phone": "+1 (415) 555-0100"}, IdentifierKind.PHONE, "+14155550100"),
        ({"phone": " +1.415.555.0100 "}, IdentifierKind.PHONE, "+14155550100"),
        ({"phone": "+44 7911 123456"}, IdentifierKind.PHONE, "+447911123456"),
        ({"phone": "+49 (0)30 123456"}, IdentifierKind.PHONE, "+4930123456"),
        # Empty and None identifier fields count as absent (CSV columns, kwargs).
        ({"external_id": "u", "email": "", "phone": None}, IdentifierKind.EXTERNAL_ID, "u"),
        ({"email": "a@example.com", "phone": "   "}, IdentifierKind.EMAIL, "a@example.com"),
    ],
)
def test_identifier_normalisation(fields: dict[str, Any], kind: IdentifierKind, value: str) -> None:
    change = parse_change(row(**fields))
    assert change.kind is kind
    assert change.value == value


def test_full_change() -> None:
    change = parse_change(
        {
            "subscription_group_id": "  g-1  ",
            "subscription_state": " unsubscribed ",
            "external_id": "u1",
            "use_double_opt_in_logic": False,
            "delay_seconds": 30,
        }
    )
    assert change == Change(
        "g-1", SubscriptionState.UNSUBSCRIBED, IdentifierKind.EXTERNAL_ID, "u1", False, 30.0
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, False),
        (True, True),
        (False, False),
        ("true", True),
        ("TRUE", True),
        (" Yes ", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("0", False),
        ("", False),
    ],
)
def test_double_opt_in_values(raw: Any, expected: bool) -> None:
    change = parse_change(row(phone="+14155550100", use_double_opt_in_logic=raw))
    assert change.double_opt_in is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, 0.0),
        ("", 0.0),
        ("  ", 0.0),
        (0, 0.0),
        (-0.0, 0.0),
        (1.5, 1.5),
        ("120", 120.0),
        (" 2.5 ", 2.5),
        ("1e3", 1000.0),
        (MAX_DELAY_SECONDS, float(MAX_DELAY_SECONDS)),
    ],
)
def test_delay_values(raw: Any, expected: float) -> None:
    delay = parse_change(row(external_id="u", delay_seconds=raw)).delay_seconds
    assert delay == expected
    assert isinstance(delay, float)
    assert str(delay) != "-0.0"


def test_double_opt_in_with_external_id_and_subscribed() -> None:
    assert parse_change(row(external_id="u", use_double_opt_in_logic=True)).double_opt_in


# --------------------------------------------------------------------------------------
# Invalid input: (row, field, fragment of the message)
# --------------------------------------------------------------------------------------

INVALID: list[tuple[dict[str, Any], str, str]] = [
    # subscription_group_id
    ({"subscription_state": "subscribed", "external_id": "u"}, "subscription_group_id", "required"),
    (row(subscription_group_id=None, external_id="u"), "subscription_group_id", "required"),
    (row(subscription_group_id="", external_id="u"), "subscription_group_id", "required"),
    (row(subscription_group_id="   ", external_id="u"), "subscription_group_id", "blank"),
    (row(subscription_group_id=42, external_id="u"), "subscription_group_id", "must be a string"),
    (row(subscription_group_id="g" * 129, external_id="u"), "subscription_group_id", "at most 128"),
    (row(subscription_group_id="a\x1fb", external_id="u"), "subscription_group_id", "control"),
    (row(subscription_group_id="a\x00", external_id="u"), "subscription_group_id", "control"),
    (row(subscription_group_id="a\x7f", external_id="u"), "subscription_group_id", "control"),
    (row(subscription_group_id="g\n", external_id="u"), "subscription_group_id", "control"),
    # subscription_state
    ({"subscription_group_id": "g", "external_id": "u"}, "subscription_state", "required"),
    (row(subscription_state="Subscribed", external_id="u"), "subscription_state", "must be"),
    (row(subscription_state="opted_in", external_id="u"), "subscription_state", "must be"),
    (row(subscription_state=True, external_id="u"), "subscription_state", "must be a string"),
    # identifiers
    (row(), "identifier", "exactly one of external_id, email, phone is required"),
    (row(external_id="", email=None), "identifier", "is required"),
    (row(external_id="u", email="a@example.com"), "identifier", "external_id, email"),
    (row(email="a@example.com", phone="+14155550100"), "identifier", "email, phone"),
    (
        row(external_id="u", email="a@b.com", phone="+1415"),
        "identifier",
        "external_id, email, phone",
    ),
    (row(external_id=123), "external_id", "must be a string"),
    (row(email=["a@example.com"]), "email", "must be a string"),
    (row(phone=14155550100), "phone", "must be a string"),
    # external_id
    (row(external_id="x" * (MAX_EXTERNAL_ID_LENGTH + 1)), "external_id", "at most 512"),
    (row(external_id="a\tb"), "external_id", "control"),
    (row(external_id="a\x1b[31m"), "external_id", "control"),
    # email
    (row(email="not-an-email"), "email", "@-sign"),
    (row(email="a@b"), "email", "period"),
    (row(email="a@@example.com"), "email", ""),
    (row(email="a..b@example.com"), "email", "two periods"),
    (row(email="Alice <alice@example.com>"), "email", "display name"),
    (row(email="a@localhost"), "email", ""),
    (row(email="a@example.test"), "email", "special-use"),
    (row(email="a" * 250 + "@example.com"), "email", "too long"),
    # phone
    (row(phone="4155550100"), "phone", "international format, e.g. +14155550100"),
    (row(phone="(415) 555-0100"), "phone", "international format"),
    (row(phone="0044 7911 123456"), "phone", "international format"),
    (row(phone="+1 415 555 0100 ext 5"), "phone", "may contain only digits"),
    (row(phone="+1-800-FLOWERS"), "phone", "may contain only digits"),
    (row(phone="+1 415 555 010"), "phone", "not a valid phone number"),
    (row(phone="+1 000 555 0100"), "phone", "not a valid phone number"),
    (row(phone="+999 1234 5678"), "phone", "unknown country code"),
    (row(phone="+"), "phone", ""),
    (row(phone="+1"), "phone", ""),
    # use_double_opt_in_logic
    (row(phone="+14155550100", use_double_opt_in_logic="maybe"), "use_double_opt_in_logic", ""),
    (row(phone="+14155550100", use_double_opt_in_logic=1), "use_double_opt_in_logic", "true or"),
    (
        row(subscription_state="unsubscribed", phone="+14155550100", use_double_opt_in_logic=True),
        "use_double_opt_in_logic",
        "only meaningful with subscribed",
    ),
    (
        row(email="a@example.com", use_double_opt_in_logic="yes"),
        "use_double_opt_in_logic",
        "only for SMS groups (phone or external_id)",
    ),
    # delay_seconds
    (row(external_id="u", delay_seconds=-1), "delay_seconds", "negative"),
    (row(external_id="u", delay_seconds="-0.5"), "delay_seconds", "negative"),
    (row(external_id="u", delay_seconds=MAX_DELAY_SECONDS + 0.5), "delay_seconds", "at most"),
    (row(external_id="u", delay_seconds=float("nan")), "delay_seconds", "finite"),
    (row(external_id="u", delay_seconds="inf"), "delay_seconds", "finite"),
    (row(external_id="u", delay_seconds=10**400), "delay_seconds", "finite"),
    (row(external_id="u", delay_seconds="soon"), "delay_seconds", "number of seconds"),
    (row(external_id="u", delay_seconds=True), "delay_seconds", "number of seconds"),
    (row(external_id="u", delay_seconds=[1]), "delay_seconds", "number of seconds"),
    # unknown fields
    (row(external_id="u", emial="a@example.com"), "emial", "unknown field"),
    (row(external_id="u", external_ids=["u"]), "external_ids", "unknown field"),
]


@pytest.mark.parametrize(("data", "field", "fragment"), INVALID)
def test_invalid(data: dict[str, Any], field: str, fragment: str) -> None:
    exc = error_of(data)
    assert exc.field == field
    assert fragment in exc.message
    assert str(exc) == f"{field}: {exc.message}"
    assert "\n" not in str(exc)


def test_first_problem_is_reported() -> None:
    exc = error_of({"subscription_group_id": "", "subscription_state": "nope"})
    assert exc.field == "subscription_group_id"


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidChange):
        parse_change(["subscription_group_id"])  # type: ignore[arg-type]


def test_email_error_is_the_librarys_message() -> None:
    with pytest.raises(EmailNotValidError) as library:
        validate_email("a..b@example.com", check_deliverability=False)
    assert error_of(row(email="a..b@example.com")).message == str(library.value)


def test_change_to_row_round_trip() -> None:
    change = Change(
        "g", SubscriptionState.SUBSCRIBED, IdentifierKind.PHONE, "+14155550100", True, 5.0
    )
    assert parse_change(change_to_row(change)) == change


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------

_PHONE_REGIONS = ["US", "GB", "DE", "FR", "IN", "BR", "JP", "AU", "NG", "MX"]


@st.composite
def phone_inputs(draw: st.DrawFn) -> str:
    region = draw(st.sampled_from(_PHONE_REGIONS))
    example = phonenumbers.example_number(region)
    assert example is not None
    style = draw(
        st.sampled_from(
            [
                phonenumbers.PhoneNumberFormat.E164,
                phonenumbers.PhoneNumberFormat.INTERNATIONAL,
            ]
        )
    )
    text = phonenumbers.format_number(example, style)
    return draw(st.sampled_from(["", " ", "  "])) + text + draw(st.sampled_from(["", " "]))


def _mixed_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


@st.composite
def email_inputs(draw: st.DrawFn) -> str:
    address = draw(st.emails())
    return " " + _mixed_case(draw, address) if draw(st.booleans()) else address


_plain_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40
).filter(lambda text: text.strip() != "")


@st.composite
def valid_rows(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["external_id", "email", "phone"]))
    if kind == "email":
        value = draw(email_inputs())
    elif kind == "phone":
        value = draw(phone_inputs())
    else:
        value = draw(_plain_text)
    state = draw(st.sampled_from(["subscribed", "unsubscribed", " subscribed "]))
    data: dict[str, Any] = {
        "subscription_group_id": draw(_plain_text),
        "subscription_state": state,
        kind: value,
    }
    if kind != "email" and state.strip() == "subscribed":
        data["use_double_opt_in_logic"] = draw(st.sampled_from([True, False, "yes", "0", ""]))
    data["delay_seconds"] = draw(
        st.one_of(
            st.floats(min_value=0, max_value=MAX_DELAY_SECONDS),
            st.integers(min_value=0, max_value=MAX_DELAY_SECONDS).map(str),
        )
    )
    return data


@settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
    deadline=None,
)
@given(valid_rows())
def test_normalisation_is_idempotent(data: dict[str, Any]) -> None:
    try:
        change = parse_change(data)
    except InvalidChange:
        reject()  # e.g. an RFC-valid address that email-validator refuses (special-use)
    assert parse_change(change_to_row(change)) == change


@given(
    prefix=st.text(max_size=5),
    controls=st.text(alphabet=[chr(c) for c in [*range(0x20), 0x7F]], min_size=1),
    suffix=st.text(max_size=5),
)
def test_control_characters_in_group_id_are_rejected(
    prefix: str, controls: str, suffix: str
) -> None:
    for group_id in (controls, prefix + controls + suffix):
        exc = error_of(row(subscription_group_id=group_id, external_id="u"))
        assert exc.field == "subscription_group_id"


@settings(max_examples=500)
@given(
    st.one_of(
        st.emails(),
        st.from_regex(r"[A-Za-z0-9._%+!#-]{1,20}@[A-Za-z0-9.-]{1,30}", fullmatch=True),
        st.text(alphabet="aZ.-@_+xn-ü0", max_size=30),
    )
)
def test_email_fast_path_agrees_with_the_library(address: str) -> None:
    """The cached-domain fast path accepts, rejects and normalises exactly like the library."""
    try:
        expected: str | InvalidChange = _normalise_email_fully(address.strip())
    except InvalidChange as exc:
        expected = exc
    try:
        actual: str | InvalidChange = normalise_email(address)
    except InvalidChange as exc:
        actual = exc
    if isinstance(expected, InvalidChange):
        assert isinstance(actual, InvalidChange)
        assert actual.message == expected.message or not address.strip()
    else:
        assert actual == expected


@pytest.mark.parametrize("field", ["external_id", "email", "phone", "subscription_group_id"])
def test_lone_surrogates_are_refused_with_their_position(field):
    # json.loads('"a\\ud800b"') gives such a string; UTF-8 (Redis, Braze) cannot carry it.
    row = {"subscription_group_id": "g", "subscription_state": "subscribed", "external_id": "x"}
    if field in ("email", "phone"):
        del row["external_id"]
    row[field] = "a\ud800b"
    with pytest.raises(InvalidChange) as caught:
        parse_change(row)
    assert caught.value.field == field
    assert "lone surrogates" in caught.value.message and "position 1" in caught.value.message


# --------------------------------------------------------------------------------------
# occurred_at, source, respect_opt_out
# --------------------------------------------------------------------------------------

NOW = 1_795_845_600.0  # 2026-11-28T06:00:00Z


@pytest.mark.parametrize(
    ("raw", "expected_ms"),
    [
        ("2026-11-28T06:00:00Z", 1_795_845_600_000),
        ("2026-11-28t06:00:00z", 1_795_845_600_000),
        ("2026-11-28T07:00:00+01:00", 1_795_845_600_000),
        ("2026-11-28 05:59:59.250-00:00", 1_795_845_599_250),
        ("2026-11-27T20:00:00-10:00", 1_795_845_600_000),
        (1_795_845_600, 1_795_845_600_000),
        (1_795_845_600.5, 1_795_845_600_500),
        (" 1795845600 ", 1_795_845_600_000),
        ("1795845600.001", 1_795_845_600_001),
        (0, 0),
        # Up to MAX_FUTURE_SECONDS ahead: clock skew between producers is tolerated.
        (NOW + MAX_FUTURE_SECONDS, round((NOW + MAX_FUTURE_SECONDS) * 1000)),
    ],
)
def test_occurred_at_values(raw: Any, expected_ms: int) -> None:
    change = parse_change(row(external_id="u", occurred_at=raw), now=NOW)
    assert change.occurred_ms == expected_ms


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("2026-11-28T06:00:00", "needs a UTC offset"),
        ("2026-11-28", "must be RFC 3339"),
        ("yesterday", "must be RFC 3339"),
        ("2026-13-01T00:00:00Z", "is not a valid RFC 3339 time"),
        ("2026-11-28T25:00:00Z", "is not a valid RFC 3339 time"),
        (True, "must be an RFC 3339 time or epoch seconds"),
        ([1], "must be an RFC 3339 time or epoch seconds, got list"),
        ("nan", "must be a finite time"),
        (float("inf"), "must be a finite time"),
        (-1, "must not be before 1970"),
        (NOW + MAX_FUTURE_SECONDS + 1, "more than 5 minutes in the future"),
        ("2026-11-29T06:00:00Z", "more than 5 minutes in the future"),
        (NOW * 1000, "(milliseconds? give seconds)"),
        # Issue 21 item 7: integers no float can hold, and past the int/str limit.
        pytest.param(10**400, "in the future, beyond any time, got a 401-digit number", id="1e400"),
        pytest.param(-(10**400), "before 1970, got a 401-digit number", id="-1e400"),
        pytest.param(10**5000, "got a number of more than 4,300 digits", id="1e5000"),
        ("9" * 400, "must be a finite time"),
        ("9" * 5000, "must be a finite time"),
    ],
)
def test_occurred_at_refused(raw: Any, fragment: str) -> None:
    with pytest.raises(InvalidChange) as caught:
        parse_change(row(external_id="u", occurred_at=raw), now=NOW)
    assert caught.value.field == "occurred_at"
    assert fragment in caught.value.message
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "field", ["delay_seconds", "use_double_opt_in_logic", "respect_opt_out", "source"]
)
def test_an_integer_past_the_int_str_limit_is_refused_by_its_length(field: str) -> None:
    with pytest.raises(InvalidChange) as caught:
        parse_change(row(external_id="u", **{field: 10**5000}), now=NOW)
    assert caught.value.field == field
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize("blank", [None, "", "   "])
def test_blank_occurred_at_is_not_given(blank: Any) -> None:
    assert parse_change(row(external_id="u", occurred_at=blank)).occurred_ms is None


def test_occurred_at_future_limit_uses_the_clock() -> None:
    """Without `now`, the limit is counted from this machine's clock."""
    with pytest.raises(InvalidChange):
        parse_change(row(external_id="u", occurred_at=time.time() + MAX_FUTURE_SECONDS + 60))
    assert parse_change(row(external_id="u", occurred_at=time.time())).occurred_ms is not None


def test_source_is_trimmed_bounded_and_plain() -> None:
    assert parse_change(row(external_id="u", source=" checkout-form ")).source == "checkout-form"
    assert parse_change(row(external_id="u", source="  ")).source == ""
    assert parse_change(row(external_id="u")).source == ""
    longest = "s" * MAX_SOURCE_LENGTH
    assert parse_change(row(external_id="u", source=longest)).source == longest
    for bad, fragment in [
        ("s" * (MAX_SOURCE_LENGTH + 1), f"at most {MAX_SOURCE_LENGTH} characters"),
        ("a\x1fb", "control characters"),
        (5, "must be a string"),
    ]:
        with pytest.raises(InvalidChange) as caught:
            parse_change(row(external_id="u", source=bad))
        assert caught.value.field == "source"
        assert fragment in caught.value.message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, False), (True, True), (False, False), ("yes", True), ("0", False), ("", False)],
)
def test_respect_opt_out_values(raw: Any, expected: bool) -> None:
    assert parse_change(row(email="a@example.com", respect_opt_out=raw)).respect_opt_out is expected


def test_respect_opt_out_refuses_non_booleans() -> None:
    with pytest.raises(InvalidChange) as caught:
        parse_change(row(email="a@example.com", respect_opt_out="maybe"))
    assert caught.value.field == "respect_opt_out"


def test_change_to_row_round_trip_with_event_fields() -> None:
    change = Change(
        "g",
        SubscriptionState.UNSUBSCRIBED,
        IdentifierKind.EMAIL,
        "a@example.com",
        False,
        0.0,
        occurred_ms=1_795_845_599_250,
        source="support:ticket-123",
        respect_opt_out=True,
    )
    row_ = change_to_row(change)
    assert row_["occurred_at"] == "2026-11-28T05:59:59.250Z"
    assert parse_change(row_, now=NOW) == change


def test_occurred_at_accepts_an_aware_datetime_only() -> None:
    from datetime import UTC, datetime

    aware = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
    assert parse_change(row(external_id="u", occurred_at=aware), now=NOW).occurred_ms == (
        1_795_845_600_000
    )
    with pytest.raises(InvalidChange) as caught:
        parse_change(row(external_id="u", occurred_at=aware.replace(tzinfo=None)), now=NOW)
    assert "needs a UTC offset" in caught.value.message
