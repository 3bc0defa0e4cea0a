"""Validation of v1 and v2 `subscription/status/set` bodies, as SPEC.md describes Braze's rules.

Pure functions: `validate_v1` and `validate_v2` return either a `ValidatedRequest` or the
error message Braze would put in `{"message": ...}` of its 400 answer. Messages naming one bad
identifier read `Invalid <kind>: <value>` (kind: external_id, email or phone).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from simulator.model import (
    SUBSCRIPTION_STATES,
    Channel,
    Endpoint,
    Kind,
    SubscriptionState,
    UpdateList,
    ValidatedRequest,
)

BOTH_EMAIL_AND_PHONE = "Either an email address or a phone number should be provided, but not both."
MAX_PER_LIST = 50

E164 = re.compile(r"^\+[1-9]\d{1,14}$")
# The E.164 numbers `is_valid_phone` may decide by their shape: ASCII digits, no newline.
ASCII_E164 = re.compile(r"\+([1-9][0-9]{1,14})")
# The plain ASCII addresses `is_valid_email` accepts without email-validator's full parse:
# a dot-atom local part of letters, digits, `_`, `+`, `-` (a subset of RFC 5322's atext),
# then a domain of two or more labels, which email-validator itself checks (once a domain).
PLAIN_EMAIL = re.compile(
    r"([A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
)
EMAIL_MAX_LENGTH = 254  # email-validator's limit on the whole address
LOCAL_PART_MAX_LENGTH = 64

V1_IDENTIFIER_FIELDS: dict[str, Kind] = {
    "external_id": "external_id",
    "email": "email",
    "phone": "phone",
}
V2_IDENTIFIER_FIELDS: dict[str, Kind] = {
    "external_ids": "external_id",
    "emails": "email",
    "phones": "phone",
}
_COMMON_FIELDS = ("subscription_group_id", "subscription_state", "use_double_opt_in_logic")
V1_FIELDS = frozenset((*_COMMON_FIELDS, *V1_IDENTIFIER_FIELDS))
V2_ENTRY_FIELDS = frozenset((*_COMMON_FIELDS, *V2_IDENTIFIER_FIELDS))
V2_FIELDS = frozenset(("subscription_groups",))


@dataclass(frozen=True, slots=True)
class GroupRules:
    """What validation needs to know about the workspace."""

    groups: Mapping[str, Channel]
    auto_groups: bool = False
    max_identifiers: int = 50


class _Invalid(Exception):
    """Raised inside this module; turned into the returned message."""


def validate_v1(body: object, rules: GroupRules) -> ValidatedRequest | str:
    """Validate a v1 body; return the normalised request or Braze's error message."""
    try:
        return _validate_v1(body, rules)
    except _Invalid as error:
        return str(error)


def validate_v2(body: object, rules: GroupRules) -> ValidatedRequest | str:
    """Validate a v2 body; return the normalised request or Braze's error message."""
    try:
        return _validate_v2(body, rules)
    except _Invalid as error:
        return str(error)


def validate(endpoint: Endpoint, body: object, rules: GroupRules) -> ValidatedRequest | str:
    """Validate a body for `endpoint` ("v1" or "v2")."""
    return validate_v1(body, rules) if endpoint == "v1" else validate_v2(body, rules)


def collect_identifiers(endpoint: Endpoint, body: object) -> tuple[list[tuple[Kind, str]], int]:
    """Leniently list the (kind, value) identifiers of a body and count its entries.

    For bodies that may be invalid: used for the request log and the `reject` fault,
    both of which act before validation. Anything malformed is skipped.
    """
    if not isinstance(body, dict):
        return [], 0
    if endpoint == "v1":
        return _lenient_identifiers(body, V1_IDENTIFIER_FIELDS), 1
    entries = body.get("subscription_groups")
    if not isinstance(entries, list):
        return [], 0
    found: list[tuple[Kind, str]] = []
    for entry in entries:
        if isinstance(entry, dict):
            found.extend(_lenient_identifiers(entry, V2_IDENTIFIER_FIELDS))
    return found, len(entries)


