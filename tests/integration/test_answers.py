"""Answers that are not Braze's, slow and huge answers, and bookkeeping that fails after
an answer (issue 21 items 2, 4 and 5): the Braze client and the poster against the
simulator's `answer` faults over real HTTP, batch records in real Redis."""

from __future__ import annotations

import gzip
import json
import logging
import re
import shutil
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from admin.status import read_status
from admin.status_view import warnings
from config.settings import Settings, load_settings
from core.outcome import MAX_ANSWER_BYTES, redirected
from delivery.braze_client import V1_PATH, BrazeClient, Reply
from delivery.poster import Poster
from delivery.services import services
from devtools.certs import make_ca, make_server
from stores.dead_letters import DeadLetters
from tests.conftest import SIM_KEY, come_due, email
from tests.integration.test_poster import GROUP, email_batch, inflight, record
from tests.sim_control import faults, sim_stats, sim_subscriptions


def client(url: str, timeout: float = 10.0) -> BrazeClient:
    from pydantic import SecretStr

    return BrazeClient(url, SecretStr(SIM_KEY), timeout_seconds=timeout, max_connections=2)


BODY = {"subscription_group_id": GROUP, "subscription_state": "subscribed", "email": ["a@b.co"]}


@pytest.fixture
def limited_poster(env) -> Iterator[Poster]:
    """MAX_ATTEMPTS 2: the setting under test (dead-lettered after it)."""
    settings: Settings = load_settings(max_attempts=2)
    assert settings.rest_endpoint is not None and settings.braze_api_key is not None
    braze = BrazeClient(
        settings.rest_endpoint, settings.braze_api_key, timeout_seconds=10, max_connections=2
    )
    yield services().poster(braze, settings)
    braze.close()


# --- item 2: only Braze's JSON is a delivery -------------------------------------------------


def test_an_html_200_is_retried_and_dead_lettered_never_delivered(
    sim, limited_poster, redis_client
):
    values = [email(1), email(2)]
    batch_id = email_batch(values)
    faults(sim, answer="html")

    first = limited_poster.post(batch_id)
    assert (first.status, first.http_status, first.attempt) == ("retry", 200, 1)
    assert "unexpected answer" in first.detail and "text/html" in first.detail
    kept = record(redis_client, batch_id)
    assert kept is not None and kept["attempts"] == 1  # the attempt is counted
    assert len(inflight(redis_client)) == 2  # still locked: nothing newer overtakes it

    come_due(batch_id)
    second = limited_poster.post(batch_id)
    assert (second.status, second.attempt) == ("dead_lettered", 2)
    [entry] = DeadLetters(redis_client, services().keys).list()
    assert "HTTP 200: unexpected answer" in entry.error
    assert "text/html" in entry.error and "<!DOCTYPE html>" in entry.error
    assert sorted(i["value"] for i in entry.identifiers) == values
    assert sim_subscriptions(sim) == {}
    assert sim_stats(sim)["not_braze"] == 2


def test_a_redirect_is_never_followed_and_stops_posting_said_once(
    sim, poster_pair, redis_client, caplog
):
    first_id, second_id = email_batch([email(1)]), email_batch([email(2)], "unsubscribed")
    faults(sim, answer="redirect")
    found = services()
    with caplog.at_level(logging.ERROR, logger="braze_subs.poster"):
        one = poster_pair[0].post(first_id)
        two = poster_pair[1].post(second_id)
    assert one.status == "retry" and one.http_status == 301
    assert "redirect to https://elsewhere.invalid/" in one.detail and "not followed" in one.detail
    # The circuit is open for every worker: the second batch was not sent at all.
    assert two.status == "waiting" and two.http_status is None
    assert found.limiter.state().circuit is not None
    assert "301" in str(found.limiter.state().circuit)
    for batch_id in (first_id, second_id):
        assert record(redis_client, batch_id)["attempts"] == 0  # nothing spent
        assert redis_client.hget(found.keys.schedule_reasons, batch_id) == b"credentials"
    # `status` tells a configuration error, not a refused key.
    shown = read_status(found.redis, found.keys, found.limiter)
    assert shown.credentials_refused and redirected(shown.credentials_refused)
    assert "redirects" in sections_text(shown)
    loud = [r for r in caplog.records if "configuration error" in r.getMessage()]
    assert len(loud) == 1
    assert "BRAZE_REST_ENDPOINT" in loud[0].getMessage()
    assert SIM_KEY not in caplog.text
    stats = sim_stats(sim, log=True)
    assert [r["status"] for r in stats["requests"]] == [301]  # one request, nothing followed


