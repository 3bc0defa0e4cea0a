"""The import's cheaper phone check (issue 26, `core.phones`) answers as phonenumbers:
`_is_valid_number` as `is_valid_number`, and `phones.e164` of "+" and digits as `parse`,
`is_valid_number` and `format_number(..., E164)` together (same E.164 form, same parse
error, same verdict), so `normalise_phone` accepts, refuses and normalises as before."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import NumberParseException, PhoneNumber, PhoneNumberType

from core import phones
from core.changes import _PHONE_CHARS, InvalidChange, _is_valid_number, _show, normalise_phone

TYPES = [value for name, value in vars(PhoneNumberType).items() if name.isupper()]


def _numbers() -> list[PhoneNumber]:
    """Every region's (and non-geographic calling code's) example number of every type,
    and its neighbours: the national number plus or minus up to 20, a digit more and a
    digit fewer. Shared calling codes (+1, +7, +44, ...) get the most of them."""
    examples: list[PhoneNumber] = []
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in TYPES:
            found = phonenumbers.example_number_for_type(region, kind)
            if found is not None:
                examples.append(found)
    for code in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS:
        found = phonenumbers.example_number_for_non_geo_entity(code)
        if found is not None:
            examples.append(found)
    numbers = []
    for example in examples:
        national = example.national_number
        nearby = [national + step for step in range(-15, 16)]
        nearby += [national * 10 + 7, national // 10]
        for value in nearby:
            if value > 0:
                numbers.append(
                    PhoneNumber(country_code=example.country_code, national_number=value)
                )
    return numbers


def test_the_answer_is_the_librarys_for_every_example_number_and_its_neighbours():
    numbers = _numbers()
    shared = [
        n for n in numbers if len(phonenumbers.region_codes_for_country_code(n.country_code)) > 1
    ]
    assert len(numbers) > 40_000 and len(shared) > 10_000
    wrong = [n for n in numbers if _is_valid_number(n) != phonenumbers.is_valid_number(n)]
    assert wrong == []
    # Both answers occur, in the shared calling codes too.
    assert {_is_valid_number(n) for n in shared} == {True, False}


def test_a_shared_calling_code_found_by_leading_digits_keeps_the_librarys_check():
    # +44 7781 (Guernsey, found by its leading digits) and +1 555 (no region's pattern).
    guernsey = phonenumbers.parse("+447781123456", None)
    assert _is_valid_number(guernsey) is phonenumbers.is_valid_number(guernsey) is True
    assert normalise_phone("+1 415 555 0100") == "+14155550100"
    fiction = phonenumbers.parse("+15555550100", None)
    assert _is_valid_number(fiction) is phonenumbers.is_valid_number(fiction) is False


# --------------------------------------------------------------------------------------
# phones.e164: "+" and digits, without phonenumbers' parse
# --------------------------------------------------------------------------------------


def by_library(text: str) -> str | int:
    """What phonenumbers' public functions say of `text`: the E.164 form of a valid
    number, else the parse error, else INVALID (as `normalise_phone` did before)."""
    try:
        number = phonenumbers.parse(text, None)
    except NumberParseException as exc:
        return int(exc.error_type)
    if not phonenumbers.is_valid_number(number):
        return phones.INVALID
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _disagreements(texts: list[str]) -> list[tuple[str, str | int, str | int]]:
    pairs = ((t, phones.e164(t), by_library(t)) for t in texts)
    return [(t, ours, theirs) for t, ours, theirs in pairs if ours != theirs]


def _e164_texts(number: PhoneNumber) -> list[str]:
    """The number as "+" and digits, and with each of its region's national prefixes
    (and a stray 0 or 1) between the calling code and the national number, which parse
    strips or keeps by its own rules."""
    code = str(number.country_code)
    national = phonenumbers.national_significant_number(number)
    texts = [f"+{code}{national}"]
    for region in phonenumbers.region_codes_for_country_code(number.country_code):
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region, None)
        if metadata is not None and metadata.national_prefix:
            texts.append(f"+{code}{metadata.national_prefix}{national}")
    texts += [f"+{code}0{national}", f"+{code}1{national}"]
    return texts


def test_e164_is_the_librarys_answer_for_every_example_number_and_its_neighbours():
    # Every number as E.164, every fourth also with the prefixes (the test's time).
    numbers = _numbers()
    texts = [f"+{n.country_code}{phonenumbers.national_significant_number(n)}" for n in numbers]
    texts += [text for number in numbers[::4] for text in _e164_texts(number)[1:]]
    assert len(texts) > 80_000
    assert _disagreements(texts) == []
    answers = {phones.e164(t) for t in texts}
    assert phones.INVALID in answers and any(isinstance(a, str) for a in answers)


def _random_texts(count: int, seed: int) -> list[str]:
    """ "+" and up to 20 digits: a real calling code (or none) followed by random digits,
    a national prefix or a mutated example number, so that valid numbers, invalid ones
    and every parse error occur in numbers."""
    rng = random.Random(seed)
    codes = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    examples = [
        n for n in (phonenumbers.example_number(r) for r in phonenumbers.SUPPORTED_REGIONS) if n
    ]
    texts = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.5:  # an example number with some of its last digits replaced
            example = rng.choice(examples)
            digits = f"{example.country_code}{phonenumbers.national_significant_number(example)}"
            keep = rng.randint(max(1, len(digits) - 6), len(digits))
            tail = "".join(rng.choice("0123456789") for _ in range(len(digits) - keep))
            digits = digits[:keep] + tail + rng.choice(["", "", "", "5", "55"])
        elif roll < 0.9:  # a calling code, maybe a prefix digit, random digits
            digits = str(rng.choice(codes)) + rng.choice(["", "", "0", "1", "9", "00", "15"])
            digits += "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 14)))
        else:  # anything
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 20)))
        texts.append("+" + digits[:20])
    return texts


def test_e164_is_the_librarys_answer_on_a_large_random_sample():
    texts = _random_texts(15_000, seed=26)
    assert _disagreements(texts) == []
    answers = [phones.e164(t) for t in texts]
    valid = sum(isinstance(a, str) for a in answers)
    assert valid > 3_000 and answers.count(phones.INVALID) > 3_000
    errors = {a for a in answers if isinstance(a, int) and a != phones.INVALID}
    assert errors == {
        NumberParseException.NOT_A_NUMBER,
        NumberParseException.INVALID_COUNTRY_CODE,
        NumberParseException.TOO_SHORT_NSN,
        NumberParseException.TOO_LONG,
    }


@settings(max_examples=500, deadline=None)
@given(st.from_regex(r"\+[0-9]{0,21}", fullmatch=True))
def test_e164_is_the_librarys_answer_for_any_digits(text: str) -> None:
    assert phones.e164(text) == by_library(text)


# The phones the tests refuse or accept elsewhere (test_changes, the CLI's bad rows, the
# simulator's), as written there and as "+" and digits.
TESTS_PHONES = [
    "+14155550100",
    "+1 (415) 555-0100",
    " +1.415.555.0100 ",
    "+44 7911 123456",
    "+49 (0)30 123456",
    "+1 415 555 010",
    "+1 000 555 0100",
    "+999 1234 5678",
    "+",
    "+1",
    "+1415",
    "+447781123456",
    "+1 415 555 0100",
    "+15555550100",
    "+4930123456",
    "+490301234567",
]


# Longer than parse() reads (250 characters), and not ASCII digits (the library's way).
ODD_PHONES = ["+" + "4" * 249, "+" + "4" * 250, "+1415555\u0661\u0660\u0660", "+1415555²100"]


@pytest.mark.parametrize(
    "text",
    TESTS_PHONES + ["+" + "".join(c for c in t if c.isdigit()) for t in TESTS_PHONES] + ODD_PHONES,
)
def test_normalise_phone_says_what_the_library_said_of_the_tests_numbers(text: str) -> None:
    expected = by_library(text.strip()) if text.strip().startswith("+") else None
    try:
        got: str | int = normalise_phone(text)
    except InvalidChange as exc:
        assert exc.field == "phone"
        if _PHONE_CHARS.match(text.strip()) is None:
            # The product's own rule before phonenumbers: ASCII digits and ( ) - . / only.
            assert exc.message.startswith("may contain only digits")
            return
        assert not isinstance(expected, str), (text, expected, exc.message)
        if expected == phones.INVALID:
            assert exc.message == f"{_show(text.strip())} is not a valid phone number"
        return
    assert got == expected


def test_the_fast_way_is_taken_and_falls_back_to_the_library_without_its_private_names(
    monkeypatch,
):
    assert phones.FAST  # this phonenumbers has every private name used
    monkeypatch.setattr(phones, "FAST", False)
    texts = _random_texts(2_000, seed=7)
    assert _disagreements(texts) == []