def collect_groups(endpoint: Endpoint, body: object) -> list[str]:
    """Leniently list the group ids a body names (for the `reject_groups` fault)."""
    if not isinstance(body, dict):
        return []
    if endpoint == "v1":
        group = body.get("subscription_group_id")
        return [group] if isinstance(group, str) else []
    entries = body.get("subscription_groups")
    if not isinstance(entries, list):
        return []
    groups = (entry.get("subscription_group_id") for entry in entries if isinstance(entry, dict))
    return [group for group in groups if isinstance(group, str)]


def _lenient_identifiers(obj: dict[str, object], fields: dict[str, Kind]) -> list[tuple[Kind, str]]:
    found: list[tuple[Kind, str]] = []
    for field, kind in fields.items():
        value = obj.get(field)
        if isinstance(value, str):
            found.append((kind, value))
        elif isinstance(value, list):
            found.extend((kind, item) for item in value if isinstance(item, str))
    return found


def _validate_v1(body: object, rules: GroupRules) -> ValidatedRequest:
    obj = _require_object(body, "Request body must be a JSON object")
    _reject_unknown_fields(obj, V1_FIELDS, prefix="")
    group, state, double_opt_in = _common_fields(obj, prefix="")
    if "email" in obj and "phone" in obj:
        raise _Invalid(BOTH_EMAIL_AND_PHONE)
    lists = _identifier_lists(obj, V1_IDENTIFIER_FIELDS, rules, allow_string=True, prefix="")
    learned: dict[str, Channel] = {}
    _check_group(group, lists, rules, learned, prefix="")
    _check_values(lists)
    updates = _updates(group, state, double_opt_in, lists)
    distinct = sum(len(update_list.values) for update_list in updates)  # kinds differ
    return ValidatedRequest(tuple(updates), distinct, 1, learned)


def _validate_v2(body: object, rules: GroupRules) -> ValidatedRequest:
    obj = _require_object(body, "Request body must be a JSON object")
    _reject_unknown_fields(obj, V2_FIELDS, prefix="")
    if "subscription_groups" not in obj:
        raise _Invalid("Missing subscription_groups")
    entries = obj["subscription_groups"]
    if not isinstance(entries, list) or not entries:
        raise _Invalid("subscription_groups must be a non-empty array")
    learned: dict[str, Channel] = {}
    updates: list[UpdateList] = []
    distinct: set[tuple[Kind, str]] = set()
    channels_used: set[Channel] = set()
    has_contacts = False
    for index, raw_entry in enumerate(entries):
        prefix = f"subscription_groups[{index}]: "
        entry = _require_object(raw_entry, f"subscription_groups[{index}] must be an object")
        _reject_unknown_fields(entry, V2_ENTRY_FIELDS, prefix=prefix)
        group, state, double_opt_in = _common_fields(entry, prefix=prefix)
        if "emails" in entry and "phones" in entry:
            raise _Invalid(prefix + BOTH_EMAIL_AND_PHONE)
        lists = _identifier_lists(
            entry, V2_IDENTIFIER_FIELDS, rules, allow_string=False, prefix=prefix
        )
        channel = _check_group(group, lists, rules, learned, prefix=prefix)
        if channel is not None:
            channels_used.add(channel)
        has_contacts = has_contacts or "email" in lists or "phone" in lists
        _check_values(lists)
        entry_updates = _updates(group, state, double_opt_in, lists)
        for update_list in entry_updates:
            distinct.update((update_list.kind, value) for value in update_list.values)
        if len(distinct) > rules.max_identifiers:
            raise _Invalid(
                f"Too many identifiers: more than {rules.max_identifiers} distinct identifiers "
                f"in one request, at most {rules.max_identifiers} are allowed"
            )
        updates.extend(entry_updates)
    if has_contacts and len(channels_used) > 1:
        raise _Invalid(
            "A request with emails or phones cannot mix email and SMS subscription groups"
        )
    return ValidatedRequest(tuple(updates), len(distinct), len(entries), learned)


