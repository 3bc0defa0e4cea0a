"""Reading Braze back: `GET /subscription/status/get` (the state of up to 100 identifiers of
one kind in one group) and `GET /subscription/user/status` (a user's groups, paged).

Every read spends a turn of the workspace's *read* budget (`BRAZE_READ_RATE_LIMIT` per
`BRAZE_READ_RATE_LIMIT_WINDOW_SECONDS`, Braze's general limit): the same `RateLimiter` as
posting, under a key of its own, so reads get the write budget's guarantees — shared by the
whole fleet, in step with Braze's X-RateLimit headers, paused for everyone after a 429, and
never more than the limit in any window — without taking turns from posting.

Parsing the answers is pure (`parse_read_state`, `parse_status_reply`, `parse_user_reply`);
`BrazeReader` adds the budget and the HTTP exchange.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis import Redis

from config.settings import Settings
from core.changes import IdentifierKind
from core.errors import EXIT_ENVIRONMENT, BrazeSubsError
from core.outcome import Outcome, backoff_seconds, parse_answer, parse_rate_limit
from delivery.braze_client import BrazeClient, Reply
from stores.limiter import Budget, RateLimiter

STATUS_PATH = "/subscription/status/get"
USER_STATUS_PATH = "/subscription/user/status"
# Braze's cap on identifiers in one status/get call (seed 003: "a max of 100").
MAX_READ_IDENTIFIERS = 100
# Braze's cap (and default) of `limit` on user/status.
USER_STATUS_PAGE = 100


class ReadState(StrEnum):
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    UNKNOWN = "unknown"  # Braze does not know the identifier in that group


_STATE_WORDS: dict[str, ReadState] = {
    "subscribed": ReadState.SUBSCRIBED,
    "unsubscribed": ReadState.UNSUBSCRIBED,
    "unknown": ReadState.UNKNOWN,
    # The older form of the seed page: 0 subscribed, 1 unsubscribed, null unknown.
    "0": ReadState.SUBSCRIBED,
    "1": ReadState.UNSUBSCRIBED,
    "null": ReadState.UNKNOWN,
    "": ReadState.UNKNOWN,
}


class BrazeReadError(BrazeSubsError):
    """Braze could not be read (unreachable, the key refused, an answer we cannot read);
    the message is one line. The CLI exits 2 with it."""

    exit_code = EXIT_ENVIRONMENT


class ReadDeferred(Exception):
    """The read's turn in the budget is further off than the caller will wait (or reads are
    paused after a 429): try again after `wait_seconds`. Nothing was sent."""

    def __init__(self, wait_seconds: float, reason: str) -> None:
        super().__init__(reason)
        self.wait_seconds = wait_seconds
        self.reason = reason


def parse_read_state(raw: Any) -> ReadState | None:
    """One state as Braze writes it: the words, any case, or 0 / 1 / null; None if neither."""
    if raw is None:
        return ReadState.UNKNOWN
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | str):
        return _STATE_WORDS.get(str(raw).strip().lower())
    return None


def parse_status_reply(body: str, sent: Iterable[str]) -> dict[str, ReadState]:
    """`{"status": {identifier: state}}` -> a state for every identifier sent.

    An identifier the answer leaves out is `unknown`; Braze may echo an email in another
    case, so keys are matched case-insensitively when the exact one is absent. Raises
    `BrazeReadError` for an answer that is not of this shape.
    """
    data = parse_answer(body)  # bounded in size and depth; None if not JSON
    if data is None:
        raise BrazeReadError(f"Braze answered {STATUS_PATH} with something not JSON")
    status = data.get("status") if isinstance(data, dict) else None
    if not isinstance(status, dict):
        raise BrazeReadError(f"Braze's answer to {STATUS_PATH} has no status object")
    folded = {str(key).lower(): value for key, value in status.items()}
    states: dict[str, ReadState] = {}
    for value in sent:
        raw = status[value] if value in status else folded.get(value.lower())
        state = parse_read_state(raw)
        if state is None:
            raise BrazeReadError(f"Braze's answer to {STATUS_PATH} holds an unknown state")
        states[value] = state
    return states


@dataclass(frozen=True, slots=True)
class GroupState:
    group_id: str
    state: ReadState
    name: str = ""
    channel: str = ""


@dataclass(frozen=True, slots=True)
class UserGroups:
    """One user (profile) of a user/status answer and its subscription groups."""

    external_id: str | None
    email: str | None
    phone: str | None
    groups: tuple[GroupState, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "external_id": self.external_id,
            "email": self.email,
            "phone": self.phone,
            "groups": [
                {
                    "subscription_group_id": group.group_id,
                    "name": group.name,
                    "channel": group.channel,
                    "state": group.state.value,
                }
                for group in self.groups
            ],
        }


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


def _group(raw: Any) -> GroupState | None:
    if not isinstance(raw, Mapping):
        return None
    group_id = _text(raw.get("id", raw.get("subscription_group_id")))
    state = parse_read_state(raw.get("status", raw.get("subscription_state", raw.get("state"))))
    if group_id is None or state is None:
        return None
    return GroupState(
        group_id, state, name=_text(raw.get("name")) or "", channel=_text(raw.get("channel")) or ""
    )


def parse_user_reply(body: str) -> list[UserGroups]:
    """`{"users": [{"external_id", "email", "phone", "subscription_groups": [{"id", "name",
    "channel", "status"}]}]}` -> the users. Raises `BrazeReadError` for another shape."""
    data = parse_answer(body)  # bounded in size and depth; None if not JSON
    if data is None:
        raise BrazeReadError(f"Braze answered {USER_STATUS_PATH} with something not JSON")
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, list):
        raise BrazeReadError(f"Braze's answer to {USER_STATUS_PATH} has no users list")
    found: list[UserGroups] = []
    for user in users:
        if not isinstance(user, Mapping):
            continue
        raw_groups = user.get("subscription_groups") or []
        groups = [g for g in map(_group, raw_groups if isinstance(raw_groups, list) else []) if g]
        found.append(
            UserGroups(
                external_id=_text(user.get("external_id")),
                email=_text(user.get("email")),
                phone=_text(user.get("phone")),
                groups=tuple(groups),
            )
        )
    return found


def chunked(values: Iterable[str], size: int = MAX_READ_IDENTIFIERS) -> Iterator[list[str]]:
    """`values` in lists of at most `size`, in order."""
    chunk: list[str] = []
    for value in values:
        chunk.append(value)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def read_limiter(settings: Settings, client: Redis, key: str, **options: Any) -> RateLimiter:
    """The workspace's read budget: `stores.limiter.RateLimiter` with the read limits."""
    budget = Budget.for_limit(
        settings.braze_read_rate_limit,
        settings.braze_read_rate_limit_window_seconds,
        headroom=settings.rate_limit_headroom,
        burst_fraction=settings.rate_limit_burst_fraction,
    )
    return RateLimiter(client, key, budget, **options)


