"""Talking to Braze: request bodies (pure) and one pooled httpx client per process.

Every exchange has one overall deadline (`timeout_seconds`), not httpx's per-phase timeout:
a server that trickles its answer a byte at a time, or its headers, cannot hold a worker's
thread (and, through the heartbeat, its claim) longer than that. Bodies are read up to
`MAX_ANSWER_BYTES`; the rest is never read (Braze's answers are a few hundred bytes).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpcore
import httpx

# httpx's own parts, as its transport and Response use them (`BrazeClient._send_straight`):
# the mapping of httpcore's errors, its response stream and the charset of a content type;
# if an upgrade moves them this fails at import.
from httpx._models import _parse_content_type_charset
from httpx._transports.default import ResponseStream, map_httpcore_exceptions
from pydantic import SecretStr

from core.changes import SubscriptionState
from core.outcome import MAX_ANSWER_BYTES, Classified, classify
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
    truncated: bool = False  # the body was longer than MAX_ANSWER_BYTES: `body` is its start

    def header(self, name: str) -> str:
        """A header of the answer, whatever its case; "" if absent."""
        return next((v for k, v in self.headers.items() if k.lower() == name), "")

    def classified(self) -> Classified:
        """What this exchange means (core/outcome.py `classify`): the one reading of a
        reply's status, body, content type, truncation and redirect, for posts and reads."""
        return classify(
            self.status,
            self.body,
            self.error,
            content_type=self.header("content-type"),
            truncated=self.truncated,
            location=self.header("location"),
        )


