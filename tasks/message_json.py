"""Celery's JSON messages, decoded as kombu decodes them except for one thing: an integer
longer than Python's int/str conversion limit (`sys.get_int_max_str_digits()`, 4,300
digits) becomes the string of its digits instead of failing the whole message.

A producer in another language can send `"occurred_at": 9999…` (5,000 digits). kombu's
decoder raises ValueError for it, and Celery then logs the message as undecodable at
CRITICAL, with a traceback and the start of the raw body — an email address included.
Decoded this way, the task receives the digits, validation refuses the field in one line
("occurred_at: must be a finite time"), and the task fails as any invalid change does.
Encoding is kombu's own. (A `parse_int` hook rather than raising the process-wide limit
with `sys.set_int_max_str_digits`: the limit guards every int(str) in the process against
quadratic-time conversions, and a message's fields are not where to lift it.)
"""

from __future__ import annotations

import json
import sys
from typing import Any

from kombu.serialization import registry
from kombu.utils.json import dumps, object_hook


def _int(digits: str) -> int | str:
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        return digits
    return int(digits)


def loads(data: Any) -> Any:
    """kombu.utils.json.loads, with long integers left as their digits."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if isinstance(data, bytes | bytearray):
        data = bytes(data).decode("utf-8")
    return json.loads(data, object_hook=object_hook, parse_int=_int)


def register() -> None:
    """Replace kombu's "json" serializer by this one (same name, content type, encoder)."""
    registry.register(
        "json", dumps, loads, content_type="application/json", content_encoding="utf-8"
    )
