"""What a subscription change is, and how raw input becomes one.

A `Change` is always valid and normalised: the identifier is trimmed (and lower-cased for
emails, E.164 for phones) before it becomes part of a Redis key, so the same person never
occupies two slots in the buffer.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timezone
from enum import StrEnum
from typing import Any, NoReturn

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from core import phones
from core.errors import InputRefused


class SubscriptionState(StrEnum):
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"


class IdentifierKind(StrEnum):
    EXTERNAL_ID = "external_id"
    EMAIL = "email"
    PHONE = "phone"


class Lane(StrEnum):
    """Which lane a change travels in: live goes first, bulk uses the rest of the budget."""

    LIVE = "live"
    BULK = "bulk"


@dataclass(frozen=True, slots=True)
class Change:
    """One validated, normalised subscription change."""

    group_id: str
    state: SubscriptionState
    kind: IdentifierKind
    value: str
    double_opt_in: bool = False
    delay_seconds: float = 0.0
    # When the change happened at its source, in ms since the epoch; None: the time it
    # reaches the buffer (Redis's clock) stands in.
    occurred_ms: int | None = None
    # Who or what said so ("checkout-form", "support:ticket-123"); kept in the history.
    source: str = ""
    # A `subscribed` change is not sent for an identifier Braze holds as unsubscribed.
    respect_opt_out: bool = False
    # None: not named; the way in decides (live for the Python API, the task and
    # `enqueue`; bulk for `import`, `verify --repair` and `dlq replay`).
    lane: Lane | None = None
    # None: not named; core/routing.py decides (the group's workspace in
    # BRAZE_WORKSPACES_FILE, or the only one).
    workspace: str | None = None


class InvalidChange(InputRefused, ValueError):
    """Input that cannot become a `Change`; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------------------
# Parsing. This runs once per row of imports with millions of rows, so it is a plain
# function with cheap checks first and no per-row model objects.
# --------------------------------------------------------------------------------------

MAX_GROUP_ID_LENGTH = 128
MAX_EXTERNAL_ID_LENGTH = 512
MAX_DELAY_SECONDS = 7 * 24 * 60 * 60  # 604800
# How far ahead of this machine's clock an `occurred_at` may lie. Producers' clocks drift by
# seconds, not minutes; a time further ahead is a wrong unit (milliseconds given as seconds)
# or a broken clock, and would win over every real change until that time, so it is refused.
MAX_FUTURE_SECONDS = 5 * 60
# Longest `source` text: a label ("checkout-form", "support:ticket-123"), not a document.
MAX_SOURCE_LENGTH = 100

IDENTIFIER_FIELDS: tuple[str, ...] = ("external_id", "email", "phone")
OPTIONAL_FIELDS: tuple[str, ...] = (
    "use_double_opt_in_logic",
    "delay_seconds",
    "occurred_at",
    "source",
    "respect_opt_out",
    "lane",
    "workspace",
)
KNOWN_FIELDS: frozenset[str] = frozenset(
    ("subscription_group_id", "subscription_state", *IDENTIFIER_FIELDS, *OPTIONAL_FIELDS)
)

# Control characters separate the parts of keys internally, so they never enter a Change.
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")

_STATES: dict[str, SubscriptionState] = {state.value: state for state in SubscriptionState}
_KINDS: dict[str, IdentifierKind] = {kind.value: kind for kind in IdentifierKind}
_LANES: dict[str, Lane] = {lane.value: lane for lane in Lane}

_BOOL_STRINGS: dict[str, bool] = {
    "true": True,
    "1": True,
    "yes": True,
    "false": False,
    "0": False,
    "no": False,
    "": False,
}

# The common shape of an address: an ASCII dot-atom local part and an ASCII host name.
# Every local part this matches is one email-validator accepts unchanged (its own
# DOT_ATOM_TEXT rule is a superset), so for such addresses only the domain needs the
# library's (expensive, IDNA-based) check, and that result is cached per domain.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_EMAIL = re.compile(rf"({_ATEXT}(?:\.{_ATEXT})*)@([A-Za-z0-9.-]+)\Z")
_EMAIL_MAX_LENGTH = 254  # RFC 5321 as enforced by email-validator, in UTF-8 bytes

