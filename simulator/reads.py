"""The read endpoints: `GET /subscription/status/get` and `GET /subscription/user/status`.

A read goes through: latency fault, auth (401), outage fault (503), the READ budget (429;
from here on the call counts in the read window), the checks of its query (400), then the
answer (200). Every answer carries the X-RateLimit-* headers of the read budget, which is
separate from the subscription posts' budget (Braze: 250,000 per hour, its general limit).
The write-only faults (`error_rate`, `reject*` but `reject_groups`, `soft_errors`, `queued`,
`hold`) do not touch reads.

Identifiers come as repeated query parameters, with or without brackets (the seed page
repeats `external_id=`, Braze's current pages use `external_id[]=`); `email_address` is
accepted for `email` (the seed's table names it). Given external ids, the email or phone
parameters are ignored, as Braze documents; email and phone together are refused.

`/subscription/user/status` pages the users that match (`limit` 1..100, default 100;
`offset` default 0) and reports `total_count`. The simulator keeps no profiles: each
identifier is its own user, listed with the groups that hold a state for it (a user with no
state in any group is not found).

As for the posts, the request's key selects the workspace whose budget, faults and states
answer it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from simulator.auth import bearer_key
from simulator.model import Kind, ReadEndpoint
from simulator.state import ReadRecord, SimulatorState
from simulator.validation import BOTH_EMAIL_AND_PHONE
from simulator.workspaces import SimulatorWorkspaces

QUERY_NAMES: dict[Kind, tuple[str, ...]] = {
    "external_id": ("external_id", "external_id[]"),
    "email": ("email", "email[]", "email_address", "email_address[]"),
    "phone": ("phone", "phone[]"),
}
USER_STATUS_MAX_IDENTIFIERS = 50
USER_STATUS_MAX_LIMIT = 100
# The older answer form of `/subscription/status/get` (seed 003): 0 subscribed,
# 1 unsubscribed, null unknown.
LEGACY_VALUES: dict[str, int | None] = {"subscribed": 0, "unsubscribed": 1, "unknown": None}


class Refused(Exception):
    """A read Braze would answer with 400; the message is its `{"message": ...}`."""


def query_identifiers(getlist: Callable[[str], list[str]], cap: int) -> tuple[Kind, list[str]]:
    """The identifier kind and values of a read's query (external ids win), at most `cap`."""
    found: dict[Kind, list[str]] = {
        kind: [value for name in names for value in getlist(name)]
        for kind, names in QUERY_NAMES.items()
    }
    kind: Kind
    if found["external_id"]:
        kind = "external_id"
    elif found["email"] and found["phone"]:
        raise Refused(BOTH_EMAIL_AND_PHONE)
    elif found["email"]:
        kind = "email"
    elif found["phone"]:
        kind = "phone"
    else:
        raise Refused("One of external_id, email or phone is required")
    values = found[kind]
    if not all(values):
        raise Refused(f"{kind} must not be empty")
    if len(values) > cap:
        raise Refused(
            f"Too many identifiers: {len(values)} {kind} values given, at most {cap} are allowed"
        )
    return kind, values


def _int_param(raw: str | None, name: str, default: int, low: int, high: int | None) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Refused(f"{name} must be an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise Refused(f"{name} must be {bound}")
    return value


class ReadApi:
    """Handlers of the two read endpoints bound to the simulator's workspaces."""

    def __init__(self, workspaces: SimulatorWorkspaces) -> None:
        self._workspaces = workspaces

    def routes(self) -> list[Route]:
        return [
            Route("/subscription/status/get", self.status_get, methods=["GET"]),
            Route("/subscription/user/status", self.user_status, methods=["GET"]),
        ]

    async def status_get(self, request: Request) -> Response:
        return await self._serve(request, "status_get", self._status_get)

    async def user_status(self, request: Request) -> Response:
        return await self._serve(request, "user_status", self._user_status)

    async def _serve(
        self,
        request: Request,
        endpoint: ReadEndpoint,
        answer: Callable[[SimulatorState, Request, list[int]], dict[str, Any]],
    ) -> Response:
        authorization = request.headers.get("authorization")
        state = self._workspaces.for_key(bearer_key(authorization))
        latency_ms = state.faults().latency_ms
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000)
        now = state.now()
        asked = [0]  # how many identifiers the query named, set by `answer`

        def reply(status: int, content: dict[str, Any], headers: dict[str, str]) -> Response:
            state.finish_read(ReadRecord(now, endpoint, asked[0], status))
            return JSONResponse(content, status, headers=headers)

        if not state.authorize(bearer_key(authorization)):
            message = "Invalid API key: missing or not recognised"
            return reply(401, {"message": message}, state.peek_read_window(now).headers())
        if state.faults().outage:
            message = "Service unavailable (simulated outage)"
            return reply(503, {"message": message}, state.peek_read_window(now).headers())
        window = state.consume_read(now)
        if not window.allowed:
            return reply(429, {"message": "Rate limit exceeded"}, window.headers())
        try:
            content = answer(state, request, asked)
        except Refused as refused:
            return reply(400, {"message": str(refused)}, window.headers())
        return reply(200, content, window.headers())

    def _status_get(
        self, state: SimulatorState, request: Request, asked: list[int]
    ) -> dict[str, Any]:
        params = request.query_params
        group = params.get("subscription_group_id")
        if not group:
            raise Refused("Missing subscription_group_id")
        kind, values = query_identifiers(params.getlist, state.config.read_max_identifiers)
        asked[0] = len(values)
        channel = state.group_channel(group)
        if state.rejected_group([group]) or (channel is None and not state.config.auto_groups):
            raise Refused(f"Unknown subscription_group_id: {group}")
        if channel == "sms" and kind == "email":
            raise Refused(f"Subscription group {group} is an SMS group: emails are not accepted")
        if channel == "email" and kind == "phone":
            raise Refused(f"Subscription group {group} is an email group: phones are not accepted")
        status: dict[str, Any] = state.lookup(group, [(kind, value) for value in values])
        if state.faults().legacy_reads:
            status = {value: LEGACY_VALUES[answer] for value, answer in status.items()}
        return {"status": status, "message": "success"}

    def _user_status(
        self, state: SimulatorState, request: Request, asked: list[int]
    ) -> dict[str, Any]:
        params = request.query_params
        kind, values = query_identifiers(params.getlist, USER_STATUS_MAX_IDENTIFIERS)
        asked[0] = len(values)
        limit = _int_param(params.get("limit"), "limit", USER_STATUS_MAX_LIMIT, 1, 100)
        offset = _int_param(params.get("offset"), "offset", 0, 0, None)
        users: list[dict[str, Any]] = []
        for value in dict.fromkeys(values):
            groups = state.user_groups(kind, value)
            if not groups:
                continue
            users.append(
                {
                    kind: value,
                    "subscription_groups": [
                        {"id": group, "name": group, "channel": channel, "status": sub.title()}
                        for group, channel, sub in groups
                    ],
                }
            )
        return {
            "users": users[offset : offset + limit],
            "total_count": len(users),
            "message": "success",
        }
