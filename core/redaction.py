"""Masks for personal data in logs: enough to recognise, not enough to identify."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from core.changes import IDENTIFIER_FIELDS, show_value


def mask_email(email: str) -> str:
    """`jane.doe@example.com` -> `j***@example.com`."""
    local, at, domain = email.partition("@")
    if not at:
        return mask_text(email)
    return f"{local[:1]}***@{domain}"


def mask_phone(phone: str) -> str:
    """`+14155550100` -> `+1*******100` (country code and last three digits)."""
    if len(phone) < 10:  # too short to show anything but its length
        return "*" * len(phone)
    return f"{phone[:2]}{'*' * (len(phone) - 5)}{phone[-3:]}"


def mask_text(text: str) -> str:
    return f"{text[:1]}***" if text else ""


def mask_identifier(kind: str, value: str) -> str:
    if kind == "email":
        return mask_email(value)
    if kind == "phone":
        return mask_phone(value)
    return value  # external ids are pseudonymous by design


# `scheme://user:password@host` -> `scheme://***@host`: URL userinfo is a credential.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]*@")
# `Bearer <anything>` and `Authorization: <anything>`: whatever follows is a credential.
_BEARER = re.compile(
    r"(?i)(?P<name>\bbearer\s+|\bauthorization[\"']?\s*[:=]\s*[\"']?)[^\s,;'\"\]}]+"
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` (an exception's message, an answer body) without credentials: every
    occurrence of each secret, bearer tokens and URL userinfo become `***`.

    Whatever a transport error says goes through this before it reaches a log line, a
    batch record or a dead letter; the secrets are the process's own (its API key)."""
    for secret in secrets:
        for form in {secret, secret.strip(), repr(secret)[1:-1]} - {""}:
            text = text.replace(form, "***")
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _BEARER.sub(r"\g<name>***", text)


def mask_identifiers_in(message: str, row: Mapping[str, Any]) -> str:
    """`message` with every identifier of `row` (an import row) it quotes masked as the
    logs mask them: a refusal told to a producer (Flower, the HTTP API's 422) or logged."""
    for kind in IDENTIFIER_FIELDS:
        value = row.get(kind)
        if not isinstance(value, str):
            continue
        for plain in {value, value.strip()} - {""}:
            mask = mask_identifier(kind, plain)
            # Longest first: the value as the message quotes it (cut off when long, so
            # that the whole value would not be found in it), then the value itself.
            for shown in (show_value(plain), repr(plain), plain):
                replacement = repr(mask) if shown != plain else mask
                message = message.replace(shown, replacement)
    return message


# An email address or an E.164 phone number anywhere in a free text (Braze's messages,
# a refusal's detail): what `confine` masks even when it was not told the identifier.
_EMAIL_IN_TEXT = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE_IN_TEXT = re.compile(r"(?<![\w+])\+\d{7,15}(?!\d)")


def mask_in_text(kind: str, value: str) -> str:
    """The mask of an identifier quoted in a stored text: emails and phones as in logs,
    external ids reduced to their first character, or to nothing when short
    (`mask_identifier` leaves them whole: fine for a log line, not for someone else's
    record)."""
    if kind in ("email", "phone"):
        return mask_identifier(kind, value)
    return mask_text(value) if len(value) > 4 else "***"


def confine(text: str, identifiers: Iterable[tuple[str, str]], keep: Iterable[str] = ()) -> str:
    """`text` as it may be stored in the records of the identifiers in `keep`: every other
    identifier it quotes is masked — each of `identifiers` ((kind, value) pairs: the
    request's) where it stands as a whole word, then any email address or E.164 phone
    number still in it. An identifier is stored only in its own records, so `forget`
    finds every trace of it (issue 21)."""
    if not text:
        return text
    kept = set(keep)
    # Only the identifiers the text holds at all (a substring test) go to the regex.
    quoted = {(kind, value) for kind, value in identifiers if value and value in text}
    for kind, value in sorted(quoted, key=lambda pair: -len(pair[1])):
        if value in kept:
            continue
        masked = mask_in_text(kind, value)
        text = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", lambda _, m=masked: m, text)

    def email(match: re.Match[str]) -> str:
        return match.group(0) if match.group(0) in kept else mask_email(match.group(0))

    def phone(match: re.Match[str]) -> str:
        return match.group(0) if match.group(0) in kept else mask_phone(match.group(0))

    return _PHONE_IN_TEXT.sub(phone, _EMAIL_IN_TEXT.sub(email, text))


# Query parameters of a Redis URL that hold a credential (redis-py reads `password` there).
_SECRET_QUERY = frozenset(("password", "pass", "pwd", "token"))


def redact_url(url: str) -> str:
    """A connection URL for messages: its password — in the userinfo or a `?password=`
    parameter — shown as `***`; each URL of a `;`-joined sentinel list too."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    # Edited in place (urlunsplit would turn `unix:///path` into `unix:/path`).
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        url = url.replace(parts.netloc, f"{parts.username or ''}:***@{host}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(name.lower() in _SECRET_QUERY for name, _ in pairs):
            shown = [
                (name, "***" if name.lower() in _SECRET_QUERY else value) for name, value in pairs
            ]
            url = url.replace(f"?{parts.query}", f"?{urlencode(shown, safe='*/:')}", 1)
    return url