class _Deadline(threading.local):
    """The deadline (time.monotonic()) of the exchange this thread is in, if any."""

    at: float | None = None

    def left(self, phase_timeout: float | None) -> float | None:
        """The time a socket operation may take: its phase's timeout, cut to what is left of
        the exchange's deadline. Past the deadline: 0, and the caller raises."""
        if self.at is None:
            return phase_timeout
        left = max(self.at - time.monotonic(), 0.0)
        return left if phase_timeout is None else min(phase_timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the exchange's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def _timeout(self, timeout: float | None, error: type[Exception]) -> float | None:
        left = self._deadline.left(timeout)
        if left is not None and left <= 0:
            raise error("the exchange's deadline passed")
        return left

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = self._timeout(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._stream.start_tls(ssl_context, server_hostname, left), self._deadline
        )

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend with the exchange's deadline applied to every connect,
    read and write. Why not httpx's timeouts alone: they bound each socket operation, so a
    byte every second never times out (httpx#1450 suggests async cancellation, which a
    thread-pool worker does not have). The wrapped backend does the real work."""

    def __init__(self, backend: httpcore.NetworkBackend, deadline: _Deadline) -> None:
        self._backend = backend
        self._deadline = deadline

    def _left(self, timeout: float | None) -> float | None:
        left = self._deadline.left(timeout)
        if left is not None and left <= 0:
            raise httpcore.ConnectTimeout("the exchange's deadline passed")
        return left

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(
            host, port, self._left(timeout), local_address, socket_options
        )
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_unix_socket(path, self._left(timeout), socket_options)
        return _DeadlineStream(stream, self._deadline)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _apply_deadline(client: httpx.Client, deadline: _Deadline) -> None:
    """Wrap the network backend of every transport of `client` (the direct one and those
    httpx mounted for proxies from the environment) in the exchange's deadline. httpx takes
    no backend argument, so its pools' `_network_backend` is replaced; if an upgrade moves
    it this fails at start (and tests/integration/test_answers.py fails), never silently."""
    transports = [client._transport, *client._mounts.values()]
    for transport in transports:
        if transport is None:
            continue
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if backend is None:
            raise RuntimeError("httpx/httpcore changed: cannot apply the exchange deadline")
        pool._network_backend = _DeadlineBackend(backend, deadline)


@dataclass(frozen=True, slots=True)
class _PostTemplate:
    """A path's POST as httpcore's pool takes it, prepared once from the request httpx
    builds (`BrazeClient._template`): its URL (httpx's, to choose the transport, and
    httpcore's) and httpx's headers in httpx's order, `length_at` the Content-Length to
    fill in. The headers hold the key: never shown (`repr=False`)."""

    url: httpx.URL
    core_url: httpcore.URL
    headers: list[tuple[bytes, bytes]] = field(repr=False)
    length_at: int

    def request(self, content: bytes, extensions: dict[str, Any]) -> _Straight:
        """The httpcore request httpx's transport would make of the httpx request with
        `content` as its body."""
        headers = self.headers.copy()
        headers[self.length_at] = (headers[self.length_at][0], b"%d" % len(content))
        core = httpcore.Request(
            b"POST", self.core_url, headers=headers, content=content, extensions=extensions
        )
        return _Straight(self.url, core)


@dataclass(frozen=True, slots=True)
class _Straight:
    """A request for httpcore's pool (`core`) and the URL its transport is chosen by."""

    url: httpx.URL
    core: httpcore.Request = field(repr=False)

    @property
    def extensions(self) -> dict[str, Any]:
        return self.core.extensions


# What an exchange sends: httpx's request (a test's transport, the GETs) or one straight
# to httpcore's pool (the posts).
_Request = httpx.Request | _Straight


class _FenceRefused(Exception):
    """Raised inside httpcore's trace hook to stop a request before its first byte."""


# httpcore's trace events right before the request's first byte goes out (HTTP/1.1, 2).
FIRST_BYTE_EVENTS = ("http11.send_request_headers.started", "http2.send_request_headers.started")


class _Answer(NamedTuple):
    """An answer as an exchange reads it: its status, headers as `dict(response.headers)`
    gives them, the charset its content type names, its body up to MAX_ANSWER_BYTES."""

    status: int
    headers: dict[str, str]
    charset: str | None
    raw: bytes
    truncated: bool


def _capped(chunks: Iterable[bytes]) -> tuple[bytes, bool]:
    """The body up to MAX_ANSWER_BYTES, and whether there was more (not read further)."""
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return b"".join(parts)[:MAX_ANSWER_BYTES], True
    return b"".join(parts), False


def header_dict(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """`dict(httpx.Headers(raw))`: names lowercased, a repeated name's values joined with
    ", ", all decoded as ASCII, else UTF-8, else ISO-8859-1 (httpx's `Headers.encoding`),
    without building httpx's Headers (~10-20 us an answer; tests/unit/test_braze_answer_reading.py
    holds them equal)."""
    for encoding in ("ascii", "utf-8"):
        try:
            pairs = [(name.lower().decode(encoding), value.decode(encoding)) for name, value in raw]
            break
        except UnicodeDecodeError:
            continue
    else:
        pairs = [
            (name.lower().decode("iso-8859-1"), value.decode("iso-8859-1")) for name, value in raw
        ]
    headers: dict[str, str] = {}
    for name, value in pairs:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


@functools.lru_cache(maxsize=64)
def content_charset(content_type: str | None) -> str | None:
    """`httpx.Response.charset_encoding` for an answer whose Content-Type is
    `content_type`, parsed once a content type (httpx parses it with the email package on
    every call: ~4-14 us an answer)."""
    return None if content_type is None else _parse_content_type_charset(content_type)


class BrazeClient:
    """Keep-alive connections to one REST endpoint, one a thread. Thread-safe."""

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
        self.timeout_seconds = timeout_seconds  # one exchange, from start to last byte
        # Scrubbed out of every transport error (never stored elsewhere on the object).
        self._secrets = (api_key.get_secret_value(),)
        self._deadline = _Deadline()
        self._max_connections = max_connections
        self._transport = transport
        # One client (one connection pool) a thread: httpcore's pool looks at every
        # connection it holds twice a request (on the request's arrival and on its end),
        # asking each idle one whether its socket is readable (a poll() each) and, for each,
        # counting all of them again; a pool shared by a worker's 16 threads held ~11-16
        # connections in a drain, ~0.1-0.2 ms of CPU a post (issue 26). A thread posts one
        # request at a time, so its own pool holds at most one connection: the process
        # keeps one connection a posting thread (WORKER_CONCURRENCY), as the shared pool
        # of that size did. A test's own transport has no pool: one client shares it.
        self._local = threading.local()
        # One TLS context for all of them, made as httpx makes it (certifi's roots, or
        # SSL_CERT_FILE / SSL_CERT_DIR): loading the roots costs ~15 ms of CPU a context.
        self._tls = httpx.create_ssl_context()
        self._clients: list[httpx.Client] = []
        self._clients_lock = threading.Lock()
        self._http = self._new_client(
            {
                # The key goes only into this header; httpx never logs header values.
                "Authorization": f"Bearer {api_key.get_secret_value()}",
                "Content-Type": "application/json",
                "User-Agent": "braze-subs",
                # Braze's answers are small: uncompressed, the cap counts what is sent.
                "Accept-Encoding": "identity",
            }
        )
        self._local.http = self._http
        self._headers = self._http.headers  # the client's defaults and ours, merged once
        self._timeouts = self._http.timeout.as_dict()
        self._urls: dict[str, httpx.URL] = {}  # a path's URL on the endpoint, parsed once
        self._templates: dict[str, _PostTemplate] = {}  # a path's POST, prepared once

    def _new_client(self, headers: httpx.Headers | dict[str, str]) -> httpx.Client:
        """An httpx client to the endpoint with `headers`: a pool of one connection (its
        thread's), or of `max_connections` when a test's transport is shared by every
        thread."""
        connections = self._max_connections if self._transport is not None else 1
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        http = httpx.Client(
            base_url=self.endpoint,
            headers=headers,
            # Each phase at most the whole; the deadline cuts every one to what is left.
            timeout=self.timeout_seconds,
            limits=limits,
            # Redirects are never followed: the key would go wherever they point (httpx's
            # default; said here because it is a promise). A 3xx is a configuration error.
            follow_redirects=False,
            transport=self._transport,
            verify=self._tls,
        )
        if self._transport is None:  # a test's own transport has no sockets to bound
            _apply_deadline(http, self._deadline)
        # Requests go straight to the transport httpx chose for their URL (its pool, or a
        # proxy's from the environment): `Client.send` added per request an auth flow, the
        # redirect and cookie handling and the URL's merge and parse, none of which a post
        # uses (the key is a header, a redirect is refused, Braze's answers need no cookie):
        # ~0.3-0.5 ms of a worker's CPU a post of ~2.3 (issue 26). httpx offers no public way
        # to send without them; like `_apply_deadline`, a missing method fails at start
        # (tests/integration/test_answers.py), never silently.
        if getattr(http, "_transport_for_url", None) is None:
            raise RuntimeError("httpx changed: cannot send to the client's transports")
        with self._clients_lock:
            self._clients.append(http)
        return http

    def _client(self) -> httpx.Client:
        """This thread's client (made on its first exchange); the shared one for a test's
        transport."""
        if self._transport is not None:
            return self._http
        http: httpx.Client | None = getattr(self._local, "http", None)
        if http is None:
            # The first client's headers: the same key, no copy of it kept elsewhere.
            http = self._local.http = self._new_client(self._http.headers)
        return http

    def _transport_for(self, url: httpx.URL) -> httpx.BaseTransport:
        """The transport this thread's client chose for `url`."""
        return self._client()._transport_for_url(url)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"BrazeClient(endpoint={self.endpoint!r})"

    def post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        fence: Callable[[], bool] | None = None,
        since: float | None = None,
    ) -> Reply:
        """POST `body`. `fence`, when given, is asked right before the request's first byte
        is written (after the pool and the connection are ready, httpcore's trace hook);
        if it answers False, nothing is sent and the reply says `unsent`. `since`: the
        `time.monotonic()` the exchange's deadline counts from, when earlier than now (a
        request fenced by its claim, before this call: the deadline counts from before
        the fencing call was sent, so the whole exchange ends within the lease it found)."""
        template = self._templates.get(path)
        if template is None:
            template = self._templates[path] = self._template(path)
        if self._transport is not None:  # a test's transport: httpx's request, as it takes
            return self._exchange(
                self._fenced(lambda: self._post_request(path, body), fence), since=since
            )
        # Straight to httpcore's pool (issue 26, the eighth step): httpx's Request (its
        # headers copied and looked through, the body's stream) and its transport's
        # conversion of it into httpcore's cost ~30-40 us of a worker's CPU a post; the
        # same request is built from the template, the same bytes go out.
        return self._exchange(
            self._fenced(lambda: template.request(self._encoded(body), self._extensions()), fence),
            since=since,
        )

    @staticmethod
    def _encoded(body: dict[str, Any]) -> bytes:
        """`body` as `Client.build_request(json=body)` encodes it (httpx's compact JSON)."""
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return content.encode("utf-8")

    def _extensions(self) -> dict[str, Any]:
        """A request's extensions as httpx's client gives them: its timeouts."""
        return {"timeout": self._timeouts}

    def _post_request(self, path: str, body: dict[str, Any]) -> httpx.Request:
        """The POST `Client.build_request(json=body)` builds (the same bytes: httpx's
        compact JSON), from the URL and headers prepared once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self._http.build_request("POST", path).url
        return httpx.Request(
            "POST",
            url,
            headers=self._headers,
            content=self._encoded(body),
            extensions=self._extensions(),
        )

    def _template(self, path: str) -> _PostTemplate:
        """`path`'s POST prepared from the request httpx builds, as its transport converts
        it (HTTPTransport.handle_request)."""
        request = self._post_request(path, {})
        headers = list(request.headers.raw)
        names = [name.lower() for name, _ in headers]
        url = request.url
        return _PostTemplate(
            url=url,
            core_url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=headers,
            length_at=names.index(b"content-length"),
        )

    @staticmethod
    def _fenced(
        build: Callable[[], _Request], fence: Callable[[], bool] | None
    ) -> Callable[[], _Request]:
        """`build`, with `fence` asked right before the request's first byte."""
        if fence is None:
            return build

        def trace(event: str, _info: dict[str, Any]) -> None:
            if event in FIRST_BYTE_EVENTS and not fence():
                raise _FenceRefused

        def fenced() -> _Request:
            request = build()
            request.extensions["trace"] = trace
            return request

        return fenced

    def _read(self, request: _Request) -> _Answer:
        """Send `request` and read its answer's body up to MAX_ANSWER_BYTES; the rest is
        left unread (the connection is closed rather than drained)."""
        if isinstance(request, _Straight):
            return self._send_straight(request)
        response = self._transport_for(request.url).handle_request(request)
        response.request = request
        return self._read_response(response)

    @staticmethod
    def _read_response(response: httpx.Response) -> _Answer:
        """An httpx response read and closed."""
        try:
            # Decoded as it comes: a server that compresses although asked not to is still
            # read (a compressed chunk expands at most ~1000-fold before the cap stops it).
            raw, truncated = _capped(response.iter_bytes())
        finally:
            response.close()
        headers = dict(response.headers)
        return _Answer(response.status_code, headers, response.charset_encoding, raw, truncated)

    def _send_straight(self, request: _Straight) -> _Answer:
        """What httpx's HTTPTransport.handle_request and Response do with the httpcore
        request it makes: sent to the pool of the transport this thread's client chose for
        the URL (its own, or a proxy's), httpcore's errors raised as httpx's. An answer
        with a Content-Encoding is read through httpx's Response (its decoders); any other
        straight from httpcore's stream (httpx's identity decoding is the bytes as they
        come), its headers and charset as httpx's Response gives them."""
        transport = self._transport_for(request.url)
        pool: httpcore.ConnectionPool = transport._pool  # type: ignore[attr-defined]
        with map_httpcore_exceptions():
            answer = pool.handle_request(request.core)
        stream = ResponseStream(answer.stream)  # httpcore's errors raised as httpx's
        if any(name.lower() == b"content-encoding" for name, _ in answer.headers):
            return self._read_response(
                httpx.Response(
                    status_code=answer.status,
                    headers=answer.headers,
                    stream=stream,
                    extensions=answer.extensions,
                )
            )
        try:
            raw, truncated = _capped(stream)
        finally:
            stream.close()
        headers = header_dict(answer.headers)
        return _Answer(
            answer.status, headers, content_charset(headers.get("content-type")), raw, truncated
        )

    def _exchange(self, build: Callable[[], _Request], *, since: float | None = None) -> Reply:
        started = time.perf_counter()
        now = time.monotonic()
        self._deadline.at = (now if since is None else min(since, now)) + self.timeout_seconds
        try:
            answer = self._read(build())
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
        finally:
            self._deadline.at = None
        return Reply(
            status=answer.status,
            body=answer.raw.decode(answer.charset or "utf-8", errors="replace"),
            headers=answer.headers,
            latency_ms=(time.perf_counter() - started) * 1000,
            truncated=answer.truncated,
        )

    def get(
        self,
        path: str,
        params: list[tuple[str, str]],
        *,
        fence: Callable[[], bool] | None = None,
    ) -> Reply:
        """One GET (the read endpoints); `params` may repeat a name (`email=a&email=b`).
        `fence` as for `post`: an opt-out read asks whether its identifiers are still
        held (not erased meanwhile) right before the first byte."""
        return self._exchange(
            self._fenced(lambda: self._http.build_request("GET", path, params=params), fence)
        )

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for http in clients:
            http.close()
