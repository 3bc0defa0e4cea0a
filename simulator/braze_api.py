"""The Braze endpoints: v1/v2 `subscription/status/set` (here) and the two read endpoints
(`simulator.reads`).

A subscription post goes through: latency fault, auth (401), outage fault (503), the rate
limit (429; from here on the request counts in the window, as at Braze), error-rate fault
(500), the reject faults (400: `reject` naming the identifier, `reject_anonymous` naming
none, `reject_groups` naming the group), body validation (400), then the state change (201;
202 under the `queued` fault; `errors: [...]` listing `soft_errors` identifiers, which are
not applied). The answer is logged and counted, then held while the `hold` fault is on.
Every answer carries the X-RateLimit-* headers. The `answer` fault puts something else in
Braze's place (an HTML page, a redirect, nested JSON, a huge body, a trickle: `answers`).

The workspace that serves a request is the one its key selects (`SimulatorWorkspaces`); its
faults, budget and state are that workspace's alone.

The two posts are served by `BrazePosts`, an ASGI middleware in front of Starlette's
routing, as the same handler would through a `Route` (which still serves them where the
middleware is absent); every other request passes through to the routes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from simulator.auth import bearer_key
from simulator.faults import Faults
from simulator.hold import HoldGate
from simulator.model import Endpoint, Kind, ValidatedRequest
from simulator.ratelimit import WindowStatus
from simulator.reads import ReadApi
from simulator.state import Outcome, RequestRecord, SimulatorState
from simulator.validation import collect_groups, collect_identifiers, validate
from simulator.workspaces import SimulatorWorkspaces

_NOT_JSON = object()

# The `reject_anonymous` answer: Braze refuses the batch without saying which identifier.
ANONYMOUS_REJECTION = "Bad request: the request could not be processed"


# The `answer` faults whose answer is not Braze's (nothing applied); `trickle` is Braze's.
NOT_BRAZE_ANSWERS = ("html", "redirect", "nested", "huge")
PORTAL_PAGE = (
    "<!DOCTYPE html><html><head><title>Sign in to the network</title></head>"
    "<body><h1>Welcome</h1><p>Accept the terms to continue.</p></body></html>"
)
# A plausible count left beside an absurd limit and reset: what a reader acts on.
ABSURD_RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit": "9" * 400,
    "X-RateLimit-Remaining": "3",
    "X-RateLimit-Reset": "1e308",
}


async def _zeros(size: int, chunk: int = 64 * 1024) -> Any:
    """`size` bytes of "0", a chunk at a time (never held whole)."""
    block = b"0" * chunk
    sent = 0
    while sent < size:
        part = block[: min(chunk, size - sent)]
        sent += len(part)
        yield part


def _trickled(response: Response, interval: float) -> Response:
    """`response` with its body sent one byte every `interval` seconds."""

    async def bytes_slowly() -> Any:
        for byte in bytes(response.body):
            await asyncio.sleep(interval)
            yield bytes([byte])

    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return StreamingResponse(bytes_slowly(), response.status_code, headers=headers)


def _parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


class BrazeApi:
    """Request handlers bound to the simulator's workspaces (each with its hold gate)."""

    def __init__(self, workspaces: SimulatorWorkspaces, gates: dict[str, HoldGate]) -> None:
        self._workspaces = workspaces
        self._gates = gates

    def routes(self) -> list[Route]:
        return [
            Route("/subscription/status/set", self.post_v1, methods=["POST"]),
            Route("/v2/subscription/status/set", self.post_v2, methods=["POST"]),
            *ReadApi(self._workspaces).routes(),
        ]

    async def post_v1(self, request: Request) -> Response:
        return await self.post(request.headers.get("authorization"), request.body, "v1")

    async def post_v2(self, request: Request) -> Response:
        return await self.post(request.headers.get("authorization"), request.body, "v2")

    async def post(
        self,
        authorization: str | None,
        body: Callable[[], Awaitable[bytes]],
        endpoint: Endpoint,
    ) -> Response:
        """The answer to a subscription post sending `authorization`, its body read by
        `body()` (after the latency fault's wait, as Braze reads it)."""
        name = self._workspaces.name_for_key(bearer_key(authorization))
        state = self._workspaces.get(name)
        latency_ms = state.faults().latency_ms
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)
        raw = await body()
        faults = state.faults()
        if faults.answer in NOT_BRAZE_ANSWERS:
            response = self._not_braze(state, endpoint, raw, faults)
        else:
            response = self._answer(state, endpoint, raw, authorization)
            if faults.answer == "trickle":
                response = _trickled(response, faults.trickle_ms / 1000)
        if faults.absurd_rate_limit_headers:
            response.headers.update(ABSURD_RATE_LIMIT_HEADERS)
        await self._gates[name].wait()
        return response

    def _not_braze(
        self, state: SimulatorState, endpoint: Endpoint, raw: bytes, faults: Faults
    ) -> Response:
        """An answer from something in Braze's place; nothing is applied."""
        identifiers, entries = collect_identifiers(endpoint, _parse_json(raw))
        status = {"html": 200, "redirect": 301, "nested": 201, "huge": 500}[str(faults.answer)]
        record = RequestRecord(state.now(), endpoint, len(set(identifiers)), entries, status)
        outcome = Outcome.SERVER_ERROR if faults.answer == "huge" else Outcome.NOT_BRAZE
        state.finish(record, outcome)
        if faults.answer == "html":
            return Response(PORTAL_PAGE, 200, media_type="text/html; charset=utf-8")
        if faults.answer == "redirect":
            headers = {"Location": "https://elsewhere.invalid/subscription/status/set"}
            return Response(b"Moved Permanently", 301, headers=headers, media_type="text/plain")
        if faults.answer == "nested":
            depth = faults.nested_depth
            body = '{"message":"success","errors":' + "[" * depth + "]" * depth + "}"
            return Response(body, 201, media_type="application/json")
        return StreamingResponse(_zeros(faults.huge_bytes), 500, media_type="text/plain")

    def _answer(
        self, state: SimulatorState, endpoint: Endpoint, raw: bytes, authorization: str | None
    ) -> Response:
        now = state.now()
        body = _parse_json(raw)
        lenient: list[tuple[list[tuple[Kind, str]], int]] = []

        def collected() -> tuple[list[tuple[Kind, str]], int]:
            """The body's identifiers and entries, read leniently (once, and only when
            needed: a body that passed validation has its counts)."""
            if not lenient:
                lenient.append(collect_identifiers(endpoint, body))
            return lenient[0]

        def reply(
            status: int,
            message: str,
            outcome: Outcome,
            window: WindowStatus,
            validated: ValidatedRequest | None = None,
            skipped: dict[tuple[Kind, str], None] | None = None,
        ) -> Response:
            if validated is not None:  # the same counts as the lenient read's
                distinct, entries = validated.identifiers, validated.entries
            else:
                identifiers, entries = collected()
                distinct = len(set(identifiers))
            record = RequestRecord(now, endpoint, distinct, entries, status)
            state.finish(record, outcome, validated, skipped=frozenset(skipped or ()))
            if not skipped and message in _PLAIN_ANSWERS:
                body = _PLAIN_ANSWERS[message]
                return Response(body, status, window.headers(), media_type="application/json")
            content: dict[str, Any] = {"message": message}
            if skipped:
                content["errors"] = [f"Invalid {kind}: {value}" for kind, value in skipped]
            return JSONResponse(content, status, headers=window.headers())

        if not state.authorize(bearer_key(authorization)):
            message = "Invalid API key: missing or not recognised"
            return reply(401, message, Outcome.UNAUTHORIZED, state.peek_window(now))
        if state.faults().outage:
            message = "Service unavailable (simulated outage)"
            return reply(503, message, Outcome.SERVER_ERROR, state.peek_window(now))
        window = state.consume(now)
        if not window.allowed:
            return reply(429, "Rate limit exceeded", Outcome.RATE_LIMITED, window)
        if state.roll_server_error():
            message = "Internal server error (simulated)"
            return reply(500, message, Outcome.SERVER_ERROR, window)
        faults = state.faults()
        if faults.reject or faults.reject_anonymous:
            identifiers = collected()[0]
            rejected = state.rejected_identifier(identifiers)
            if rejected is not None:
                kind, value = rejected
                return reply(400, f"Invalid {kind}: {value}", Outcome.REJECTED, window)
            if state.rejected_anonymously(identifiers):
                return reply(400, ANONYMOUS_REJECTION, Outcome.REJECTED, window)
        group = state.rejected_group(collect_groups(endpoint, body))
        if group is not None:
            message = f"Unknown subscription_group_id: {group}"
            return reply(400, message, Outcome.REJECTED, window)
        if body is _NOT_JSON:
            return reply(400, "Request body must be valid JSON", Outcome.MALFORMED, window)
        result = validate(endpoint, body, state.validation_rules())
        if isinstance(result, str):
            return reply(400, result, Outcome.MALFORMED, window)
        faults = state.faults()
        soft = faults.soft_errors
        skipped = dict.fromkeys(
            (update_list.kind, value)
            for update_list in (result.lists if soft else ())
            for value in update_list.values
            if value in soft
        )
        if faults.queued:
            return reply(202, "queued", Outcome.OK, window, result, skipped)
        return reply(201, "success", Outcome.OK, window, result, skipped)