_PHONE_CHARS = re.compile(r"\+[0-9 ().\-/]+\Z")
_PHONE_EXAMPLE = "+14155550100"
_PHONE_PARSE_ERRORS: dict[int, str] = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "has an unknown country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "is not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "is too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "is too short",
    phonenumbers.NumberParseException.TOO_LONG: "is too long",
}


# A change as a plain tuple, `Change`'s fields in order: what `parse_fields` returns and
# `stores.buffer.encode_fields` reads. The import validates and encodes millions of rows
# without ever needing a `Change`; building one (a frozen slotted dataclass sets each of
# its 11 fields through `object.__setattr__`) cost ~1.5 us of a row's ~11 us.
ChangeFields = tuple[
    str,  # group_id
    SubscriptionState,  # state
    IdentifierKind,  # kind
    str,  # value
    bool,  # double_opt_in
    float,  # delay_seconds
    int | None,  # occurred_ms
    str,  # source
    bool,  # respect_opt_out
    Lane | None,  # lane
    str | None,  # workspace
]
# The options' defaults, in `Change`'s order (double_opt_in .. workspace).
_DEFAULT_OPTIONS: tuple[bool, float, None, str, bool, None, None] = (
    False,
    0.0,
    None,
    "",
    False,
    None,
    None,
)


def change_fields(change: Change) -> ChangeFields:
    """A `Change` as `parse_fields` would have returned it."""
    return (
        change.group_id,
        change.state,
        change.kind,
        change.value,
        change.double_opt_in,
        change.delay_seconds,
        change.occurred_ms,
        change.source,
        change.respect_opt_out,
        change.lane,
        change.workspace,
    )


def parse_change(data: Mapping[str, Any], *, now: float | None = None) -> Change:
    """Validate and normalise one change given with the v1 field names of an import row.

    Absent keys, ``None`` and blank strings mean "not given" (CSV rows have empty
    cells; keyword-argument producers pass ``None``). Raises `InvalidChange` naming the
    first offending field. `now` (epoch seconds, default: this machine's clock) is what
    `occurred_at` may not lie more than `MAX_FUTURE_SECONDS` ahead of.
    """
    return Change(*parse_fields(data, now=now))


def parse_fields(data: Mapping[str, Any], *, now: float | None = None) -> ChangeFields:
    """`parse_change`, its answer as `ChangeFields` (a tuple) rather than a `Change`: the
    same checks, the same errors, for callers that only encode the change (the import)."""
    if type(data) is not dict and not isinstance(data, Mapping):
        raise InvalidChange("change", f"must be a mapping of field names, got {_type(data)}")
    if not KNOWN_FIELDS.issuperset(data):
        for key in data:
            if key not in KNOWN_FIELDS:
                raise InvalidChange(_show_key(key), "unknown field")

    group_id = _parse_group_id(data.get("subscription_group_id"))
    state = _parse_state(data.get("subscription_state"))
    kind, raw_value = _pick_identifier(data)
    if kind is IdentifierKind.EXTERNAL_ID:
        value = normalise_external_id(raw_value)
    elif kind is IdentifierKind.EMAIL:
        value = normalise_email(raw_value)
    else:
        value = normalise_phone(raw_value)
    extra = len(data) - 3
    if extra == 0:
        # The group, the state and the identifier were given (each is required, and the
        # keys are known fields), so nothing optional was: every option is its default.
        # The usual import row; reading the seven absent options cost ~10 % of its check.
        return (group_id, state, kind, value, *_DEFAULT_OPTIONS)
    occurred = data.get("occurred_at")
    source = data.get("source")
    if extra <= 2 and ("occurred_at" in data) + ("source" in data) == extra:
        # Likewise, a row whose only options are `occurred_at` and/or `source` (a
        # producer's backfill): the three required keys and these two are all it holds,
        # so the other five options are their defaults. Checked as below, in its order.
        return (
            group_id,
            state,
            kind,
            value,
            False,
            0.0,
            None if _is_blank(occurred) else parse_occurred_at(occurred, now),
            "" if source is None else _parse_source(source),
            False,
            None,
            None,
        )

    double_opt_in = _parse_double_opt_in(data.get("use_double_opt_in_logic"))
    if double_opt_in:
        if state is not SubscriptionState.SUBSCRIBED:
            raise InvalidChange(
                "use_double_opt_in_logic", "only meaningful with subscribed, not unsubscribed"
            )
        if kind is IdentifierKind.EMAIL:
            raise InvalidChange(
                "use_double_opt_in_logic", "only for SMS groups (phone or external_id)"
            )

    delay = _parse_delay(data.get("delay_seconds"))
    occurred_ms = None if _is_blank(occurred) else parse_occurred_at(occurred, now)
    respect = data.get("respect_opt_out")
    lane = data.get("lane")
    workspace = data.get("workspace")
    return (
        group_id,
        state,
        kind,
        value,
        double_opt_in,
        delay,
        occurred_ms,
        "" if source is None else _parse_source(source),
        False if respect is None else _parse_bool("respect_opt_out", respect),
        None if _is_blank(lane) else parse_lane(lane),
        None if _is_blank(workspace) else parse_workspace_name(workspace),
    )


