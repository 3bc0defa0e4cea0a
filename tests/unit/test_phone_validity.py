"""`core.changes._is_valid_number` answers as `phonenumbers.is_valid_number` for every
number (issue 26: the import's phones skip the library's second type check)."""

from __future__ import annotations

import phonenumbers
from phonenumbers import PhoneNumber, PhoneNumberType

from core.changes import _is_valid_number, normalise_phone

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
