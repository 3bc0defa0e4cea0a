"""The import's faster parsing (issue 26) gives the answers of the parsing before it.

`parse_occurred_at` skips `float()` for a text with a "T", "t" or a space after its date;
`parse_fields` (what `parse_change` and the import share) reads only `occurred_at` and
`source` for a row whose only options they are; `encode_fields` writes a plain `source`
without `json.dumps`. Each is compared here, on generated input, with a copy of the code
before it (main at 91ae1f1): the same value or the same error message, field included.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core.changes as changes
from core.changes import (
    MAX_FUTURE_SECONDS,
    Change,
    IdentifierKind,
    InvalidChange,
    SubscriptionState,
    parse_change,
    parse_fields,
    parse_occurred_at,
)
from stores.buffer import encode_change, encode_fields

NOW = 1_796_000_000.0  # 2026-11-30T00:53:20Z: the "now" every comparison here shares


# --------------------------------------------------------------------------------------
# The parsers before (91ae1f1), copied: what the new ones must answer alike
# --------------------------------------------------------------------------------------


def old_parse_occurred_at(value: Any, now: float | None = None) -> int:
    field = "occurred_at"
    _show = changes._show
    if isinstance(value, bool):
        raise InvalidChange(field, f"must be an RFC 3339 time or epoch seconds, got {_show(value)}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            where = "before 1970" if value < 0 else "in the future, beyond any time"
            raise InvalidChange(field, f"lies {where}, got {_show(value)}") from None
    elif isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidChange(field, f"needs a UTC offset (an aware datetime), got {value}")
        seconds = value.timestamp()
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = old_rfc3339_seconds(text)
    else:
        raise InvalidChange(
            field, f"must be an RFC 3339 time or epoch seconds, got {changes._type(value)}"
        )
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


def old_rfc3339_seconds(text: str) -> float:
    field = "occurred_at"
    _show = changes._show
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
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidChange(
            field, f"needs a UTC offset, e.g. {text}Z or {text}+01:00, got {_show(text)}"
        )
    return moment.timestamp()


def old_plain_string(field: str, value: Any, max_length: int) -> str:
    c = changes
    if not isinstance(value, str):
        c._raise_missing_or_type(field, value)
    found = c._CONTROL_CHAR.search(value)
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
    c._check_encodable(field, text)
    return text


def old_parse_state(value: Any) -> SubscriptionState:
    text = changes._required_string("subscription_state", value)
    state = changes._STATES.get(text)
    if state is None:
        raise InvalidChange(
            "subscription_state",
            f"must be 'subscribed' or 'unsubscribed', got {changes._show(text)}",
        )
    return state


def old_pick_identifier(data: Mapping[str, Any]) -> tuple[IdentifierKind, Any]:
    given = [name for name in changes.IDENTIFIER_FIELDS if not changes._is_blank(data.get(name))]
    if len(given) == 1:
        name = given[0]
        return changes._KINDS[name], data[name]
    if not given:
        raise InvalidChange("identifier", "exactly one of external_id, email, phone is required")
    raise InvalidChange(
        "identifier",
        f"exactly one of external_id, email, phone is allowed, got {', '.join(given)}",
    )


def old_parse_source(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidChange("source", f"must be a string, got {changes._type(value)}")
    if changes._is_blank(value):
        return ""
    return old_plain_string("source", value, changes.MAX_SOURCE_LENGTH)


def old_parse_change(data: Mapping[str, Any], *, now: float | None = None) -> Change:
    """`parse_change` before, without either shortcut: every option read, and the helpers
    this change made cheaper in their form before (the others are shared)."""
    c = changes
    if type(data) is not dict and not isinstance(data, Mapping):
        raise InvalidChange("change", f"must be a mapping of field names, got {c._type(data)}")
    if not c.KNOWN_FIELDS.issuperset(data):
        for key in data:
            if key not in c.KNOWN_FIELDS:
                raise InvalidChange(c._show_key(key), "unknown field")
    group_id = old_plain_string(
        "subscription_group_id", data.get("subscription_group_id"), c.MAX_GROUP_ID_LENGTH
    )
    state = old_parse_state(data.get("subscription_state"))
    kind, raw_value = old_pick_identifier(data)
    if kind is IdentifierKind.EXTERNAL_ID:
        value = old_plain_string("external_id", raw_value, c.MAX_EXTERNAL_ID_LENGTH)
    elif kind is IdentifierKind.EMAIL:
        value = c.normalise_email(raw_value)
    else:
        value = c.normalise_phone(raw_value)
    double_opt_in = c._parse_double_opt_in(data.get("use_double_opt_in_logic"))
    if double_opt_in:
        if state is not SubscriptionState.SUBSCRIBED:
            raise InvalidChange(
                "use_double_opt_in_logic", "only meaningful with subscribed, not unsubscribed"
            )
        if kind is IdentifierKind.EMAIL:
            raise InvalidChange(
                "use_double_opt_in_logic", "only for SMS groups (phone or external_id)"
            )
    delay = c._parse_delay(data.get("delay_seconds"))
    occurred = data.get("occurred_at")
    occurred_ms = None if c._is_blank(occurred) else old_parse_occurred_at(occurred, now)
    source = data.get("source")
    respect = data.get("respect_opt_out")
    lane = data.get("lane")
    workspace = data.get("workspace")
    return Change(
        group_id,
        state,
        kind,
        value,
        double_opt_in,
        delay,
        occurred_ms,
        "" if source is None else old_parse_source(source),
        False if respect is None else c._parse_bool("respect_opt_out", respect),
        None if c._is_blank(lane) else c.parse_lane(lane),
        None if c._is_blank(workspace) else c.parse_workspace_name(workspace),
    )


def answer(parse: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "value", parse(*args, **kwargs)
    except InvalidChange as exc:
        return "refused", (exc.field, str(exc))


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

OFFSETS = ["Z", "z", "+00:00", "-00:00", "+02:00", "-05:30", "+14:00", "-23:59", "+24:00"]
OFFSETS += ["+0530", "+05", "+05:30:15", "+05:30:15.5", "", " Z", "UTC", "+5:30", "Z "]
SEPARATORS = ["T", "t", " ", "_", "", "TT", "x"]


@st.composite
def rfc3339_like(draw: st.DrawFn) -> str:
    """Texts shaped like RFC 3339, right and wrong: any year, month 00-13, day 00-32
    (leap days included), hour 00-25, minute and second 00-61, 0-9 fraction digits, many
    offsets and separators, padding."""
    year = draw(
        st.one_of(st.sampled_from([1969, 1970, 2000, 2024, 2025, 2026, 2100]), st.integers(0, 9999))
    )
    month = draw(st.integers(0, 13))
    day = draw(st.sampled_from([0, 1, 28, 29, 30, 31, 32]) | st.integers(1, 28))
    hour = draw(st.integers(0, 25))
    minute = draw(st.sampled_from([0, 59, 60, 61]) | st.integers(0, 59))
    second = draw(st.sampled_from([0, 59, 60, 61]) | st.integers(0, 59))
    fraction = draw(st.sampled_from(["", "."]) | st.from_regex(r"\.[0-9]{1,9}", fullmatch=True))
    separator = draw(st.sampled_from(SEPARATORS))
    offset = draw(st.sampled_from(OFFSETS))
    text = f"{year:04d}-{month:02d}-{day:02d}{separator}{hour:02d}:{minute:02d}:{second:02d}"
    text += fraction + offset
    if draw(st.booleans()):  # a date, hour or minute alone, or a character changed
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "0", ":", "-", "T", " ", "\u0661"]))
        text += text[cut + 1 :] if draw(st.booleans()) else ""
    padding = draw(st.sampled_from(["", " ", "\t", "\u00a0", "\n"]))
    return padding + text + padding


@st.composite
def recent_times(draw: st.DrawFn) -> str:
    """Valid RFC 3339 times around NOW (the future limit on either side), in every offset."""
    ms = draw(st.integers(-3 * 86400_000, 3 * 86400_000))
    minutes = draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))
    zone = timezone(timedelta(minutes=minutes))
    moment = datetime.fromtimestamp(NOW, UTC) + timedelta(milliseconds=ms)
    spec = draw(st.sampled_from(["seconds", "milliseconds", "microseconds"]))
    text = moment.astimezone(zone).isoformat(timespec=spec)
    return text.replace("+00:00", "Z") if draw(st.booleans()) else text


NUMBER_TEXTS = st.sampled_from(
    [
        "1796000000",
        " 1.5e9 ",
        "1_796_000_000",
        "inf",
        "-inf",
        "nan",
        "-1",
        "0",
        "-0.0",
        "1796000000000",
        "1e400",
        "0x10",
        "1796000300",
        "1796000301",
        "\u0661\u0662",
        "12345678901t",
    ]
)
VALUES = st.one_of(
    rfc3339_like(),
    recent_times(),
    NUMBER_TEXTS,
    st.from_regex(r"[0-9\-:Tt .Zz+_e]{0,30}", fullmatch=True),
    st.text(max_size=40),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-10, max_value=2 * 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.datetimes(
        timezones=st.none()
        | st.just(UTC)
        | st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-1439, 1439))
    ),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
def test_occurred_at_same_verdict_and_message_as_before(value: Any) -> None:
    assert answer(parse_occurred_at, value, NOW) == answer(old_parse_occurred_at, value, NOW)


@pytest.mark.parametrize(
    "text",
    [
        "2024-02-29T12:00:00Z",  # a leap day
        "2023-02-29T12:00:00Z",  # none that year
        "2026-11-28t06:00:00z",
        "2026-11-28 06:00:00+02:00",
        "2026-11-28T06:00:00.123456789Z",  # more fraction digits than microseconds
        "2026-11-28T06:00:00",  # no offset
        "2026-11-28T24:00:00Z",
        "1969-12-31T23:59:59Z",  # before 1970
        "1970-01-01T00:00:00Z",
        "2026-11-30T00:58:20Z",  # exactly at the future limit
        "2026-11-30T00:58:20.001Z",  # just past it
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00+14:00",
        "12345678901T",
    ],
)
def test_occurred_at_edges_as_before(text: str) -> None:
    assert answer(parse_occurred_at, text, NOW) == answer(old_parse_occurred_at, text, NOW)


# --------------------------------------------------------------------------------------
# parse_change / parse_fields: the shortcuts answer as reading every option did
# --------------------------------------------------------------------------------------

OPTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "occurred_at": st.one_of(
        recent_times(), NUMBER_TEXTS, st.sampled_from(["", " ", None, 5, True])
    ),
    "source": st.sampled_from(
        ["backfill", " form ", "", " ", None, 3, "a\x00b", "x" * 101, 'é"\\']
    ),
    "use_double_opt_in_logic": st.sampled_from([True, False, "yes", "no", "", None, "maybe"]),
    "delay_seconds": st.sampled_from([0, 5, "10", "", None, -1, "x", 10**9]),
    "respect_opt_out": st.sampled_from([True, False, "1", None, "x"]),
    "lane": st.sampled_from(["live", "bulk", "", None, "fast"]),
    "workspace": st.sampled_from(["eu", "", None, "a/b"]),
}
IDENTIFIERS: dict[str, st.SearchStrategy[Any]] = {
    "external_id": st.sampled_from(["user-1", " user-2 ", "", None, 7]),
    "email": st.sampled_from(["a@example.com", "Bob@Example.COM", "", "nope", None]),
    "phone": st.sampled_from(["+14155550100", "+1 415 555 0100", "", "+1", None]),
}


ABSENT = object()


@st.composite
def rows(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid required fields (so the options are reached), any identifier keys, and
    options in every combination: none, `occurred_at` and/or `source` alone (the shortcut),
    those with others, others alone."""
    row: dict[str, Any] = {}
    for name, values in (
        ("subscription_group_id", ["group-1", "group-2", " g ", "", None, 5, ABSENT]),
        ("subscription_state", ["subscribed", "unsubscribed", " subscribed", "maybe", ABSENT]),
    ):
        value = draw(st.sampled_from([values[0], values[1], *values]))
        if value is not ABSENT:
            row[name] = value
    kind = draw(st.sampled_from(list(IDENTIFIERS)))
    valid = {"external_id": "user-1", "email": "a@example.com", "phone": "+14155550100"}
    row[kind] = draw(st.just(valid[kind]) | IDENTIFIERS[kind])
    for name in draw(st.sampled_from([[], [], [], ["email"], ["phone", "external_id"]])):
        if name != kind:
            row[name] = draw(IDENTIFIERS[name])
    shape = draw(st.sampled_from(["none", "occurred", "source", "both", "with_others", "others"]))
    names: list[str] = []
    if shape in ("occurred", "both", "with_others"):
        names.append("occurred_at")
    if shape in ("source", "both", "with_others"):
        names.append("source")
    if shape in ("with_others", "others"):
        others = [n for n in OPTION_VALUES if n not in ("occurred_at", "source")]
        names += draw(st.lists(st.sampled_from(others), min_size=1, max_size=2, unique=True))
    for name in names:
        row[name] = draw(OPTION_VALUES[name])
    if not draw(st.integers(0, 30)):
        row["unknown"] = 1
    return row


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_rows_parse_as_before(row: dict[str, Any]) -> None:
    before = answer(old_parse_change, row, now=NOW)
    assert answer(parse_change, row, now=NOW) == before
    fields = answer(parse_fields, row, now=NOW)
    if before[0] == "value":
        assert fields == ("value", tuple(getattr(before[1], f) for f in Change.__slots__))
    else:
        assert fields == before