def parse_lane(value: Any) -> Lane:
    """`live` or `bulk`; raises `InvalidChange` naming the field."""
    found = _LANES.get(value.strip()) if isinstance(value, str) else None
    if found is None:
        raise InvalidChange("lane", f"must be 'live' or 'bulk', got {show_value(value)}")
    return found


# Workspace names sit inside the keys' hash tag (`{prefix/NAME}`, stores/keys.py): the same
# characters as REDIS_KEY_PREFIX, so neither a `{`/`}` nor a `/` can move the tag or make two
# names meet. core/routing.py decides which workspace a change goes to.
WORKSPACE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
WORKSPACE_NAME_RULE = "1-64 letters, digits, '.', '_' or '-'"


def is_workspace_name(value: object) -> bool:
    return isinstance(value, str) and WORKSPACE_NAME.fullmatch(value) is not None


def parse_workspace_name(value: Any, field: str = "workspace") -> str:
    """A workspace name as a change gives it (trimmed); raises `InvalidChange` naming
    `field`."""
    text = value.strip() if isinstance(value, str) else value
    if not isinstance(text, str) or WORKSPACE_NAME.fullmatch(text) is None:
        shown = show_value(value) if isinstance(value, str) else _type(value)
        raise InvalidChange(field, f"must be a workspace name ({WORKSPACE_NAME_RULE}), got {shown}")
    return text


def change_to_row(change: Change) -> dict[str, Any]:
    """The inverse of `parse_change`: an import row (v1 field names) for a change."""
    row: dict[str, Any] = {
        "subscription_group_id": change.group_id,
        "subscription_state": change.state.value,
        change.kind.value: change.value,
        "use_double_opt_in_logic": change.double_opt_in,
        "delay_seconds": change.delay_seconds,
    }
    if change.occurred_ms is not None:
        row["occurred_at"] = format_ms(change.occurred_ms)
    if change.source:
        row["source"] = change.source
    if change.respect_opt_out:
        row["respect_opt_out"] = True
    if change.lane is not None:
        row["lane"] = change.lane.value
    if change.workspace is not None:
        row["workspace"] = change.workspace
    return row


