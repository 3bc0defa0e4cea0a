"""phonenumbers' verdict on a phone number, for a fraction of its CPU (issue 26).

`braze-subs import` checks every phone with phonenumbers: `parse(text, None)`, then
`is_valid_number`, then the E.164 form. On a number written as E.164 ("+" and digits, the
usual form in a bulk file) that cost ~200,000 instructions (~20 µs), most of it in work
that does not depend on the number: `parse` normalises the text character by character
through Unicode tables and tries eleven patterns before it looks at the calling code, and
`is_valid_number` fetches and length-filters up to eleven pattern descriptions per region
one Python call at a time.

Here the same answer is reached with the library's own data and functions, cached where
they depend on little:

- the calling code, per first three digits (`_extract_country_code` never looks further);
- parse's viability check, per number of digits (every digit of its pattern is `\\d`);
- the length test that decides whether a stripped national prefix stays stripped, per
  calling code and length (it reads nothing but the length);
- for each region and length of national number, the general pattern and ONE pattern
  that is the alternation of every number type's pattern whose possible lengths allow that
  length (`_number_type_helper` answers UNKNOWN exactly when the general pattern or every
  type pattern fails to match the whole number; a full match of an alternation is a full
  match of one of its branches).

What depends on the whole number is still the library's: the national prefix is stripped
by its `_maybe_strip_national_prefix_carrier_code`, and the patterns matched are its own.
Only text that is "+" and ASCII digits takes this way (`e164`); any other spelling ("+1
(415) 555-0100") goes through `parse` as before and is then validated by `is_valid`.
tests/unit/test_phone_validity.py compares both with the library on every region's example
numbers and their neighbours, on 15,000 random numbers over every calling code, on any
digits (hypothesis) and on the tests' bad numbers: same verdicts, same E.164 forms, same
parse errors.

If a phonenumbers release drops one of the private names used here, everything falls back
to the library's public functions (`FAST` is then False): the same answers, at their cost.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import phonenumbers
from phonenumbers import NumberParseException, PhoneMetadata, phonenumberutil

# parse() succeeded but is_valid_number() said no.
INVALID = -1

_PRIVATE = (
    "_is_viable_phone_number",
    "_extract_country_code",
    "_maybe_strip_national_prefix_carrier_code",
    "_test_number_length",
    "_MAX_INPUT_STRING_LENGTH",
    "_MIN_LENGTH_FOR_NSN",
    "_MAX_LENGTH_FOR_NSN",
    "ValidationResult",
)
FAST = all(hasattr(phonenumberutil, name) for name in _PRIVATE)

# The descriptions `_number_type_helper` tries after the general one, in its order; mobile
# only where its pattern is not the fixed line's (`same_mobile_and_fixed_line_pattern`).
_TYPE_DESCS = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
)


def e164(text: str) -> str | int:
    """What phonenumbers says of `text`, which must be "+" and ASCII digits only: the
    E.164 form (`format_number(parse(text, None), E164)`) of a number `is_valid_number`
    accepts; else the `NumberParseException` error type `parse` raises, or `INVALID`."""
    if not FAST:
        return _by_library(text)
    u = phonenumberutil
    digits = text[1:]
    # parse(): the text as a whole. `_build_national_number_for_parsing` and
    # `_maybe_strip_extension` leave "+" and digits as they are.
    if len(text) > u._MAX_INPUT_STRING_LENGTH:
        return NumberParseException.TOO_LONG
    if not _viable(len(digits)):
        return NumberParseException.NOT_A_NUMBER
    # _maybe_extract_country_code(): the "+" is stripped, then the calling code.
    if len(digits) <= u._MIN_LENGTH_FOR_NSN:
        return NumberParseException.TOO_SHORT_AFTER_IDD
    code, code_length = _calling_code(digits[:3])
    if code == 0:  # parse() retries without the "+", which finds no code either
        return NumberParseException.INVALID_COUNTRY_CODE
    national = digits[code_length:]
    if len(national) < u._MIN_LENGTH_FOR_NSN:
        return NumberParseException.TOO_SHORT_NSN
    metadata, prefix = _parsing_metadata(code)
    # `_maybe_strip_national_prefix_carrier_code` returns the number as it is unless its
    # national prefix pattern matches at the start: that match, tried first, is its own.
    if prefix is not None and prefix.match(national):
        _, stripped, _ = u._maybe_strip_national_prefix_carrier_code(national, metadata)
        if stripped != national and _keeps_stripped(code, len(stripped)):
            national = stripped
    if len(national) < u._MIN_LENGTH_FOR_NSN:
        return NumberParseException.TOO_SHORT_NSN
    if len(national) > u._MAX_LENGTH_FOR_NSN:
        return NumberParseException.TOO_LONG
    # The number's national significant number is `national` itself: parse() keeps its
    # leading zeros (italian_leading_zero, number_of_leading_zeros) and format_number
    # writes them back; E.164 is "+", the code, and that.
    if not is_valid(code, national):
        return INVALID
    return f"+{code}{national}"


def is_valid(code: int, national: str) -> bool:
    """`phonenumbers.is_valid_number` of the number with calling code `code` and national
    significant number `national` (digits, leading zeros included)."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code)
    if regions is None:
        return False
    if len(regions) == 1:
        checked = _validity_metadata(code, regions[0])
        return checked is not None and _type_known(checked, national)
    # A shared code (+1: the US and 24 others; +7, +44, ...): `region_code_for_number`
    # tries its regions in order, then `is_valid_number_for_region` checks the one found.
    for candidate in _candidates(code):
        checked = _validity_metadata(code, candidate.region)
        if candidate.leading is not None:  # found by its leading digits: checked now
            if candidate.leading.match(national):
                return checked is not None and _type_known(checked, national)
        elif _type_known(candidate.metadata, national):
            # Found by its type check, which the second check would repeat: the same
            # function of the same number and the same metadata (a geographic region's
            # `metadata_for_region_or_calling_code` is its `metadata_for_region`).
            return checked is not None
    return False


