"""The simulator's email check (issue 26): its plain-address shortcut accepts exactly what
email-validator's full parse accepts, so the simulator refuses the same identifiers, with
the same messages, as before the shortcut."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import validation
from simulator.validation import PLAIN_EMAIL, is_valid_email

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