def sections_text(status: Any) -> str:
    return " ".join(warnings(status))


@pytest.fixture
def poster(env) -> Poster:
    return services().poster()


@pytest.fixture
def poster_pair(env) -> list[Poster]:
    found = services()
    return [found.poster(), found.poster()]


# --- item 4: the outcome first, then bookkeeping ---------------------------------------------


def test_a_deeply_nested_2xx_is_an_unexpected_answer_with_its_attempt_counted(
    sim, poster, redis_client
):
    batch_id = email_batch([email(3)])
    faults(sim, answer="nested")
    report = poster.post(batch_id)  # raised RecursionError before: given back uncounted
    assert (report.status, report.http_status, report.attempt) == ("retry", 201, 1)
    assert record(redis_client, batch_id)["attempts"] == 1


def test_absurd_rate_limit_headers_on_a_201_do_not_re_post(sim, poster, redis_client):
    batch_id = email_batch([email(4)])
    faults(sim, absurd_rate_limit_headers=True)
    report = poster.post(batch_id)  # OverflowError before, after the 201: posted again
    assert report.status == "delivered"
    assert record(redis_client, batch_id) is None
    assert poster.post(batch_id).status == "gone"
    assert sim_stats(sim)["requests_total"] == 1


def test_absurd_rate_limit_headers_on_a_429_pause_at_most_a_window(sim, poster, redis_client):
    batch_id = email_batch([email(5)])
    faults(sim, absurd_rate_limit_headers=True, spend=10_000)
    report = poster.post(batch_id)
    assert report.status == "retry" and report.http_status == 429
    window = services().settings.braze_rate_limit_window_seconds
    assert 0 < services().limiter.paused_for() <= window + 1
    assert record(redis_client, batch_id)["attempts"] == 0


def test_failing_bookkeeping_after_a_201_cannot_re_post(sim, redis_client, caplog):
    """A Redis error while counting the request, after Braze accepted it: the batch has
    ended already; the failure is logged and the batch is not posted again. (The count of a
    delivery rides on its finish, after the outcome (issue 26): here it fails there, on a
    totals key of another type.)"""
    found = services()
    batch_id = email_batch([email(6)])
    poster = found.poster()
    redis_client.set(found.keys.request_totals, "not a hash")
    with caplog.at_level(logging.ERROR, logger="braze_subs.poster"):
        report = poster.post(batch_id)
    assert report.status == "delivered"
    assert record(redis_client, batch_id) is None and inflight(redis_client) == {}
    assert "count the request failed" in caplog.text
    assert poster.post(batch_id).status == "gone"
    assert sim_stats(sim)["requests_total"] == 1


def test_an_error_after_sending_gives_back_with_the_attempt_counted(sim, redis_client, monkeypatch):
    """The answer arrived but this process failed before recording its outcome: unknown,
    so a retry, and it counts, so that it cannot go on for ever."""
    found = services()
    batch_id = email_batch([email(7)])

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("boom while reading the answer")

    monkeypatch.setattr(Reply, "classified", broken)
    with pytest.raises(RuntimeError):
        found.poster().post(batch_id)
    assert redis_client.hget(found.keys.schedule_reasons, batch_id) == b"retry"
    assert record(redis_client, batch_id)["attempts"] == 1
    assert sim_stats(sim)["requests_total"] == 1


# --- item 5: one deadline per exchange; bodies read up to a cap ------------------------------


@pytest.mark.alone  # the deadline's overshoot is timed
def test_a_trickled_answer_ends_at_the_overall_deadline(sim):
    """HTTP_TIMEOUT_SECONDS is the setting under test: 1 s. The simulator sends Braze's
    answer a byte every 0.2 s (about 4 s in all); httpx's per-phase timeout never fires."""
    faults(sim, answer="trickle", trickle_ms=200)
    braze = client(sim.url, timeout=1.0)
    try:
        started = time.monotonic()
        reply = braze.post(V1_PATH, BODY)
        took = time.monotonic() - started
    finally:
        braze.close()
    assert reply.status is None and reply.error is not None
    assert "Timeout" in reply.error
    assert took < 1.9, f"the exchange took {took:.2f} s with a 1 s deadline"


