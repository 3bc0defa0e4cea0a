"""The simulator's email and phone checks (issue 26): the plain-address shortcut accepts
exactly what email-validator's full parse accepts, the phone shortcut exactly what
phonenumbers' does, so the simulator refuses the same identifiers, with the same messages,
as before the shortcuts."""

from __future__ import annotations

import random
import string

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import validation
from simulator.validation import PLAIN_EMAIL, is_valid_email, is_valid_phone

DIGITS = string.digits

# Addresses at the shortcut's edges: each is decided by the full parse, with the shortcut
# and without it.
EDGES = [
    "user1@example.com",
    "first.last+tag@sub.example.co.uk",
    "-dash_@example.com",
    "a@b.c",
    "user@localhost",  # one label: not the shortcut's shape
    "user@example.test",  # a special-use domain email-validator refuses
    "user@example.local",
    "user@example.invalid",
    "user@-example.com",  # a label starting with a hyphen
    "user@example-.com",
    "user@example.123",  # an all-digit top-level label
    "user@" + "a" * 64 + ".com",  # a label longer than 63
    "x" * 64 + "@example.com",
    "x" * 65 + "@example.com",
    "u@" + ".".join(["a" * 60] * 4) + ".com",  # longer than 254 in all
    "a..b@example.com",
    ".a@example.com",
    "a.@example.com",
    "a b@example.com",
    "user@exa_mple.com",
    "user@example..com",
    "user@@example.com",
    "User@Example.COM",
    "postmaster@example.com",
    "über@example.com",
    "user@bücher.de",
    "not-an-email",
    "b@",
    "@example.com",
    "",
]


def full_parse(value: str) -> bool:
    return validation._is_valid_email_in_full(value)


@pytest.mark.parametrize("value", EDGES)
def test_the_shortcut_agrees_with_the_full_parse(value: str) -> None:
    assert is_valid_email(value) is full_parse(value)


def test_the_shortcut_is_taken_for_plain_addresses() -> None:
    """The drain's addresses take the shortcut: one full parse per domain, not per address."""
    validation._is_valid_domain.cache_clear()
    calls = []
    original = validation._is_valid_email_in_full

    def counted(value: str) -> bool:
        calls.append(value)
        return original(value)

    validation._is_valid_email_in_full = counted  # type: ignore[assignment]
    try:
        for n in range(200):
            assert is_valid_email(f"shortcut{n}@example.com")
    finally:
        validation._is_valid_email_in_full = original  # type: ignore[assignment]
    assert calls == ["a@example.com"]


ALPHABET = "ab-_.+@Z9 ü\"'()[]<>:;,\\!#$%&*/=?^`{|}~"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=30))
def test_any_string_is_decided_as_the_full_parse_decides_it(value: str) -> None:
    assert is_valid_email(value) is full_parse(value)


@settings(max_examples=150, deadline=None)
@given(
    st.from_regex(PLAIN_EMAIL, fullmatch=True).filter(lambda value: len(value) < 300),
)
def test_every_plain_shaped_address_is_decided_as_the_full_parse_decides_it(value: str) -> None:
    assert is_valid_email(value) is full_parse(value)


# The phone check's shortcut (issue 26): a number of a known shape takes the verdict
# phonenumbers gave the first number of that shape.


def full_phone_parse(value: str) -> bool:
    return validation._is_valid_phone_in_full(value)


def _fresh_phone_verdicts() -> None:
    validation._is_valid_phone_in_full.cache_clear()
    validation._SHAPE_VERDICTS.clear()


def test_every_shape_of_every_calling_code_is_decided_as_the_full_parse_decides_it() -> None:
    """Every known calling code with national numbers of every length E.164 allows, several
    numbers of each shape (digits at random, and each national number that starts as the
    country's own numbers do: its example numbers' first digits), checked one after
    another against the full parse, so that a shape's cached verdict meets every other
    number of that shape."""
    _fresh_phone_verdicts()
    rng = random.Random(26)
    starts = {""}
    for region in phonenumbers.SUPPORTED_REGIONS:
        example = phonenumbers.example_number(region)
        if example is not None:
            starts.update(str(example.national_number)[:k] for k in (1, 2, 3))
    wrong = []
    for code in sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE):
        for length in range(15 - len(str(code)) + 1):
            nationals = {"".join(rng.choice(DIGITS) for _ in range(length)) for _ in range(6)}
            nationals.update(
                (start + "".join(rng.choice(DIGITS) for _ in range(length)))[:length]
                for start in rng.sample(sorted(starts), 6)
            )
            nationals.update(("0" + "9" * length)[:length] for _ in (0,))
            for national in sorted(nationals):
                value = f"+{code}{national}"
                if is_valid_phone(value) is not full_phone_parse(value):
                    wrong.append(value)
    assert wrong == []


PHONE_EDGES = [
    "+14152000000",
    "+114152000000",  # +1 then the national prefix 1: phonenumbers may strip it
    "+1415200000",
    "+4401234567890",  # a trunk 0 after the code
    "+390612345678",  # Italy keeps its leading zero
    "+5491123456789",  # Argentina's prefix transform
    "+80012345678",  # a non-geographic code
    "+999123456789",  # no such code
    "+1",
    "+12",
    "+123",
    "+14155550100\n",  # E164's `$` lets a final newline through
    "+١٤١٥٥٥٥٠١٠٠",  # Arabic-Indic digits match `\\d`
    "+1 415 555 0100",
    "14155550100",
    "",
]


@pytest.mark.parametrize("value", PHONE_EDGES)
def test_the_phone_shortcut_agrees_with_the_full_parse(value: str) -> None:
    """Each edge after a plain number of the same code and length filled the shape's
    verdict (`+1` and ten 5s for +1 and ten more digits, ...)."""
    _fresh_phone_verdicts()
    for code in (1, 44, 39, 54, 800):
        prefix = f"+{code}"
        if value.startswith(prefix) and value[1:].isascii() and value[1:].isdigit():
            is_valid_phone(prefix + "5" * (len(value) - len(prefix)))
    assert is_valid_phone(value) is (bool(validation.E164.match(value)) and full_phone_parse(value))


def test_the_phone_shortcut_is_taken_for_the_drains_numbers() -> None:
    """bench.drain's phones (+1415 and 7 digits) take the shortcut: one full parse in all."""
    _fresh_phone_verdicts()
    calls = []
    original = validation._is_valid_phone_in_full

    def counted(value: str) -> bool:
        calls.append(value)
        return original(value)

    validation._is_valid_phone_in_full = counted  # type: ignore[assignment]
    try:
        for n in range(200):
            assert is_valid_phone(f"+1415{2_000_000 + n:07d}")
    finally:
        validation._is_valid_phone_in_full = original  # type: ignore[assignment]
    assert calls == ["+14152000000"]


@settings(max_examples=150, deadline=None)
@given(st.from_regex(r"\+[1-9][0-9]{1,14}", fullmatch=True))
def test_every_e164_number_is_decided_as_the_full_parse_decides_it(value: str) -> None:
    assert is_valid_phone(value) is full_phone_parse(value)