def format_ms(ms: int) -> str:
    """Milliseconds since the epoch as RFC 3339 in UTC, e.g. 2026-11-28T06:00:00.250Z."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_occurred_at(value: Any, now: float | None = None) -> int:
    """`occurred_at` in ms since the epoch: RFC 3339 with a UTC offset ("Z" or "+02:00"),
    or seconds since the epoch (a number, or a string of one). Refuses a time without an
    offset (whose clock would it be?), before 1970, or more than `MAX_FUTURE_SECONDS`
    ahead of `now`."""
    field = "occurred_at"
    if type(value) is str:
        text = value.strip()
        # A text with "T", "t" or a space after its date is never a number (no spelling
        # float() reads has one at index 10), so it skips float()'s ValueError: the same
        # verdict, ~0.7 us less a row (tests/unit/test_occurred_at.py holds it to the
        # parser before).
        if len(text) > 10 and text[10] in "Tt ":
            seconds = _rfc3339_seconds(text)
        else:
            try:
                seconds = float(text)
            except ValueError:
                seconds = _rfc3339_seconds(text)
    elif isinstance(value, bool):
        raise InvalidChange(field, f"must be an RFC 3339 time or epoch seconds, got {_show(value)}")
    elif isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float: 10**309 seconds and up
            where = "before 1970" if value < 0 else "in the future, beyond any time"
            raise InvalidChange(field, f"lies {where}, got {_show(value)}") from None
    elif isinstance(value, datetime):  # Python producers may pass one (aware)
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidChange(field, f"needs a UTC offset (an aware datetime), got {value}")
        seconds = value.timestamp()
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _rfc3339_seconds(text)
    else:
        raise InvalidChange(field, f"must be an RFC 3339 time or epoch seconds, got {_type(value)}")
    if not math.isfinite(seconds):
        raise InvalidChange(field, f"must be a finite time, got {_show(value)}")
    if seconds < 0:
        raise InvalidChange(field, f"must not be before 1970, got {_show(value)}")
    limit = (time.time() if now is None else now) + MAX_FUTURE_SECONDS
    if seconds > limit:
        hint = " (milliseconds? give seconds)" if seconds > limit * 100 else ""
        raise InvalidChange(
            field,
            f"lies more than {MAX_FUTURE_SECONDS // 60} minutes in the future{hint}, "
            f"got {_show(value)}",
        )
    return round(seconds * 1000)


def _rfc3339_seconds(text: str) -> float:
    # datetime.fromisoformat (Python 3.11+) reads RFC 3339, "Z" included; nothing to add
    # a dependency for. Dates without a time and times without an offset are refused.
    field = "occurred_at"
    if len(text) < 11 or text[10] not in "Tt ":
        raise InvalidChange(
            field,
            f"must be RFC 3339 (e.g. 2026-11-28T06:00:00Z) or epoch seconds, got {_show(text)}",
        )
    try:
        moment = datetime.fromisoformat(text.upper() if text[10] == "t" else text)
    except ValueError:
        raise InvalidChange(
            field, f"is not a valid RFC 3339 time (e.g. 2026-11-28T06:00:00Z), got {_show(text)}"
        ) from None
    zone = moment.tzinfo
    # fromisoformat's zones are fixed offsets (datetime.timezone), whose utcoffset is
    # never None: asked only of another kind.
    if zone is None or (type(zone) is not timezone and moment.utcoffset() is None):
        raise InvalidChange(
            field, f"needs a UTC offset, e.g. {text}Z or {text}+01:00, got {_show(text)}"
        )
    return moment.timestamp()


def normalise_external_id(value: Any) -> str:
    """Trim an external_id; reject empty, over-long or control-character values."""
    return _plain_string("external_id", value, MAX_EXTERNAL_ID_LENGTH)


def normalise_email(value: Any) -> str:
    """Validate an email address (syntax only, no DNS) and return its normalised form.

    The whole address is lower-cased, not only the domain: Braze matches email addresses
    case-insensitively, and one spelling per person keeps a person in one buffer slot.
    """
    text = _required_string("email", value)
    match = _SIMPLE_EMAIL.match(text)
    if match is not None:
        local, domain = match.groups()
        checked = _checked_email_domain(domain)
        if checked is not None:
            normalised_domain, domain_bytes = checked
            # email-validator checks the length of the address as given, normalised and
            # IDNA-encoded; the longest domain form decides. Over the limit: the slow
            # path gives the library's exact message.
            if len(local) + 1 + max(len(domain), domain_bytes) <= _EMAIL_MAX_LENGTH:
                return local.lower() + "@" + normalised_domain
    return _normalise_email_fully(text)


def normalise_phone(value: Any) -> str:
    """Validate a phone number in international format and return it in E.164."""
    text = _required_string("phone", value)
    if not text.startswith("+"):
        raise InvalidChange(
            "phone", f"must be in international format, e.g. {_PHONE_EXAMPLE}, got {_show(text)}"
        )
    digits = text[1:]
    if digits.isdigit() and digits.isascii():  # E.164 already: phonenumbers' answer, cheaper
        found = phones.e164(text)
        if isinstance(found, str):
            return found
        if found == phones.INVALID:
            raise InvalidChange("phone", f"{_show(text)} is not a valid phone number")
        reason = _PHONE_PARSE_ERRORS.get(found, "is not a phone number")
        raise InvalidChange("phone", f"{_show(text)} {reason}")
    return _normalise_phone_by_library(text)


def _normalise_phone_by_library(text: str) -> str:
    """`normalise_phone` of a trimmed text beginning with "+", by phonenumbers' `parse`
    (any spelling it reads), then its validity check (`_is_valid_number`)."""
    if _PHONE_CHARS.match(text) is None:
        raise InvalidChange(
            "phone",
            f"may contain only digits, spaces and ( ) - . / after the leading +, got {_show(text)}",
        )
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        reason = _PHONE_PARSE_ERRORS.get(exc.error_type, "is not a phone number")
        raise InvalidChange("phone", f"{_show(text)} {reason}") from None
    if not _is_valid_number(number):
        raise InvalidChange("phone", f"{_show(text)} is not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _is_valid_number(number: phonenumbers.PhoneNumber) -> bool:
    """`phonenumbers.is_valid_number`, the same answer for every number, for less CPU
    (`core.phones.is_valid`: its patterns cached per region and length, each region's
    type patterns matched as one). tests/unit/test_phone_validity.py compares the two on
    every region's example numbers, their neighbours and random numbers."""
    if not phones.FAST:
        return bool(phonenumbers.is_valid_number(number))
    return phones.is_valid(number.country_code, phonenumbers.national_significant_number(number))