def read_request(connection: socket.socket) -> bytes:
    """Read one HTTP request, headers and its Content-Length body (returned as read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@contextmanager
def serving(
    listener: socket.socket, stop: threading.Event, serve: Callable[[], None]
) -> Iterator[str]:
    """`serve` run in a thread on `listener`; yields the listener's URL, then sets `stop`,
    closes the listener (which wakes an accept) and waits for the thread."""
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        thread.join(5)


@contextmanager
def trickling_server(
    answer: bytes, interval: float, requests: list[bytes] | None = None
) -> Iterator[str]:
    """A bare HTTP server that reads a request (appended to `requests`), then sends `answer`
    (status line and headers included) one byte every `interval` seconds: no body phase to
    time out in."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            # Whole: closing on unread bytes would reset it.
            request = read_request(connection)
            if requests is not None:
                requests.append(request)
            for byte in answer:
                if stop.wait(interval):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    with serving(listener, stop, serve) as url:
        yield url


@pytest.mark.alone  # the deadline's overshoot is timed
def test_trickled_headers_end_at_the_overall_deadline():
    """Headers a byte at a time: httpx's read timeout restarts with every byte; the
    exchange's deadline (HTTP_TIMEOUT_SECONDS, 1 s here: the setting under test) does not."""
    answer = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n" + b"X-Pad: " + b"x" * 200
    with trickling_server(answer, 0.05) as url:
        braze = client(url, timeout=1.0)
        try:
            started = time.monotonic()
            reply = braze.post(V1_PATH, BODY)
            took = time.monotonic() - started
        finally:
            braze.close()
    assert reply.status is None and "Timeout" in (reply.error or "")
    assert took < 1.9, f"the exchange took {took:.2f} s with a 1 s deadline"


def test_a_compressed_answer_is_still_brazes():
    """Asked for no compression, a server (or a proxy) may compress anyway: the answer is
    decoded before it is read as Braze's JSON."""
    body = gzip.compress(b'{"message":"success"}')
    answer = (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with trickling_server(answer, 0.0) as url:
        braze = client(url)
        try:
            reply = braze.post(V1_PATH, BODY)
        finally:
            braze.close()
    assert (reply.status, reply.body, reply.truncated) == (201, '{"message":"success"}', False)


def test_a_proxy_from_the_environment_carries_the_posts(monkeypatch):
    """HTTP_PROXY in the environment: a post goes through the proxy (the transport httpx
    mounted for it), with the key's header and httpx's JSON bytes, as through
    `httpx.Client.send` before the client sent to its transports itself (issue 26)."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    received: list[bytes] = []
    answer = (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 21\r\n"
        b'Connection: close\r\n\r\n{"message":"success"}'
    )
    with trickling_server(answer, 0.0, received) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.setenv("http_proxy", proxy)
        braze = client("http://braze.invalid")
        try:
            reply = braze.post(V1_PATH, BODY)
        finally:
            braze.close()
    assert (reply.status, reply.body) == (201, '{"message":"success"}')
    [request] = received
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST http://braze.invalid/subscription/status/set HTTP/1.1\r\n")
    assert f"Authorization: Bearer {SIM_KEY}".encode() in head
    assert b"Content-Type: application/json" in head
    assert body == json.dumps(BODY, separators=(",", ":")).encode()


def test_the_deadline_wraps_the_transports_httpx_made():
    """The deadline rests on httpx's pool keeping `_network_backend` (httpx takes no backend
    argument): an upgrade that moves it fails here and at the client's start."""
    braze = client("http://127.0.0.1:9", timeout=1.0)
    try:
        pool = braze._http._transport._pool
        assert type(pool._network_backend).__name__ == "_DeadlineBackend"
        # ...and the client sends to the transport httpx chose for the URL (its own method).
        assert braze._transport_for(httpx.URL("http://127.0.0.1:9/")) is braze._http._transport
    finally:
        braze.close()


