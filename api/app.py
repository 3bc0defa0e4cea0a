"""The HTTP ingest API as an ASGI application (served by uvicorn, `api/server.py`).

- `POST /v1/changes`: one import row or a list of at most `MAX_CHANGES`, validated like an
  import's rows (`tasks.producer.validate_changes`), enqueued all-or-nothing through the
  producer's buffer in one atomic script call: `202 {"accepted", "stale"}`; `401` without
  an accepted bearer token; `413` past API_MAX_BODY_BYTES or `MAX_CHANGES`; `415` for a
  body that is not JSON; `422 {"errors": [{"index", "field", "reason"}]}` listing every bad
  row (identifiers masked), nothing enqueued; `503` with `Retry-After` while Redis refuses
  writes (out of memory, read-only after a failover, unreachable) or more than
  API_MAX_PENDING changes are pending, nothing enqueued.
- `GET /healthz`: 200 while Redis answers, 503 otherwise (no token: probes call it).
- `GET /openapi.json`: the OpenAPI document (`api/openapi.py`).

Starlette rather than FastAPI: the rows are validated by the producer's own parser (the
import's rules, messages and masking), so FastAPI's pydantic request models would be a
second definition of a row to keep in step, and its dependency injection buys nothing for
three routes. Starlette is already a dependency (the simulator uses it) and is what FastAPI
is built on; the OpenAPI document is written out instead (a test keeps its row fields in
step with the parser's).

Every request is counted for the exporter (`stores/api_metrics.py`) and logged in one
access line (LOG_FORMAT=json: one JSON object) with method, route, status, duration and
counts: never the body, a token, an identifier or the client's address.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from functools import cached_property
from typing import Any

from redis import Redis
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.openapi import openapi_document
from api.tokens import BearerTokens
from config.settings import Settings, get_settings
from config.workspaces import get_workspaces
from core.changes import Change, InvalidChange
from core.redaction import mask_identifiers_in, scrub
from core.routing import Routes
from stores.api_metrics import ApiMetrics
from stores.connection import redis_client
from stores.replication import NotReplicated, replicas_short
from stores.services import StoreServices
from tasks.logs import configure_logging
from tasks.producer import ChangesRejected, by_workspace, route_changes

logger = logging.getLogger("braze_subs.api")

# The most changes one request takes: the import's enqueue chunk, so that a request is one
# atomic script call (all-or-nothing) and holds Redis for a few milliseconds at most.
MAX_CHANGES = 1000
# Seconds a client is told to wait: a failover or a restart takes seconds; a full buffer
# drains at the budget's pace, so asking again sooner would only add load.
RETRY_AFTER_UNAVAILABLE = 5
RETRY_AFTER_FULL = 30
# Redis saying "not now" (rather than a bug): answered 503 with Retry-After.
UNAVAILABLE = (
    RedisConnectionError,  # BusyLoadingError (a restart loading its data) among them
    RedisTimeoutError,
    OutOfMemoryError,  # maxmemory reached under noeviction
    ReadOnlyError,  # a replica after a failover
    BusyLoadingError,
    MasterDownError,
    ClusterDownError,
    TryAgainError,
)
# Seconds for one Redis exchange: an enqueue of 1,000 changes takes milliseconds; a Redis
# that does not answer within this is unavailable (503), not waited for by every thread.
REDIS_TIMEOUT_SECONDS = 5.0
# Longest the backpressure check goes without reading the buffer's size from Redis.
PENDING_READ_SECONDS = 0.1
# How often each API process adds its request counts to Redis for the exporter.
METRICS_FLUSH_SECONDS = 1.0
ROUTES = ("/v1/changes", "/healthz", "/openapi.json")
# Where the access line finds what the endpoint counted (the ASGI scope is shared).
COUNTS = "braze_subs.counts"


class ApiServices(StoreServices):
    """The producer's services with a Redis client that gives up: an API thread never
    waits on a hung Redis for longer than `REDIS_TIMEOUT_SECONDS`."""

    @cached_property
    def redis(self) -> Redis:
        # An enqueue's WAIT (REDIS_WAIT_REPLICAS) may rightly take its whole timeout.
        wait = self.replica_wait.timeout_ms / 1000 if self.replica_wait.on else 0
        return redis_client(
            self.settings,
            health_check_interval=30,
            socket_timeout=REDIS_TIMEOUT_SECONDS + wait,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )


class PendingEstimate:
    """How many changes are pending, for the backpressure check, at a tenth of the cost
    of asking Redis every request (a round trip is ~20 % of a one-change request): Redis's
    count (`HLEN`), read at most every `PENDING_READ_SECONDS`, plus what this process has
    added since. API_MAX_PENDING is a soft bound anyway (concurrent requests each pass it
    by their size); the other processes' additions are seen within that tenth of a second.
    """

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._count = 0
        self._read_at = -math.inf

    def current(self) -> int:
        now = time.monotonic()
        if now - self._read_at >= PENDING_READ_SECONDS:
            count = self._read()
            with self._lock:
                self._count, self._read_at = count, now
        return self._count

    def added(self, count: int) -> None:
        with self._lock:
            self._count += count


class Refused(Exception):
    """A request answered with an error status; `body` is the JSON answer."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Refused:
    return Refused(status, {"error": message}, headers)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