# --------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------


def parse_group_id(value: Any) -> str:
    """A subscription group id (trimmed); raises `InvalidChange` naming the field."""
    return _parse_group_id(value)


def _parse_group_id(value: Any) -> str:
    # An import names a handful of groups over millions of rows: each text's answer is
    # kept (only valid ones; at most _KNOWN_GROUPS_MAX, then the cache starts afresh).
    known = _KNOWN_GROUPS.get(value) if type(value) is str else None
    if known is not None:
        return known
    text = _plain_string("subscription_group_id", value, MAX_GROUP_ID_LENGTH)
    if len(_KNOWN_GROUPS) >= _KNOWN_GROUPS_MAX:
        _KNOWN_GROUPS.clear()
    _KNOWN_GROUPS[value] = text
    return text


_KNOWN_GROUPS: dict[str, str] = {}
_KNOWN_GROUPS_MAX = 4096


def _parse_state(value: Any) -> SubscriptionState:
    state = _STATES.get(value) if type(value) is str else None
    if state is not None:  # exactly "subscribed" or "unsubscribed": nothing to trim
        return state
    text = _required_string("subscription_state", value)
    state = _STATES.get(text)
    if state is None:
        raise InvalidChange(
            "subscription_state", f"must be 'subscribed' or 'unsubscribed', got {_show(text)}"
        )
    return state


def _pick_identifier(data: Mapping[str, Any]) -> tuple[IdentifierKind, Any]:
    found = None
    for name in IDENTIFIER_FIELDS:
        if name in data:
            if found is not None or _is_blank(data[name]):
                break  # two keys, or a blank one: the general way below
            found = name
    else:
        if found is not None:
            return _KINDS[found], data[found]
    given = [name for name in IDENTIFIER_FIELDS if not _is_blank(data.get(name))]
    if len(given) == 1:
        name = given[0]
        return _KINDS[name], data[name]
    if not given:
        raise InvalidChange("identifier", "exactly one of external_id, email, phone is required")
    raise InvalidChange(
        "identifier",
        f"exactly one of external_id, email, phone is allowed, got {', '.join(given)}",
    )


def _parse_double_opt_in(value: Any) -> bool:
    return _parse_bool("use_double_opt_in_logic", value)


def _parse_bool(field: str, value: Any) -> bool:
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, str):
        parsed = _BOOL_STRINGS.get(value.strip().lower())
        if parsed is not None:
            return parsed
    raise InvalidChange(field, f"must be true or false (or yes/no, 1/0), got {_show(value)}")