# The answers without `errors`, rendered once as JSONResponse renders them.
_PLAIN_ANSWERS = {
    message: JSONResponse({"message": message}).body for message in ("success", "queued")
}


# The posts `BrazePosts` serves itself: path -> endpoint.
POSTS: dict[str, Endpoint] = {"/subscription/status/set": "v1", "/v2/subscription/status/set": "v2"}


def _authorization(scope: Scope) -> str | None:
    """The first Authorization header, as Starlette's `request.headers.get` reads it (ASGI
    header names are lower-case)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


class BrazePosts:
    """ASGI middleware serving the two subscription posts itself, the rest passed on.

    A post is most of what the simulator serves under load (bench.ceiling): Starlette's
    exception middleware, router, route and `Request` cost ~40 us of its ~300 us of CPU
    (issue 26). What it answers is the same `BrazeApi.post` answer a route gives; a post
    to another path (a trailing slash, a root path) or with another method goes to the
    routes as before. Starlette's server-error middleware stays in front of it.
    """

    def __init__(self, app: ASGIApp, api: BrazeApi) -> None:
        self._app = app
        self._api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = None
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            endpoint = POSTS.get(scope["path"])
        if endpoint is None:
            await self._app(scope, receive, send)
            return

        async def body() -> bytes:
            """The request's body, as Starlette's `Request.body` reads it."""
            chunks: list[bytes] = []
            while True:
                message = await receive()
                if message["type"] == "http.request":
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        return b"".join(chunks)
                elif message["type"] == "http.disconnect":
                    raise ClientDisconnect()

        response = await self._api.post(_authorization(scope), body, endpoint)
        await response(scope, receive, send)