def test_a_huge_body_is_read_only_up_to_the_cap(sim):
    faults(sim, answer="huge", huge_bytes=30 * 1024 * 1024)
    braze = client(sim.url)
    try:
        tracemalloc.start()
        reply = braze.post(V1_PATH, BODY)
        _now, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        braze.close()
    assert reply.status == 500 and reply.truncated
    assert len(reply.body) == MAX_ANSWER_BYTES
    assert peak < 8 * MAX_ANSWER_BYTES, f"peak {peak} bytes while reading"


# --- the client's own send (issue 26 review): what Client.send did that a post still needs ---

SUCCESS = (
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 21\r\n\r\n"
    b'{"message":"success"}'
)


@contextmanager
def keep_alive_server(
    requests: list[bytes],
    connections: list[int],
    tls: ssl.SSLContext | None = None,
    closed: list[int] | None = None,
) -> Iterator[str]:
    """A bare HTTP/1.1 server that answers SUCCESS to every request on a connection until
    the client closes it; each request is appended to `requests`, each accepted connection
    counted in `connections` (and, once the client closed it, in `closed`). With `tls`, it
    speaks https (its URL still says http)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # accept() wakes to see `stop`: closing does not wake it
    stop = threading.Event()

    def serve_one(connection: socket.socket) -> None:
        connection.settimeout(None)
        if tls is not None:
            try:
                connection = tls.wrap_socket(connection, server_side=True)
            except OSError:  # the client refused the certificate
                connection.close()
                return
        with connection:
            while request := read_request(connection):
                requests.append(request)
                connection.sendall(SUCCESS)
        if closed is not None:
            closed.append(1)

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connections.append(1)
            threading.Thread(target=serve_one, args=(connection,), daemon=True).start()

    with serving(listener, stop, accept) as url:
        yield url


def test_posts_reuse_one_kept_alive_connection():
    """Every answer is read and its response closed, so the connection goes back to the
    pool and the next post reuses it (HTTP/1.1 keep-alive): three posts, one connection,
    each with its Host header."""
    requests: list[bytes] = []
    connections: list[int] = []
    with keep_alive_server(requests, connections) as url:
        braze = client(url)
        try:
            replies = [braze.post(V1_PATH, BODY) for _ in range(3)]
        finally:
            braze.close()
    assert [(r.status, r.body) for r in replies] == [(201, '{"message":"success"}')] * 3
    assert len(requests) == 3 and len(connections) == 1, f"{len(connections)} connections"
    host = url.removeprefix("http://").encode()
    assert all(f"Host: {host.decode()}\r\n".encode() in request for request in requests)
    assert all(r.startswith(b"POST /subscription/status/set HTTP/1.1\r\n") for r in requests)


def test_a_post_sent_straight_to_httpcore_is_the_request_httpx_sends():
    """A post goes straight to httpcore's pool from a template made once a path (issue 26,
    the eighth step): on the wire it is byte for byte the request httpx's own client sends
    for `post(path, json=body)` (its request line, headers in their order, the body and its
    length in bytes: a text beyond ASCII, and bodies of two lengths on one connection)."""
    bodies = [
        BODY,
        {**BODY, "email": ["zoë@exämple.co", "a" * 40 + "@b.co"], "use_double_opt_in_logic": True},
    ]
    requests: list[bytes] = []
    with keep_alive_server(requests, []) as url:
        braze = client(url)
        try:
            for body in bodies:
                reply = braze.post(V1_PATH, body, fence=lambda: True)
                assert (reply.status, reply.body) == (201, '{"message":"success"}')
            for body in bodies:  # the thread's httpx client, the whole of Client.send
                braze._client().post(V1_PATH, json=body).read()
        finally:
            braze.close()
    straight, by_httpx = requests[: len(bodies)], requests[len(bodies) :]
    assert len(straight) == len(bodies) and straight == by_httpx
    assert (
        b"Content-Length: %d\r\n"
        % len(json.dumps(bodies[1], ensure_ascii=False, separators=(",", ":")).encode())
        in straight[1]
    )


def test_each_posting_thread_keeps_one_connection_of_its_own():
    """One connection pool a thread (issue 26: httpcore's pool looks at every connection it
    holds twice a request, a poll() for each idle one): four threads posting at once, three
    posts each, open four connections, one a thread, each kept alive for its thread's next
    posts, and a thread's pool holds its own only; `close` closes every thread's."""
    requests: list[bytes] = []
    connections: list[int] = []
    closed: list[int] = []
    threads = 4
    start = threading.Barrier(threads)
    replies: list[int | None] = []
    pooled: list[int] = []

    def post_three() -> None:
        start.wait(timeout=10)
        replies.extend(braze.post(V1_PATH, BODY).status for _ in range(3))
        pooled.append(len(braze._client()._transport._pool.connections))

    with keep_alive_server(requests, connections, closed=closed) as url:
        braze = client(url)
        try:
            posting = [threading.Thread(target=post_three) for _ in range(threads)]
            for thread in posting:
                thread.start()
            for thread in posting:
                thread.join(timeout=30)
        finally:
            braze.close()
        deadline = time.monotonic() + 10
        while len(closed) < len(connections) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert replies == [201] * 3 * threads
    assert len(requests) == 3 * threads
    assert len(connections) == threads, f"{len(connections)} connections for {threads} threads"
    assert pooled == [1] * threads
    assert len(closed) == threads, f"{len(closed)} of {threads} connections closed"


def test_no_proxy_sends_the_posts_straight_to_braze(monkeypatch):
    """HTTP_PROXY and NO_PROXY naming Braze's host: the posts go straight to Braze, never to
    the proxy (the transport httpx chose for the URL honours NO_PROXY, as Client.send did)."""
    for name in ("ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxied: list[bytes] = []
    direct: list[bytes] = []
    with keep_alive_server(proxied, []) as proxy, keep_alive_server(direct, []) as url:
        for name in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, proxy)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.setenv(name, "127.0.0.1")
        braze = client(url)
        try:
            reply = braze.post(V1_PATH, BODY)
        finally:
            braze.close()
    assert (reply.status, reply.body) == (201, '{"message":"success"}')
    assert proxied == [] and len(direct) == 1
    assert direct[0].startswith(b"POST /subscription/status/set HTTP/1.1\r\n")


@pytest.mark.alone  # the deadline's overshoot is timed
def test_the_deadline_holds_through_a_proxy_from_the_environment(monkeypatch):
    """A proxy from the environment that trickles the answer's headers: the exchange still
    ends at its overall deadline (the proxy's transport is wrapped too, and the post goes
    to it). HTTP_TIMEOUT_SECONDS 1 s here: the setting under test."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    answer = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n" + b"X-Pad: " + b"x" * 200
    received: list[bytes] = []
    with trickling_server(answer, 0.05, received) as proxy:
        for name in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, proxy)
        braze = client("http://braze.invalid", timeout=1.0)
        try:
            started = time.monotonic()
            reply = braze.post(V1_PATH, BODY)
            took = time.monotonic() - started
        finally:
            braze.close()
    assert len(received) == 1, "the post did not go to the proxy"
    assert reply.status is None and "Timeout" in (reply.error or "")
    assert took < 1.9, f"the exchange took {took:.2f} s with a 1 s deadline"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_brazes_certificate_is_verified_against_the_ca_the_environment_names(tmp_path, monkeypatch):
    """https: the server's certificate is verified, so a post to a server whose CA is not
    trusted fails before one byte of it (or the key) is sent; SSL_CERT_FILE names a CA to
    trust (a corporate TLS proxy's), read by the transport the posts go to."""
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                 "all_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    ca = make_ca(tmp_path, "ca")
    files = make_server(tmp_path, ca)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(files.certificate, files.key)
    requests: list[bytes] = []
    with keep_alive_server(requests, [], tls) as url:
        url = url.replace("http://", "https://")
        untrusted = client(url)
        try:
            refused = untrusted.post(V1_PATH, BODY)
        finally:
            untrusted.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        trusted = client(url)
        try:
            accepted = trusted.post(V1_PATH, BODY)
        finally:
            trusted.close()
    assert refused.status is None and "CERTIFICATE_VERIFY_FAILED" in (refused.error or "")
    assert SIM_KEY not in (refused.error or "")
    assert (accepted.status, accepted.body) == (201, '{"message":"success"}')
    assert len(requests) == 1  # the trusted post's only