def test_a_row_of_occurred_at_and_source_only_reads_no_other_option() -> None:
    """The shortcut is taken (the row is never read for the five other options): a row
    that names an option the shortcut would skip takes the full path instead."""
    row = {
        "subscription_group_id": "group-1",
        "subscription_state": "subscribed",
        "external_id": "user-1",
        "occurred_at": "2026-11-28T06:00:00Z",
        "source": "backfill",
    }

    class Counting(dict):  # type: ignore[type-arg]
        read: list[str]

        def get(self, key: str, default: Any = None) -> Any:
            self.read.append(key)
            return super().get(key, default)

    counted = Counting(row)
    counted.read = []
    assert parse_fields(counted, now=NOW)[6:8] == (1_795_845_600_000, "backfill")
    assert "delay_seconds" not in counted.read and "lane" not in counted.read
    counted = Counting({**row, "email": ""})  # a blank identifier too: the full path
    counted.read = []
    parse_fields(counted, now=NOW)
    assert "delay_seconds" in counted.read


# --------------------------------------------------------------------------------------
# encode_fields: a source without json.dumps, the same bytes
# --------------------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(
    st.text(min_size=1, max_size=30)
    | st.sampled_from(["backfill", 'a"b', "a\\b", "\u2028", "\x7f", "é"])
)
def test_a_source_is_encoded_as_json_dumps_wrote_it(source: str) -> None:
    change = Change(
        "g", SubscriptionState.SUBSCRIBED, IdentifierKind.EXTERNAL_ID, "u", source=source
    )
    try:
        expected = b',"c":' + json.dumps(source, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            encode_change(change)
        return
    members = encode_change(change)[4]
    assert members.endswith(expected)
    assert members == encode_fields(changes.change_fields(change))[4]


# --------------------------------------------------------------------------------------
# A line's JSON: the decoder called without json.loads around it, the same answers
# --------------------------------------------------------------------------------------


def old_json_object(text: str) -> Any:
    """`tasks.rows._json_object` before (91ae1f1): json.loads itself."""
    import sys

    from tasks.rows import InvalidRow, _json_type

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return InvalidRow(f"line is not a JSON object: {exc.msg} at column {exc.colno}")
    except RecursionError:
        return InvalidRow("line is not a JSON object: nested too deeply")
    except ValueError:
        return InvalidRow(
            "line is not a JSON object: a number with more than "
            f"{sys.get_int_max_str_digits():,} digits"
        )
    if not isinstance(value, dict):
        return InvalidRow(f"line is not a JSON object: found {_json_type(value)}")
    return value


LINES = st.one_of(
    st.text(max_size=40),
    st.from_regex(
        r"\ufeff?\s*\{\"[a-z_]{0,8}\"\s*:\s*(\"[^\"]{0,8}\"|-?[0-9.e]{1,6}|NaN|null|true)\s*\}\s*",
        fullmatch=True,
    ),
    st.sampled_from(
        ['\ufeff{"a": 1}', '{"a": 1}\ufeff', "[1]", '"x"', "{", '{"a": NaN}', "1" * 5000, " "]
    ),
)


@settings(max_examples=1500, deadline=None)
@given(LINES)
def test_a_line_reads_as_json_loads_read_it(text: str) -> None:
    from tasks.rows import _json_object

    assert repr(_json_object(text)) == repr(old_json_object(text))


def old_jsonl_row(raw: bytes) -> list[tuple[int, Any]]:
    """`tasks.rows._jsonl_rows` of one line before msgspec read it first (29c2a3c): the
    UTF-8 decoded, a blank line skipped, then `old_json_object`."""
    from tasks.rows import InvalidRow, _utf8_problem

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [(1, InvalidRow(_utf8_problem(exc)))]
    if text.isspace() or not text:
        return []
    return [(1, old_json_object(text))]


# Values of every JSON kind and spelling msgspec and the json module might read apart:
# numbers (exponents, -0, leading zeros, beyond a float, 4,300 digits and one more),
# strings (escapes, lone and paired surrogates, control and non-ASCII characters, bad
# UTF-8), literals, nesting; whitespace and trailing bytes around the object.
JSON_VALUES = st.one_of(
    st.from_regex(r"-?(0|[1-9][0-9]{0,20})(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(
        [
            "01",
            "-0",
            "-0.0",
            "1.",
            ".5",
            "+1",
            "1e309",
            "-1e400",
            "2.5e-324",
            "NaN",
            "Infinity",
            "-Infinity",
            "1" * 4300,
            "1" * 4301,
            "9007199254740993.0",
            '"\\ud800"',
            '"\\udc00\\ud800"',
            '"\\ud83d\\ude00"',
            '"\\u0000"',
            '"\\/"',
            '"\\x"',
            '"\x7f"',
            '"\x1f"',
            '"\t"',
            "true",
            "false",
            "null",
            "tru",
            "[]",
            "{}",
            '{"b": [1, {"c": null}]}',
            "[" * 3000 + "]" * 3000,
            '"é\u2028"',
        ]
    ),
    st.text(max_size=12).map(json.dumps),
    st.floats(allow_nan=False).map(repr),
    st.integers().map(str),
)
JSON_LINES = st.one_of(
    st.builds(
        lambda key, value, before, after: f'{before}{{"{key}": {value}}}{after}'.encode(
            "utf-8", "surrogatepass"
        ),
        st.sampled_from(["subscription_group_id", "occurred_at", "a", ""]),
        JSON_VALUES,
        st.sampled_from(["", " ", "\t", "\ufeff", "\x0c"]),
        st.sampled_from(["", "\n", "\r\n", " \n", "x", "{}", "\x00", ","]),
    ),
    st.binary(max_size=30).map(lambda tail: b'{"a": "' + tail + b'"}\n'),
    st.binary(max_size=30),
    st.sampled_from([b"\n", b"   \n", b"", b'{"a":1,"a":2}', b'{"b":1,"a":2,"b":3}\n']),
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_LINES)
def test_a_line_msgspec_reads_reads_as_json_loads_read_it(raw: bytes) -> None:
    """The import reads a line with msgspec first (issue 26): where msgspec answers with
    an object it is json.loads' object (the same keys in the same order, the same values
    of the same types); every other line has the json module's verdict and message."""
    from tasks.rows import _jsonl_rows

    assert repr(list(_jsonl_rows([(1, raw)]))) == repr(old_jsonl_row(raw))