class Ingest:
    """The routes' logic, over one process's services, tokens and request metrics."""

    def __init__(
        self,
        settings: Settings,
        services: StoreServices,
        tokens: BearerTokens,
        workspaces: Mapping[str, StoreServices] | None = None,
    ) -> None:
        self.settings = settings
        self.services = services  # the deployment's: Redis's health, the metrics
        # Each workspace's services (BRAZE_WORKSPACES_FILE): its own buffer, one client.
        self.workspaces = dict(workspaces) if workspaces else {services.workspace: services}
        self.routes = Routes(tuple(self.workspaces))
        self.tokens = tokens
        self.pending = PendingEstimate(self._pending_count)

    def _pending_count(self) -> int:
        """What is pending over every workspace (API_MAX_PENDING bounds the one Redis)."""
        return sum(found.buffer.pending_count() for found in self.workspaces.values())

    async def changes(self, request: Request) -> Response:
        if not self.tokens.accepts(request.headers.get("authorization")):
            raise _error(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
        if not _is_json(request.headers.get("content-type")):
            raise _error(415, "the body must be JSON (Content-Type: application/json)")
        rows = self._rows(await self._body(request))
        accepted, stale = await run_in_threadpool(self._accept, rows)
        request.scope[COUNTS] = (accepted, stale)
        return JSONResponse({"accepted": accepted, "stale": stale}, status_code=202)

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.api_max_body_bytes
        too_large = _error(413, f"the body must be at most {limit} bytes")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large  # not read at all
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _rows(self, body: bytes) -> list[Any]:
        try:
            data = json.loads(body, parse_constant=_no_constants)
        except (ValueError, RecursionError) as error:
            reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
            raise _error(415, f"the body is not JSON: {reason}") from None
        if isinstance(data, dict):
            return [data]
        if not isinstance(data, list):
            raise Refused(
                422,
                {
                    "errors": [
                        {
                            "index": None,
                            "field": "body",
                            "reason": f"must be a change (an object) or a list of them, "
                            f"got {_json_type(data)}",
                        }
                    ]
                },
            )
        if len(data) > MAX_CHANGES:
            raise _error(413, f"at most {MAX_CHANGES} changes per request, got {len(data)}")
        return data

    def _accept(self, rows: list[Any]) -> tuple[int, int]:
        """Validate and route every row, then enqueue them in one atomic step per workspace
        (in a thread; a request's changes of one workspace are one script call)."""
        split = by_workspace(self._validated(rows, self.routes))
        stale = 0
        try:
            if self.pending.current() >= self.settings.api_max_pending:
                raise _error(
                    503,
                    f"more than {self.settings.api_max_pending} changes are waiting: retry later",
                    {"Retry-After": str(RETRY_AFTER_FULL)},
                )
            accepted = 0
            for workspace, changes in split.items():
                buffer = self.workspaces[workspace].new_buffer()  # `stale`: this request's
                accepted += buffer.enqueue(changes, chunk_size=MAX_CHANGES)
                stale += buffer.stale
            self.pending.added(accepted - stale)
        except NotReplicated as error:
            # REDIS_WAIT_REPLICAS: the master applied the changes, too few replicas have
            # them yet; the producer sends them again (harmless: the same state, the same
            # time), by when a replica that was behind has usually caught up.
            logger.warning("Redis took the enqueue without its replicas: %s", error)
            raise _error(
                503,
                str(error),
                {"Retry-After": str(RETRY_AFTER_UNAVAILABLE)},
            ) from None
        except UNAVAILABLE as error:
            # The script ran whole or not at all; after a timeout nobody knows which, and a
            # retry of the same changes is harmless (the same state, at the same time).
            logger.warning(
                "Redis refused the enqueue: %s", scrub(f"{type(error).__name__}: {error}")
            )
            raise _error(
                503,
                f"the change store refuses writes now ({type(error).__name__}): retry later",
                {"Retry-After": str(RETRY_AFTER_UNAVAILABLE)},
            ) from None
        return accepted, stale

    @staticmethod
    def _validated(rows: list[Any], routes: Routes) -> list[tuple[Change, str]]:
        errors: list[tuple[int, InvalidChange]] = [
            (index, InvalidChange("change", f"must be an object, got {_json_type(row)}"))
            for index, row in enumerate(rows)
            if not isinstance(row, dict)
        ]
        objects = [(index, row) for index, row in enumerate(rows) if isinstance(row, dict)]
        changes: list[tuple[Change, str]] = []
        try:
            changes = route_changes((row for _, row in objects), routes)
        except ChangesRejected as rejected:
            errors += [(objects[position][0], error) for position, error in rejected.errors]
        if errors:
            errors.sort(key=lambda item: item[0])
            raise Refused(
                422,
                {
                    "errors": [
                        {
                            "index": index,
                            "field": error.field,
                            "reason": mask_identifiers_in(error.message, rows[index])
                            if isinstance(rows[index], dict)
                            else error.message,
                        }
                        for index, error in errors
                    ]
                },
            )
        return changes

    async def healthz(self, _request: Request) -> Response:
        try:
            await run_in_threadpool(self.services.redis.ping)
        except RedisError:
            return JSONResponse({"status": "unavailable", "redis": "unreachable"}, 503)
        return JSONResponse({"status": "ok", "redis": "ok"})

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(openapi_document(MAX_CHANGES))


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class AccessLog:
    """ASGI middleware: one access line and one observation per request, and every
    `Refused` turned into its JSON answer."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            accepted, stale = scope.get(COUNTS, (0, 0))
            self.metrics.observe(status, seconds, accepted, stale)
            route = scope["path"] if scope["path"] in ROUTES else "other"
            logger.info(
                "%s %s %d %.1f ms",
                scope["method"],
                route,
                status,
                seconds * 1000,
                extra={
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    "accepted": accepted,
                    "stale": stale,
                },
            )


async def _refused(_request: Request, error: Exception) -> Response:
    assert isinstance(error, Refused)
    return JSONResponse(error.body, error.status, headers=error.headers)


async def _disconnected(_request: Request, _error: Exception) -> Response:
    return Response(status_code=400)  # the client left mid-body: nobody reads this


def _flush_every(metrics: ApiMetrics, stop: threading.Event) -> None:
    while not stop.wait(METRICS_FLUSH_SECONDS):
        metrics.flush()
    metrics.flush()


def create_app(settings: Settings | None = None) -> Starlette:
    """The application for `settings` (default: the process's). Raises SettingsError when
    no bearer token is configured."""
    settings = settings or get_settings()
    tokens = BearerTokens(settings.require_api_tokens())
    configure_logging(settings)
    workspaces = get_workspaces(settings)
    services = ApiServices(settings)
    each = {
        name: ApiServices(settings.for_workspace(workspaces[name]), redis=services.redis)
        for name in workspaces.names
    }
    ingest = Ingest(settings, services, tokens, each)
    ingest.routes = workspaces.routes
    metrics = ApiMetrics(services.redis, services.keys)  # the client connects when used

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        for name, found in each.items():  # REDIS_WAIT_REPLICAS that no enqueue can meet
            short = await run_in_threadpool(
                replicas_short, found.redis, found.keys.pending, found.replica_wait
            )
            if short:
                logger.warning("workspace %s: %s", name, short)
        stop = threading.Event()
        flusher = threading.Thread(
            target=_flush_every, args=(metrics, stop), name="api-metrics", daemon=True
        )
        flusher.start()
        try:
            yield
        finally:
            stop.set()  # the last counts are flushed as the thread ends
            await run_in_threadpool(flusher.join, REDIS_TIMEOUT_SECONDS * 2)
            services.redis.close()

    return Starlette(
        routes=[
            Route("/v1/changes", ingest.changes, methods=["POST"]),
            Route("/healthz", ingest.healthz, methods=["GET"]),
            Route("/openapi.json", ingest.openapi, methods=["GET"]),
        ],
        middleware=[Middleware(AccessLog, metrics=metrics)],
        exception_handlers={Refused: _refused, ClientDisconnect: _disconnected},
        lifespan=lifespan,
    )