class BrazeReader:
    """The read endpoints, each call through the shared read budget.

    `max_wait_seconds`: the longest this caller sleeps for a turn (or a pause after a 429);
    beyond it `ReadDeferred` is raised and nothing is sent — a worker re-queues its batch,
    while the CLI passes None and simply waits. Transport errors and 5xx are retried
    `attempts` times with backoff, then raise `BrazeReadError`, as do a refused key (401,
    403, 404) and a refused request (400).
    """

    def __init__(
        self,
        braze: BrazeClient,
        limiter: RateLimiter | None,
        *,
        max_wait_seconds: float | None,
        attempts: int = 3,
        backoff_base_seconds: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        record: Callable[[str, int | None], object] | None = None,
    ) -> None:
        self.braze = braze
        self.limiter = limiter
        self.record = record  # counts each request by path and HTTP status (the exporter's)
        self.max_wait_seconds = max_wait_seconds
        self.attempts = max(1, attempts)
        self.backoff_base_seconds = backoff_base_seconds
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._calls = itertools.count()
        self.calls = 0  # requests sent (answered or not), for reports and benchmarks

    def __repr__(self) -> str:
        return f"BrazeReader(endpoint={self.braze.endpoint!r})"

    # --- the endpoints ----------------------------------------------------------------------

    def statuses(
        self,
        group_id: str,
        kind: IdentifierKind | str,
        values: list[str],
        *,
        fence: Callable[[], bool] | None = None,
    ) -> dict[str, ReadState]:
        """The state of each of up to 100 identifiers of one kind in one group. `fence`,
        asked right before each request's first byte: False sends nothing and raises
        `ReadDeferred` (an identifier of the read was erased meanwhile)."""
        if not values:
            return {}
        if len(values) > MAX_READ_IDENTIFIERS:
            raise ValueError(f"at most {MAX_READ_IDENTIFIERS} identifiers per read")
        kind_name = IdentifierKind(kind).value
        params = [("subscription_group_id", group_id)] + [(kind_name, v) for v in values]
        reply = self._get(STATUS_PATH, params, fence)
        return parse_status_reply(reply.body, values)

    def user_groups(
        self, kind: IdentifierKind | str, value: str, *, page: int = USER_STATUS_PAGE
    ) -> list[UserGroups]:
        """Every user Braze holds under the identifier, with their groups, all pages."""
        kind_name = IdentifierKind(kind).value
        users: list[UserGroups] = []
        offset = 0
        while True:
            params = [(kind_name, value), ("limit", str(page)), ("offset", str(offset))]
            found = parse_user_reply(self._get(USER_STATUS_PATH, params).body)
            users += found
            if len(found) < page:
                return users
            offset += page

    # --- one exchange -------------------------------------------------------------------------

    def _turn(self) -> None:
        """Wait for a turn in the read budget, or raise `ReadDeferred`."""
        limiter = self.limiter
        if limiter is None:
            return
        while True:
            grant = limiter.acquire()
            wait = grant.wait_seconds
            if grant.granted:
                if wait > 0:
                    self.sleep(wait)
                paused = limiter.paused_for()  # a 429 meanwhile wins over the reservation
                if paused <= 0:
                    return
                wait = paused
            if self.max_wait_seconds is not None and wait > self.max_wait_seconds:
                raise ReadDeferred(wait, "waiting for the read budget")
            self.sleep(max(wait, 0.01) + self.rng.uniform(0, 0.05))

    def _get(
        self, path: str, params: list[tuple[str, str]], fence: Callable[[], bool] | None = None
    ) -> Reply:
        attempt = 0
        while True:
            attempt += 1
            self._turn()
            reply = self.braze.get(path, params, fence=fence)
            if reply.unsent:  # the fence refused: not one byte went out
                raise ReadDeferred(0.0, "an identifier of the read was erased meanwhile")
            self.calls = next(self._calls) + 1  # atomic under threads, unlike += 1
            if self.record is not None:
                self.record(path, reply.status)
            result = reply.classified()
            rate = parse_rate_limit(reply.headers)
            if self.limiter is not None and reply.status is not None:
                self.limiter.observe(rate)
            if result.outcome is Outcome.DELIVERED:
                return reply
            if result.outcome is Outcome.RATE_LIMITED:
                reset = rate.reset_epoch or (time.time() + 60)
                if self.limiter is not None:
                    self.limiter.pause_until(reset, "429 from Braze (reads)")
                wait = max(reset - time.time(), 0.5)
                if self.max_wait_seconds is not None and wait > self.max_wait_seconds:
                    raise ReadDeferred(wait, "reads paused after a 429")
                if self.limiter is None:
                    self.sleep(wait)
                attempt -= 1  # a 429 is not a failed attempt
                continue
            if result.outcome is Outcome.CREDENTIALS:
                raise BrazeReadError(f"Braze refused the API key for {path} ({result.detail})")
            if result.outcome is Outcome.REDIRECTED:  # never followed: a configuration error
                raise BrazeReadError(
                    f"{self.braze.endpoint} redirects {path} ({result.detail}): check "
                    "BRAZE_REST_ENDPOINT / BRAZE_INSTANCE"
                )
            if result.outcome is Outcome.BAD_REQUEST:
                raise BrazeReadError(f"Braze refused the read {path}: {result.detail}")
            if attempt >= self.attempts:
                raise BrazeReadError(
                    f"Braze unreachable at {self.braze.endpoint} ({result.detail})"
                )
            self.sleep(
                backoff_seconds(attempt, base=self.backoff_base_seconds, cap=5.0, rng=self.rng)
            )
