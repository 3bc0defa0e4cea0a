"""Unit tests for the Braze client's reading of an answer sent straight to httpcore's pool
(issue 26, the eighth step): its headers and charset as httpx's Response gives them."""

from __future__ import annotations

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery.braze_client import content_charset, header_dict

# Header names as h11 lets them through (tokens), in any case, some repeated; values any
# bytes but CR, LF and NUL (what h11 refuses), so ASCII, UTF-8 and Latin-1 texts all occur.
NAMES = st.sampled_from(
    [
        b"Content-Type",
        b"content-type",
        b"X-RateLimit-Reset",
        b"x-ratelimit-reset",
        b"Date",
        b"Retry-After",
        b"Set-Cookie",
        b"X-A_b.c~1",
    ]
)
VALUES = st.one_of(
    st.binary(max_size=20).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    ),
    st.text(max_size=12).map(
        lambda t: t.encode("utf-8").replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
    ),
    st.sampled_from(
        [
            b"application/json",
            b"text/html; charset=ISO-8859-1",
            b'text/plain; charset="utf-8"',
            b"application/json;charset=utf-16",
            b"",
        ]
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=8))
def test_headers_and_charset_are_httpx_responses(raw):
    response = httpx.Response(201, headers=raw)
    headers = header_dict(raw)
    assert headers == dict(response.headers)
    assert list(headers) == list(response.headers)
    assert content_charset(headers.get("content-type")) == response.charset_encoding


def test_a_repeated_header_is_joined_and_a_latin1_value_kept():
    raw = [(b"X-RateLimit-Reset", b"1"), (b"x-ratelimit-reset", b"2"), (b"Server", b"caf\xe9")]
    assert header_dict(raw) == {"x-ratelimit-reset": "1, 2", "server": "café"}
    assert header_dict(raw) == dict(httpx.Response(200, headers=raw).headers)