def _parse_source(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidChange("source", f"must be a string, got {_type(value)}")
    if not value or value.isspace():  # blank
        return ""
    return _plain_string("source", value, MAX_SOURCE_LENGTH)


def _parse_delay(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        raise InvalidChange("delay_seconds", f"must be a number of seconds, got {_show(value)}")
    if isinstance(value, int | float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return 0.0
        try:
            number = float(text)
        except ValueError:
            raise InvalidChange(
                "delay_seconds", f"must be a number of seconds, got {_show(value)}"
            ) from None
    else:
        raise InvalidChange("delay_seconds", f"must be a number of seconds, got {_type(value)}")
    try:
        seconds = float(number) + 0.0  # + 0.0 turns -0.0 into 0.0
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise InvalidChange("delay_seconds", f"must be a finite number, got {_show(value)}")
    if seconds < 0:
        raise InvalidChange("delay_seconds", f"must not be negative, got {_show(value)}")
    if seconds > MAX_DELAY_SECONDS:
        raise InvalidChange(
            "delay_seconds", f"must be at most {MAX_DELAY_SECONDS} (7 days), got {_show(value)}"
        )
    return seconds


def _plain_string(field: str, value: Any, max_length: int) -> str:
    """A trimmed, non-empty string without control characters, at most `max_length`."""
    if type(value) is str and value.isascii() and value.isprintable():
        # Printable ASCII has no control character and always encodes: only the trim,
        # the blank and the length to check (the usual identifier; ~0.3 us less).
        text = value.strip()
        if text and len(text) <= max_length:
            return text
    if not isinstance(value, str):
        _raise_missing_or_type(field, value)
    found = _CONTROL_CHAR.search(value)
    if found is not None:
        raise InvalidChange(
            field,
            f"must not contain control characters, found {found.group()!r} "
            f"at position {found.start()}",
        )
    text = value.strip()
    if not text:
        raise InvalidChange(field, "is required" if not value else "must not be blank")
    if len(text) > max_length:
        raise InvalidChange(field, f"must be at most {max_length} characters, got {len(text)}")
    _check_encodable(field, text)
    return text


def _required_string(field: str, value: Any) -> str:
    if not isinstance(value, str):
        _raise_missing_or_type(field, value)
    text = value.strip()
    if not text:
        raise InvalidChange(field, "is required" if not value else "must not be blank")
    _check_encodable(field, text)
    return text


def _check_encodable(field: str, text: str) -> None:
    """Reject text UTF-8 cannot carry: a lone surrogate, e.g. from a JSON "\\ud800"."""
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidChange(
            field,
            f"must not contain lone surrogates, found {text[exc.start]!r} at position {exc.start}",
        ) from None


def _raise_missing_or_type(field: str, value: Any) -> NoReturn:
    if value is None:
        raise InvalidChange(field, "is required")
    raise InvalidChange(field, f"must be a string, got {_type(value)}")


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and (not value or value.isspace()))


@functools.lru_cache(maxsize=8192)
def _checked_email_domain(domain: str) -> tuple[str, int] | None:
    """The normalised (lower-case) domain and its longest encoded length, or None.

    Validates the domain through email-validator itself, with a trivially valid local
    part, so the rules stay the library's. Cached: bulk imports repeat few domains.
    """
    try:
        checked = validate_email("a@" + domain, check_deliverability=False)
    except EmailNotValidError:
        return None
    return checked.domain.lower(), max(len(checked.domain.encode()), len(checked.ascii_domain))


def _normalise_email_fully(text: str) -> str:
    try:
        checked = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidChange("email", " ".join(str(exc).split())) from None
    return checked.normalized.lower()


def _show(value: Any, limit: int = 40) -> str:
    if type(value) is int and value.bit_length() > 64:
        return _show_big_int(value)
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _show_big_int(value: int) -> str:
    """A long integer by its length: its digits say nothing to a reader, and `repr` of one
    past Python's int/str conversion limit (4,300 digits) raises ValueError."""
    try:
        digits = len(str(abs(value)))
    except ValueError:
        return f"a number of more than {sys.get_int_max_str_digits():,} digits"
    return f"a {digits:,}-digit number"


def show_value(value: Any) -> str:
    """How an error message quotes a value (cut off when long): maskers look for it."""
    return _show(value)


def _show_key(key: Any) -> str:
    return " ".join(str(key).split())[:60] or repr(key)


def _type(value: Any) -> str:
    return type(value).__name__
