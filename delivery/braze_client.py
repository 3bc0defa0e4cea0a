"""Talking to Braze: request bodies (pure) and one pooled httpx client per process."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from core.changes import SubscriptionState
from core.planning import BatchKey
from core.redaction import scrub

V1_PATH = "/subscription/status/set"
V2_PATH = "/v2/subscription/status/set"


def v1_body(key: BatchKey, values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The body of one v1 request: one group, one state, one identifier kind."""
    body: dict[str, Any] = {
        "subscription_group_id": key.group_id,
        "subscription_state": key.state.value,
        key.kind.value: list(values),
    }
    # Braze: double opt-in is for SMS groups and only meaningful with "subscribed".
    if key.double_opt_in and key.state is SubscriptionState.SUBSCRIBED:
        body["use_double_opt_in_logic"] = True
    return body


# v2 names each identifier list in the plural.
V2_LIST_NAMES = {"external_id": "external_ids", "email": "emails", "phone": "phones"}


def v2_body(entries: list[tuple[BatchKey, tuple[str, ...]]]) -> dict[str, Any]:
    """The body of one v2 request: several (group, state) entries."""
    groups: list[dict[str, Any]] = []
    for key, values in entries:
        entry: dict[str, Any] = {
            "subscription_group_id": key.group_id,
            "subscription_state": key.state.value,
            V2_LIST_NAMES[key.kind.value]: list(values),
        }
        if key.double_opt_in and key.state is SubscriptionState.SUBSCRIBED:
            entry["use_double_opt_in_logic"] = True
        groups.append(entry)
    return {"subscription_groups": groups}


@dataclass(frozen=True, slots=True)
class Reply:
    """One exchange with Braze: a status and body, or the transport error that stopped it."""

    status: int | None
    body: str
    headers: dict[str, str]
    latency_ms: float
    error: str | None = None
    unsent: bool = False  # the fence refused: not one byte of the request was written


class _FenceRefused(Exception):
    """Raised inside httpcore's trace hook to stop a request before its first byte."""


# httpcore's trace events right before the request's first byte goes out (HTTP/1.1, 2).
FIRST_BYTE_EVENTS = ("http11.send_request_headers.started", "http2.send_request_headers.started")


class BrazeClient:
    """A keep-alive connection pool to one REST endpoint. Thread-safe (httpx.Client is)."""

    def __init__(
        self,
        endpoint: str,
        api_key: SecretStr,
        *,
        timeout_seconds: float,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint = endpoint
        # Scrubbed out of every transport error (never stored elsewhere on the object).
        self._secrets = (api_key.get_secret_value(),)
        self._http = httpx.Client(
            base_url=endpoint,
            # The key goes only into this header; httpx never logs header values.
            headers={
                "Authorization": f"Bearer {api_key.get_secret_value()}",
                "Content-Type": "application/json",
                "User-Agent": "braze-subs",
            },
            timeout=timeout_seconds,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"BrazeClient(endpoint={self.endpoint!r})"

    def post(
        self, path: str, body: dict[str, Any], *, fence: Callable[[], bool] | None = None
    ) -> Reply:
        """POST `body`. `fence`, when given, is asked right before the request's first byte
        is written (after the pool and the connection are ready, httpcore's trace hook);
        if it answers False, nothing is sent and the reply says `unsent`."""
        if fence is None:
            return self._exchange(lambda: self._http.post(path, json=body))

        def trace(event: str, _info: dict[str, Any]) -> None:
            if event in FIRST_BYTE_EVENTS and not fence():
                raise _FenceRefused

        extensions = {"trace": trace}
        return self._exchange(lambda: self._http.post(path, json=body, extensions=extensions))

    def _exchange(self, send: Callable[[], httpx.Response]) -> Reply:
        started = time.perf_counter()
        try:
            response = send()
        except _FenceRefused:
            latency_ms = (time.perf_counter() - started) * 1000
            return Reply(status=None, body="", headers={}, latency_ms=latency_ms, unsent=True)
        except httpx.HTTPError as exc:
            # The exception's text can quote the request's headers (h11 quotes an illegal
            # header value whole) and URLs with userinfo: it is scrubbed before it can
            # reach a log line, a batch record or a dead letter.
            return Reply(
                status=None,
                body="",
                headers={},
                latency_ms=(time.perf_counter() - started) * 1000,
                error=scrub(f"{type(exc).__name__}: {exc}", self._secrets)[:300],
            )
        return Reply(
            status=response.status_code,
            body=response.text,
            headers=dict(response.headers),
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    def get(self, path: str, params: list[tuple[str, str]]) -> Reply:
        """One GET (the read endpoints); `params` may repeat a name (`email=a&email=b`)."""
        return self._exchange(lambda: self._http.get(path, params=params))

    def close(self) -> None:
        self._http.close()