# --------------------------------------------------------------------------------------
# What is cached, and on what it depends
# --------------------------------------------------------------------------------------


def _by_library(text: str) -> str | int:
    try:
        number = phonenumbers.parse(text, None)
    except NumberParseException as exc:
        return int(exc.error_type)
    if not phonenumbers.is_valid_number(number):
        return INVALID
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@functools.cache
def _viable(digits: int) -> bool:
    """parse()'s viability check of "+" and `digits` digits. Every digit position of
    `_VALID_PHONE_NUMBER_PATTERN` is the class \\d, so which digits they are is no matter."""
    return bool(phonenumberutil._is_viable_phone_number("+" + "5" * digits))


@functools.lru_cache(maxsize=4096)
def _calling_code(head: str) -> tuple[int, int]:
    """The calling code of digits that begin with `head` (their first three; there are at
    least three), and its length in digits. 0: none."""
    code, rest = phonenumberutil._extract_country_code(head)
    return code, len(head) - len(rest) if code else 0


@functools.cache
def _parsing_metadata(code: int) -> tuple[Any, re.Pattern[str] | None]:
    """The metadata parse() strips a national prefix with (its region's, or the
    non-geographic entity's; never None for a code `_extract_country_code` found), and its
    national prefix pattern, compiled as the library compiles it (None: it has none)."""
    region = phonenumberutil.region_code_for_country_code(code)
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
    assert metadata is not None
    prefix = metadata.national_prefix_for_parsing
    return metadata, re.compile(prefix) if prefix else None


@functools.cache
def _keeps_stripped(code: int, length: int) -> bool:
    """Whether parse() keeps a national number stripped of its national prefix, now
    `length` digits long: `_test_number_length` reads nothing but the length."""
    u = phonenumberutil
    result = u._test_number_length("5" * length, _parsing_metadata(code)[0])
    return result not in (
        u.ValidationResult.TOO_SHORT,
        u.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
        u.ValidationResult.INVALID_LENGTH,
    )


class _Candidate(NamedTuple):
    region: str
    leading: re.Pattern[str] | None  # the region's leading digits, if it has them
    metadata: Any


@functools.cache
def _candidates(code: int) -> tuple[_Candidate, ...]:
    """The regions of a shared calling code as `_region_code_for_number_from_list` tries
    them, in order (those without metadata left out, as it skips them)."""
    out = []
    for region in phonenumbers.COUNTRY_CODE_TO_REGION_CODE[code]:
        metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
        if metadata is None:
            continue
        leading = None if metadata.leading_digits is None else re.compile(metadata.leading_digits)
        out.append(_Candidate(region, leading, metadata))
    return tuple(out)


@functools.cache
def _validity_metadata(code: int, region: str) -> Any:
    """The metadata `is_valid_number_for_region` checks the number against, or None where
    it answers False before any pattern (no metadata, or the region is another code's)."""
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region.upper())
    if metadata is None:
        return None
    geographic = region != phonenumberutil.REGION_CODE_FOR_NON_GEO_ENTITY
    if geographic and code != phonenumberutil.country_code_for_valid_region(region):
        return None
    return metadata


class _Patterns(NamedTuple):
    general: re.Pattern[str] | None  # None: no number of this length matches
    types: re.Pattern[str] | None  # every applicable type pattern, as one alternation


# Keyed by (id of the metadata, length): the library keeps one metadata object per region
# for the life of the process, so an id is never reused for another.
_PATTERNS: dict[tuple[int, int], _Patterns] = {}


def _type_known(metadata: Any, national: str) -> bool:
    """`_number_type_helper(national, metadata) != PhoneNumberType.UNKNOWN`."""
    key = (id(metadata), len(national))
    patterns = _PATTERNS.get(key)
    if patterns is None:
        patterns = _PATTERNS[key] = _patterns(metadata, len(national))
    if patterns.general is None or patterns.types is None:
        return False
    return (
        patterns.general.fullmatch(national) is not None
        and patterns.types.fullmatch(national) is not None
    )


def _applicable(desc: Any, length: int) -> str | None:
    """The pattern `_is_number_matching_desc` would match a number of `length` digits
    against, or None where it answers False without matching."""
    if desc is None:
        return None
    if len(desc.possible_length) > 0 and length not in desc.possible_length:
        return None
    pattern = desc.national_number_pattern
    return pattern if pattern else None


def _patterns(metadata: Any, length: int) -> _Patterns:
    general = _applicable(metadata.general_desc, length)
    names = _TYPE_DESCS if metadata.same_mobile_and_fixed_line_pattern else (*_TYPE_DESCS, "mobile")
    types = [p for p in (_applicable(getattr(metadata, name), length) for name in names) if p]
    return _Patterns(
        None if general is None else re.compile(general),
        re.compile("|".join(f"(?:{p})" for p in types)) if types else None,
    )