def _require_object(value: object, message: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Invalid(message)
    return value


def _reject_unknown_fields(obj: dict[str, object], allowed: frozenset[str], prefix: str) -> None:
    for key in obj:
        if key not in allowed:
            raise _Invalid(f"{prefix}Unknown field: {key}")


def _common_fields(obj: dict[str, object], prefix: str) -> tuple[str, SubscriptionState, bool]:
    if "subscription_group_id" not in obj:
        raise _Invalid(f"{prefix}Missing subscription_group_id")
    group = obj["subscription_group_id"]
    if not isinstance(group, str) or not group:
        raise _Invalid(f"{prefix}subscription_group_id must be a non-empty string")
    if "subscription_state" not in obj:
        raise _Invalid(f"{prefix}Missing subscription_state")
    state = obj["subscription_state"]
    if state not in SUBSCRIPTION_STATES:
        raise _Invalid(f"{prefix}subscription_state must be 'subscribed' or 'unsubscribed'")
    double_opt_in = obj.get("use_double_opt_in_logic", False)
    if not isinstance(double_opt_in, bool):
        raise _Invalid(f"{prefix}use_double_opt_in_logic must be a boolean")
    return group, cast(SubscriptionState, state), double_opt_in


def _identifier_lists(
    obj: dict[str, object],
    fields: dict[str, Kind],
    rules: GroupRules,
    *,
    allow_string: bool,
    prefix: str,
) -> dict[Kind, list[str]]:
    limit = min(MAX_PER_LIST, rules.max_identifiers)
    lists: dict[Kind, list[str]] = {}
    for field, kind in fields.items():
        if field not in obj:
            continue
        value = obj[field]
        if allow_string and isinstance(value, str):
            items: list[object] = [value]
        elif isinstance(value, list):
            items = value
        else:
            expected = "a string or an array of strings" if allow_string else "an array of strings"
            raise _Invalid(f"{prefix}{field} must be {expected}")
        if not items:
            raise _Invalid(f"{prefix}{field} must not be empty")
        if len(items) > limit:
            raise _Invalid(
                f"{prefix}Too many identifiers: {field} holds {len(items)}, "
                f"at most {limit} are allowed"
            )
        # Only strings, none empty, checked in C (no JSON value but "" equals ""); else
        # the first bad item decides the message.
        if set(map(type, items)) != {str} or "" in items:
            for item in items:
                if not isinstance(item, str):
                    raise _Invalid(f"{prefix}{field} must contain only strings")
                if not item:
                    raise _Invalid(f"{prefix}{field} must not contain empty strings")
        lists[kind] = cast(list[str], items)
    if not lists:
        names = ", ".join(fields)
        raise _Invalid(f"{prefix}One of {names} is required")
    return lists


def _check_group(
    group: str,
    lists: dict[Kind, list[str]],
    rules: GroupRules,
    learned: dict[str, Channel],
    prefix: str,
) -> Channel | None:
    """Check the identifier kinds fit the group's channel; return that channel if known."""
    channel = rules.groups.get(group) or learned.get(group)
    if channel is None:
        if not rules.auto_groups:
            raise _Invalid(f"{prefix}Unknown subscription_group_id: {group}")
        if "email" in lists:
            channel = learned[group] = "email"
        elif "phone" in lists:
            channel = learned[group] = "sms"
    if channel == "sms" and "email" in lists:
        raise _Invalid(
            f"{prefix}Subscription group {group} is an SMS group: emails are not accepted"
        )
    if channel == "email" and "phone" in lists:
        raise _Invalid(
            f"{prefix}Subscription group {group} is an email group: phones are not accepted"
        )
    return channel


def _check_values(lists: dict[Kind, list[str]]) -> None:
    for value in lists.get("email", ()):
        if not is_valid_email(value):
            raise _Invalid(f"Invalid email: {value}")
    for value in lists.get("phone", ()):
        if not is_valid_phone(value):
            raise _Invalid(f"Invalid phone: {value}")


def _updates(
    group: str, state: SubscriptionState, double_opt_in: bool, lists: dict[Kind, list[str]]
) -> list[UpdateList]:
    # Duplicates within a list are fine; each value is applied once.
    return [
        UpdateList(group, state, kind, tuple(dict.fromkeys(values)), double_opt_in)
        for kind, values in lists.items()
    ]


def is_valid_email(value: str) -> bool:
    """Syntactic check (no DNS), as Braze would reject an unusable address: email-validator's
    verdict. A plain ASCII address (`PLAIN_EMAIL`, within the lengths) is accepted when
    email-validator accepts its domain, without its full parse of the address: ~60 us an
    address was a third of the simulator's CPU in bench.ceiling, where every address is
    new (issue 26). Every address that shape does not accept goes through the full parse,
    so what is refused, and how, is email-validator's alone; tests/unit/test_simulator_validation.py
    checks that the two agree. Only the full parse's verdicts are cached (by address): an
    address the shortcut decides costs less than a cache's look-up and entry."""
    plain = PLAIN_EMAIL.fullmatch(value)
    if (
        plain is not None
        and len(value) <= EMAIL_MAX_LENGTH
        and len(plain.group(1)) <= LOCAL_PART_MAX_LENGTH
        and _is_valid_domain(plain.group(2))
    ):
        return True
    return _is_valid_email_in_full(value)


@lru_cache(maxsize=65536)
def _is_valid_email_in_full(value: str) -> bool:
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


@lru_cache(maxsize=4096)
def _is_valid_domain(domain: str) -> bool:
    """email-validator accepts `domain` after a local part it cannot refuse."""
    return _is_valid_email_in_full("a@" + domain)


def is_valid_phone(value: str) -> bool:
    """E.164 (`+` then up to 15 digits) that phonenumbers parses as a possible number.

    An ASCII E.164 number whose national number the country's national prefix cannot
    start (`_phone_shape`) takes the verdict phonenumbers gave the first number of its
    shape (country calling code, national number's length): ~19 us a number for the full
    parse was a quarter of the simulator's CPU in bench.ceiling, where every phone is new
    (issue 26). For such a number the verdict depends on nothing else: phonenumbers
    extracts the code from the first digits, leaves a national number no prefix pattern
    matches as it is, and `is_possible_number` compares its length with the country's
    possible lengths. Every other number goes through the full parse, so what is refused
    is phonenumbers' verdict alone; tests/unit/test_simulator_validation.py checks that
    the two agree. Only the full parse's verdicts are cached by number (as for emails)."""
    plain = ASCII_E164.fullmatch(value)
    if plain is None:
        return E164.match(value) is not None and _is_valid_phone_in_full(value)
    shape = _phone_shape(plain.group(1))
    if shape is None:
        return _is_valid_phone_in_full(value)
    verdict = _SHAPE_VERDICTS.get(shape)
    if verdict is None:
        verdict = _SHAPE_VERDICTS[shape] = _is_valid_phone_in_full(value)
    return verdict


@lru_cache(maxsize=65536)
def _is_valid_phone_in_full(value: str) -> bool:
    try:
        number = phonenumbers.parse(value)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_possible_number(number)


# (country calling code, national number's length) -> phonenumbers' verdict on the first
# number of that shape. At most ~215 codes x 15 lengths; a race fills one twice, alike.
_SHAPE_VERDICTS: dict[tuple[int, int], bool] = {}
_MAX_COUNTRY_CODE_DIGITS = 3  # phonenumbers' _MAX_LENGTH_COUNTRY_CODE
_COUNTRY_CODES = {str(code): code for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE}


def _phone_shape(digits: str) -> tuple[int, int] | None:
    """(country calling code, national number's length) of the ASCII digits after an E.164
    number's `+` when its verdict is decided by those alone; None when the full parse must
    decide: an unknown code, or a national number the country's national prefix pattern
    matches (phonenumbers may strip it). (Digits other than ASCII, which phonenumbers
    normalises, and E164's final newline never get here: `ASCII_E164`.)"""
    # As phonenumbers' _extract_country_code: the shortest known code of 1 to 3 digits.
    for size in range(1, min(len(digits), _MAX_COUNTRY_CODE_DIGITS) + 1):
        code = _COUNTRY_CODES.get(digits[:size])
        if code is not None:
            national = digits[size:]
            prefix = _national_prefix(code)
            if prefix is not None and prefix.match(national):
                return None
            return code, len(national)
    return None


@lru_cache(maxsize=1024)
def _national_prefix(code: int) -> re.Pattern[str] | None:
    """The pattern phonenumbers strips a national prefix by, for a country calling code."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(
        code, phonenumbers.region_code_for_country_code(code)
    )
    pattern = metadata.national_prefix_for_parsing if metadata is not None else None
    return re.compile(pattern) if pattern else None
