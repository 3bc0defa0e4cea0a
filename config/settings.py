"""Every tunable of braze-subs, in one class, read from the environment and a `.env` file.

Environment variables override `.env`. Every default lives here, each with a comment that
says why it is what it is. A missing or malformed value stops the process at start with one
line that names the variable (`SettingsError`), never a traceback and never a late failure on
the first request.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import BrazeSubsError
from core.routing import DEFAULT_WORKSPACE

if TYPE_CHECKING:
    from config.workspaces import Workspace

# Braze's published REST endpoints (SPEC.md). Braze adds instances over time, which is why
# BRAZE_REST_ENDPOINT can always be given directly instead.
INSTANCES: dict[str, str] = {
    "US-01": "https://rest.iad-01.braze.com",
    "US-02": "https://rest.iad-02.braze.com",
    "US-03": "https://rest.iad-03.braze.com",
    "US-04": "https://rest.iad-04.braze.com",
    "US-05": "https://rest.iad-05.braze.com",
    "US-06": "https://rest.iad-06.braze.com",
    "US-08": "https://rest.iad-08.braze.com",
    "EU-01": "https://rest.fra-01.braze.eu",
    "EU-02": "https://rest.fra-02.braze.eu",
}

# Braze's hard cap on identifiers in one subscription-status request.
BRAZE_MAX_IDENTIFIERS = 50


# REDIS_URL schemes naming a Redis Cluster by its seed nodes; `rediss+cluster://` is TLS
# (verified as for rediss://, REDIS_CA_FILE or `?ssl_ca_certs=`), on every node.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def cluster_seeds(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """(seed nodes, username, password) of
    `redis+cluster://[user:password@]host:port[,host:port...][/0][?options]`. The client
    learns every other node from a seed (CLUSTER SLOTS), so one reachable seed is enough;
    a Redis Cluster has only database 0. Raises ValueError naming the part at fault (never
    the password)."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0 (leave the path empty or /0)")
    seeds: list[tuple[str, int]] = []
    for seed in hosts.split(","):
        host, _, port = seed.strip().rpartition(":") if ":" in seed else (seed.strip(), "", "")
        host = host.strip("[]")
        if not host:
            raise ValueError(
                f"{parts.scheme}:// needs its seed nodes as host:port, several joined by ','"
            )
        if port and not port.isdigit():
            raise ValueError("a seed node's port is not a number")
        seeds.append((host, int(port) if port else 6379))
    username, password = None, None
    if userinfo:
        name, _, secret = userinfo.partition(":")
        username = unquote(name) or None
        password = unquote(secret) if secret else None
    return seeds, username, password


class SettingsError(BrazeSubsError):
    """A setting is missing or malformed; the message is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",
        # Keep the secret out of reprs and validation errors.
        hide_input_in_errors=True,
        # inf and nan are never meaningful here.
        allow_inf_nan=False,
    )

    # --- Braze --------------------------------------------------------------------------
    # REST API key with the subscription.status.set permission. Only processes that post
    # need it (workers); producers and the CLI work without it. Secret: never logged.
    braze_api_key: SecretStr | None = None
    # Base URL of the workspace's REST API; plain http://127.0.0.1:PORT works for simulators.
    braze_rest_endpoint: str | None = None
    # Several Braze workspaces from one deployment (config/workspaces.py, README "Several
    # workspaces"): a TOML file with one [workspaces.NAME] table each. Unset: the Braze
    # settings here are the one workspace, `default`.
    braze_workspaces_file: str | None = None
    # Plain http:// sends the API key in clear text, so it is refused for any host but a
    # loopback one (a local simulator) unless this says otherwise (a TLS-terminating
    # sidecar on a private network, a test rig).
    braze_allow_insecure_http: bool = False
    # Alternative to BRAZE_REST_ENDPOINT: an instance name from the INSTANCES table.
    braze_instance: str | None = None
    # Which endpoint this process posts to: v1 (one group per request) or v2 (several).
    braze_api_version: Literal["v1", "v2"] = "v1"
    # Requests allowed per window, shared by v1 and v2 (Braze's documented 5,000/minute).
    braze_rate_limit: int = Field(default=5000, gt=0)
    # Length of that window in seconds (Braze: one minute).
    braze_rate_limit_window_seconds: float = Field(default=60.0, gt=0)
    # Share of the limit never spent: room for the jitter between when we send and when
    # Braze counts. 2 % keeps every window under the limit while sustaining 97 % of it.
    rate_limit_headroom: float = Field(default=0.02, ge=0, lt=0.5)
    # Requests that may go at once after a quiet spell, as a share of the limit (at least
    # one). Small, because every request of a burst is one fewer for the steady rate.
    rate_limit_burst_fraction: float = Field(default=0.01, ge=0, lt=0.5)
    # Longest a worker waits for its turn inside its task slot. A turn further off puts the
    # batch into the schedule in Redis, due at its turn (not counted as an attempt). Two
    # seconds covers a fleet of ~160 threads at 5,000/minute without re-scheduling, and
    # frees slots during a pause after a 429.
    token_wait_max_seconds: float = Field(default=2.0, gt=0)
    # The same for a bulk batch (import, verify --repair, dlq replay): how far ahead of now
    # bulk may reserve turns. Live takes the next turn after those, so this bounds how
    # long a live change waits behind a backfill in the budget; short enough for a live
    # p99 under 2 s, long enough that a backfill keeps >= 95 % of the budget (bench/lanes.py).
    bulk_token_wait_max_seconds: float = Field(default=0.5, gt=0)
    # Share of the budget bulk keeps however much live there is: while bulk waits, live may
    # spend at most 1 - this of it, so a flood of live changes never starves a backfill
    # (without bulk, live may spend all of it).
    bulk_floor_share: float = Field(default=0.1, ge=0, lt=1)
    # After Braze refuses the key (401/403/404) every worker stops posting; one request is
    # let through this often as a probe, and its success resumes posting everywhere.
    credentials_probe_seconds: float = Field(default=60.0, gt=0)
    # Requests allowed per window on the read endpoints (/subscription/status/get and
    # /subscription/user/status): Braze's general limit of 250,000 an hour, which the
    # workspace's other endpoints share. A budget of its own, spent by `verify`, `lookup`
    # and the opt-out check, so reads never take turns from posting.
    braze_read_rate_limit: int = Field(default=250_000, gt=0)
    # Length of that window in seconds (Braze: one hour).
    braze_read_rate_limit_window_seconds: float = Field(default=3600.0, gt=0)
    # An opt-out check read for a batch about to be posted (respect_opt_out) is also used
    # for other batches of the same group read along with it (one read call of up to 100
    # identifiers covers two batches of 50), while it is at most this old. Short, because
    # an opt-out made in Braze after the read is not seen: 30 s is a few turns of a busy
    # queue, and a stale read is simply read again.
    opt_out_read_max_age_seconds: float = Field(default=30.0, gt=0)
    # Seconds for one HTTP exchange with Braze (connect + write + read). Braze answers in
    # well under a second; ten leaves room for bad days without pinning a worker slot. A
    # worker stopped with SIGTERM finishes the requests already on the wire, so a
    # container's stop grace must exceed this (compose `stop_grace_period: 30s`); a dead
    # worker's request is given this long before its batch is posted again.
    http_timeout_seconds: float = Field(default=10.0, gt=0)

    # --- Redis ----------------------------------------------------------------------------
    # Change buffer, limiter and dead letters live in this one Redis; the broker too unless
    # BROKER_URL names another. `redis+cluster://[user:password@]h1:p1[,h2:p2...]` (TLS:
    # `rediss+cluster://`) puts them on a Redis Cluster instead, named by seed nodes; the
    # broker must then be BROKER_URL (README "State on a Redis Cluster").
    redis_url: str = "redis://localhost:6379/0"
    # Prefix of every key braze-subs writes, so it can share a Redis with other apps. It
    # sits inside a hash tag (`{prefix}:...`): a `{` or `}` would move the tag, and the Lua
    # scripts (which derive keys from KEYS[1]) and Python would disagree on key names, so
    # only letters, digits, `.`, `_` and `-` are allowed.
    redis_key_prefix: str = Field(default="braze-subs", min_length=1)
    # PEM file of the CA(s) that sign the Redis server's certificate, for a rediss:// URL
    # (the URL's `ssl_ca_certs` parameter works too). Unset: the system's CAs. The server's
    # certificate is verified on every connection, the Celery broker's included; a URL
    # asking not to verify (`ssl_cert_reqs=none`) is refused.
    redis_ca_file: str | None = None
    # With a sentinel:// REDIS_URL (`sentinel://h1:26379;sentinel://h2:26379/0`): the name
    # of the master the sentinels watch, e.g. `mymaster`. No default: a wrong name would
    # only fail later.
    redis_sentinel_master: str | None = None
    # Celery's broker, when it is not REDIS_URL's Redis: another Redis (redis://, rediss://,
    # unix://, sentinel://, with REDIS_CA_FILE and REDIS_SENTINEL_MASTER as for REDIS_URL)
    # or RabbitMQ (amqp://user:password@host:5672/vhost, amqps:// verified against
    # BROKER_CA_FILE, else the system's CAs). A RabbitMQ cluster is listed node by node,
    # `amqp://u:p@n1:5672/v;amqp://u:p@n2:5672/v;...` (kombu's failover: the next node when
    # one is lost). On RabbitMQ braze-subs declares its queues as quorum queues (README
    # "Broker on its own"). Unset: REDIS_URL, as before.
    broker_url: str | None = None
    # WAIT-acknowledged enqueues: replicas that must have every enqueue (each script call,
    # up to 1,000 changes) before a producer is told "accepted", within
    # REDIS_WAIT_TIMEOUT_MS; fewer is an error for the producer (HTTP 503, CLI and import:
    # one line). 0: Redis's asynchronous replication, and an enqueue the master had not
    # passed on is lost if it crashes (README "State on a Redis Cluster", "Failover").
    redis_wait_replicas: int = Field(default=0, ge=0)
    # How long an enqueue waits for those replicas (WAIT's timeout; 0, "forever", refused).
    redis_wait_timeout_ms: int = Field(default=500, ge=1, le=60_000)
    # PEM file of the CA(s) that sign RabbitMQ's certificate, for an amqps:// BROKER_URL
    # (certificate and host name verified). Unset: the system's CAs. Only this connection
    # uses it: SSL_CERT_FILE would also replace the CAs the Braze client trusts.
    broker_ca_file: str | None = None

    # --- Batching -------------------------------------------------------------------------
    # Identifiers per request; Braze allows 50 and full batches make the rate budget go
    # furthest, so lower it only to test.
    batch_max_identifiers: int = Field(default=BRAZE_MAX_IDENTIFIERS, ge=1)
    # Period of the beat task that cuts pending changes into batches. One second keeps
    # Redis quiet; it is not the floor of the latency: while the pipeline is light, a tick
    # stays up to one interval and ticks again as soon as a producer enqueues (a nudge).
    coalesce_interval_seconds: float = Field(default=1.0, gt=0)
    # The longest a partial batch may wait for company before it is sent anyway, counted
    # from when its oldest change became due. The wait follows the pressure on the shared
    # budget (core/linger.py): none while the budget is idle, this long once it is busy.
    # Two seconds fill batches from a steady stream; a lone change still lands in seconds.
    batch_linger_seconds: float = Field(default=2.0, ge=0)
    # Pressure on the budget (recent use, budget promised ahead, due work; 0..1) up to which
    # partial batches go at once, and from which they wait the whole linger (linear
    # between). At 0.25 / 0.75 a light stream settles where its own small requests use
    # about a third of the budget (bench/results/compare.md), leaving the rest of the
    # workspace's budget to its other clients, and a backlog always waits for full batches.
    batch_linger_pressure_low: float = Field(default=0.5, ge=0, le=1)
    batch_linger_pressure_high: float = Field(default=1.0, ge=0, le=1)
    # While a backlog drains (more due changes than one tick reads), a partial batch waits
    # up to this long for the rest of its key to come within reach: full requests stretch
    # the rate budget furthest. Bounded, so a rare key never starves behind busy ones.
    batch_max_hold_seconds: float = Field(default=30.0, ge=0)
    # Most due changes one coalescer tick reads from the buffer. 20,000 is 400 full batches,
    # more than a whole fleet can send in the time of a tick at Braze's limit.
    coalesce_max_changes_per_tick: int = Field(default=20_000, ge=1)
    # Most batches cut but not yet acknowledged. Beyond it the coalescer leaves changes in the
    # buffer, where a newer change for the same identifier still replaces an older one for
    # free. 500 is six seconds of requests at 5,000/minute: the queue never runs dry.
    max_batches_in_flight: int = Field(default=500, ge=1)

    # --- Delivery -------------------------------------------------------------------------
    # Attempts per batch before its identifiers go to the dead-letter store. With the
    # backoff below (base 2 s, doubling, full jitter, cap 300 s), 15 attempts span about
    # 20 minutes on average: a real Braze outage of several minutes dead-letters nothing.
    max_attempts: int = Field(default=15, ge=1)
    # First backoff step in seconds; each further attempt doubles it, up to the cap.
    retry_backoff_base_seconds: float = Field(default=2.0, gt=0)
    # Cap of the exponential backoff between attempts.
    retry_backoff_max_seconds: float = Field(default=300.0, gt=0)
    # The lease of a claim. The worker's heartbeat extends it while the post is in
    # progress, and a send needs more than HTTP_TIMEOUT_SECONDS of it left, so a live
    # request never runs beside its own take-over. A claim is taken back as soon as its
    # holder's heartbeat is gone; the lease only bounds a live worker that stopped posting
    # a batch without letting it go (a bug), so it may be generous.
    batch_claim_seconds: float = Field(default=60.0, gt=0)
    # Backstop for a lost message: a batch neither claimed nor waiting in the schedule this
    # long after its message was sent gets another. Messages held by a dead worker are
    # found sooner, by its heartbeat; this covers the rest (a Redis failover, a crash
    # between cutting a batch and sending its message). A duplicate message is harmless:
    # one claim wins, and a batch waiting in the schedule cannot be claimed.
    batch_redispatch_seconds: float = Field(default=120.0, gt=0)
    # Each worker process writes a heartbeat to Redis this often, extending the leases of
    # the claims it is posting.
    heartbeat_interval_seconds: float = Field(default=1.0, gt=0)
    # A worker whose last heartbeat is older than this is dead (kill -9, OOM, frozen, cut
    # off from Redis): the next tick takes its batches back. Five beats: a busy host's
    # scheduling hiccup is not a death, and a dead worker's batches still go out again
    # within seconds (README: recovery).
    heartbeat_ttl_seconds: float = Field(default=5.0, gt=0)

    # Days a dead-letter entry is kept for an operator to replay or purge. Older entries
    # are removed by the beat task `subscriptions.expire_dead_letters`, each with a WARNING
    # log line and counted in `status` (dead_letters_expired): the store stays bounded and
    # nothing goes silently.
    dead_letter_retention_days: float = Field(default=30.0, gt=0)
    # How often that task runs. Ten minutes: a retention counted in days needs no more.
    dead_letter_expiry_interval_seconds: float = Field(default=600.0, gt=0)
    # After Braze refuses a whole batch (a group it does not know, emails in an SMS group),
    # further batches for that group + state + identifier kind are dead-lettered without a
    # request for this long; then the next batch is sent and tells whether the group was
    # fixed. Ten minutes: one request per refused group per ten minutes costs nothing,
    # while a fixed group resumes soon (at once with `dlq replay`, which lifts it).
    group_refusal_seconds: float = Field(default=600.0, gt=0)

    # --- Event time and consent history -------------------------------------------------
    # Days the watermark of a group + identifier (when its latest accepted change occurred)
    # is kept after the identifier's last change, delivery or dead letter. Within it, a
    # change that occurred earlier is dropped as stale even after delivery; one older than
    # this is compared with what is still held, and its history says so. 30 days covers
    # redelivered messages, retries of upstream services and nightly backfills; it costs
    # ~200 bytes per identifier (bench/history_cost.py, README "Sizing").
    watermark_retention_days: float = Field(default=30.0, gt=0)
    # Days an identifier's consent history is kept after its last event (and no event
    # older than this is kept). 30 days answers "why is this user unsubscribed, since
    # when, who said so" for a month's changes; raise it for longer audit trails.
    history_retention_days: float = Field(default=30.0, gt=0)
    # Most history events kept per identifier, oldest dropped first: bounds the memory of
    # an identifier that changes all the time (~80 bytes an event, bench/history_cost.py).
    history_max_events: int = Field(default=50, ge=1)

    # --- Worker process -------------------------------------------------------------------
    # Posting is I/O-bound: a thread pool of 16 keeps ~16 requests in the air per container,
    # enough for Braze's whole budget at up to ~200 ms per request.
    worker_concurrency: int = Field(default=16, ge=1)

    # --- Operations: metrics and health probes ---------------------------------------------
    # Port of the Prometheus exporter (`braze-subs metrics`, `/metrics`). 9717 is unused by
    # the exporters listed in Prometheus's default port allocations.
    metrics_port: int = Field(default=9717, ge=1, le=65535)
    # Address the exporter binds. Loopback: on a shared host only local processes can read
    # the fleet's figures; the container manifests (compose, Kubernetes) set 0.0.0.0,
    # where the container's network is the boundary.
    metrics_address: str = Field(default="127.0.0.1", min_length=1)
    # Folder of the liveness heartbeat files (`<role>.alive`), touched by a thread in each
    # worker and beat process and read by `braze-subs probe live`. The temporary folder is
    # private to a container; processes of one role sharing a host need a folder each.
    health_dir: str = Field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "braze-subs"))
    # A heartbeat older than this fails the liveness probe. The heartbeat is written every
    # fifth of it (one second by default), so a frozen or killed process fails within
    # five seconds while a busy machine's scheduling hiccups (well under a second) do not.
    liveness_max_age_seconds: float = Field(default=5.0, gt=0)

    # --- HTTP ingest API (`braze-subs api`, the Procfile's `api:` line) --------------------
    # Bearer tokens the API accepts: comma-separated, and/or one a line in API_TOKENS_FILE
    # (a mounted secret). Several, for rotation: add the new one, move the producers, drop
    # the old. Each at least 16 characters. Secrets: never logged, compared in constant time.
    api_tokens: SecretStr | None = None
    api_tokens_file: str | None = None
    # Port of the API: PORT, the name Procfile platforms and Cloud Run set.
    port: int = Field(default=8080, ge=1, le=65535)
    # All interfaces: other services call the API (every request needs a token).
    api_address: str = Field(default="0.0.0.0", min_length=1)
    # Processes of the API (uvicorn workers). One uses a core; scale with replicas or this.
    api_workers: int = Field(default=1, ge=1)
    # Backpressure: while more distinct group + identifier pairs than this are pending, the
    # API answers 503 with Retry-After instead of growing the buffer. At ~300 bytes each, a
    # million is ~300 MB, under compose's REDIS_MAXMEMORY (1gb), so the API says "later"
    # before Redis refuses writes; that is also 4 minutes of one workspace's full budget.
    api_max_pending: int = Field(default=1_000_000, ge=1)
    # Largest request body: 1,000 import rows (the most one request takes) of ~250 bytes
    # each, with room to spare; larger ones are answered 413 without being read.
    api_max_body_bytes: int = Field(default=1_048_576, ge=1024)

    # --- Import ---------------------------------------------------------------------------
    # Processes that validate a `braze-subs import` file (`--jobs` overrides). Unset: one
    # per CPU, since phone validation (~50 µs a row) is CPU-bound; 1 validates in the
    # importing process. Files under 1 MiB are always validated in-process: starting the
    # workers would cost more than they save.
    import_jobs: int | None = Field(default=None, ge=1)

    # --- Verify ---------------------------------------------------------------------------
    # Reads `braze-subs verify` keeps in the air at once. Braze answers in ~0.1-0.3 s, and
    # the read budget allows ~68 calls a second: 16 at once can spend it, one would not.
    verify_concurrency: int = Field(default=16, ge=1)

    # --- Logs -----------------------------------------------------------------------------
    # Level of our own loggers.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "text" for people, "json" for log shippers.
    log_format: Literal["text", "json"] = "text"

    # Which workspace these settings are for (`for_workspace`); not a variable.
    _workspace_name: str = PrivateAttr(default=DEFAULT_WORKSPACE)
    # Why a workspace of BRAZE_WORKSPACES_FILE has no key (one line naming its table).
    _key_problem: str | None = PrivateAttr(default=None)

    @field_validator("braze_api_key", mode="before")
    @classmethod
    def _header_safe_key(cls, value: object) -> object:
        """Strip the whitespace a mounted secret or a quoted `.env` line leaves around the
        key (Braze keys never hold any), and refuse what cannot go in an HTTP header: httpx
        would otherwise fail every request with an error quoting the whole key."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        key = value.strip()
        if not key:
            return None
        if not all("\x21" <= char <= "\x7e" for char in key):
            # The value is not echoed (it is a secret): only what is wrong with it.
            raise ValueError(
                "holds characters that cannot go in an HTTP header "
                "(spaces, control characters or non-ASCII inside the key)"
            )
        return key

    @field_validator("braze_instance")
    @classmethod
    def _known_instance(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        name = value.strip().upper()
        if name not in INSTANCES:
            # The value is not echoed: a key pasted into the wrong variable stays secret.
            raise ValueError(f"not a known instance; known: {', '.join(INSTANCES)}")
        return name

    @field_validator("braze_rest_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        value = value.strip()
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix", "sentinel", *CLUSTER_SCHEMES):
            raise ValueError(
                "must start with redis://, rediss://, unix://, sentinel:// or redis+cluster://"
            )
        if scheme in CLUSTER_SCHEMES:
            cluster_seeds(value)  # raises ValueError naming the part at fault
        if scheme in ("rediss", "rediss+cluster"):
            query = dict(parse_qsl(urlsplit(value).query))
            wanted = query.get("ssl_cert_reqs", "required").lower()
            if wanted not in ("required", "cert_required"):
                raise ValueError(
                    "ssl_cert_reqs must stay 'required': braze-subs always verifies the "
                    "server's certificate (pass its CA with REDIS_CA_FILE)"
                )
        if scheme == "unix" and not urlsplit(value).path:
            raise ValueError("unix:// needs the socket's path, e.g. unix:///run/redis.sock")
        if scheme == "sentinel":
            for part in value.split(";"):
                parts = urlsplit(part.strip())
                if parts.scheme != "sentinel" or not parts.hostname:
                    raise ValueError(
                        "sentinel URLs are sentinel://HOST:PORT, several joined by ';'"
                    )
                try:
                    parts.port  # noqa: B018 - raises on a malformed port
                except ValueError:
                    raise ValueError("a sentinel's port is not a number") from None
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        # Messages name the scheme or part at fault, never the URL (it holds a password).
        if value is None or not value.strip():
            return None
        value = value.strip()
        scheme = urlsplit(value).scheme
        if scheme in CLUSTER_SCHEMES:
            raise ValueError(
                "Celery's broker cannot be a Redis Cluster (a plain Redis, sentinel:// or amqp://)"
            )
        if scheme not in ("amqp", "amqps"):
            try:
                return cls._redis_url(value)
            except ValueError as exc:
                if scheme in ("redis", "rediss", "unix", "sentinel"):
                    raise
                raise ValueError(
                    "must start with amqp://, amqps://, redis://, rediss://, unix:// or sentinel://"
                ) from exc
        # A RabbitMQ cluster: its nodes `;`-joined, each a whole URL (kombu's failover list,
        # tried in turn from the first; the next one when a connection is lost).
        nodes = [part.strip() for part in value.split(";")]
        for n, node in enumerate(nodes, start=1):
            which = f"node {n} of {len(nodes)}: " if len(nodes) > 1 else ""
            parts = urlsplit(node)
            if parts.scheme != scheme:
                raise ValueError(f"{which}every node must be {scheme}:// like the first")
            if not parts.hostname:
                raise ValueError(
                    f"{which}{scheme}:// needs a host, e.g. {scheme}://user:password@host/vhost"
                )
            try:
                parts.port  # noqa: B018 - raises on a malformed port
            except ValueError:
                raise ValueError(f"{which}the port is not a number") from None
        return ";".join(nodes)

    @field_validator("redis_key_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError(
                "only letters, digits, '.', '_' and '-' are allowed (it sits in the keys' "
                "hash tag, which '{', '}' and others would change)"
            )
        return value

    @field_validator("redis_ca_file", "broker_ca_file", "api_tokens_file", "braze_workspaces_file")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        path = Path(value.strip()).expanduser()
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        return str(path)

    @field_validator("batch_max_identifiers")
    @classmethod
    def _braze_cap(cls, value: int) -> int:
        if value > BRAZE_MAX_IDENTIFIERS:
            raise ValueError(f"Braze accepts at most {BRAZE_MAX_IDENTIFIERS} identifiers")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        endpoint = self.braze_rest_endpoint
        if self.braze_instance and endpoint and INSTANCES[self.braze_instance] != endpoint:
            raise ValueError("BRAZE_INSTANCE: disagrees with BRAZE_REST_ENDPOINT; set one")
        if self.redis_url.startswith("sentinel://") and not self.redis_sentinel_master:
            raise ValueError(
                "REDIS_SENTINEL_MASTER: required with a sentinel:// REDIS_URL "
                "(the master's name the sentinels watch, e.g. mymaster)"
            )
        if self.is_cluster and self.broker_url is None:
            raise ValueError(
                "BROKER_URL: required with a redis+cluster:// REDIS_URL (Celery's broker "
                "cannot use a Redis Cluster: name a plain Redis, sentinel:// or amqp://)"
            )
        if self.broker.startswith("sentinel://") and not self.redis_sentinel_master:
            raise ValueError(
                "REDIS_SENTINEL_MASTER: required with a sentinel:// BROKER_URL "
                "(the master's name the sentinels watch, e.g. mymaster)"
            )
        if self.broker_ca_file and urlsplit(self.broker).scheme != "amqps":
            raise ValueError(
                "BROKER_CA_FILE: only for an amqps:// BROKER_URL (a rediss:// broker is "
                "verified against REDIS_CA_FILE)"
            )
        if self.batch_claim_seconds <= self.http_timeout_seconds + self.heartbeat_interval_seconds:
            # A send needs more than HTTP_TIMEOUT_SECONDS of lease left, and the heartbeat
            # renews the lease only every interval: a shorter lease makes the fence refuse
            # (some or every) send, and the batch never goes.
            raise ValueError(
                "BATCH_CLAIM_SECONDS: must exceed HTTP_TIMEOUT_SECONDS plus "
                f"HEARTBEAT_INTERVAL_SECONDS ({self.http_timeout_seconds:g} + "
                f"{self.heartbeat_interval_seconds:g} s; it is {self.batch_claim_seconds:g} s)"
            )
        insecure = endpoint is not None and urlsplit(endpoint).scheme == "http"
        if (
            insecure
            and not self.braze_allow_insecure_http
            and not is_loopback_host(urlsplit(endpoint).hostname or "")
        ):
            raise ValueError(
                "BRAZE_REST_ENDPOINT: http:// would send the API key in clear text; use "
                "https://, a loopback host, or set BRAZE_ALLOW_INSECURE_HTTP=true"
            )
        if self.heartbeat_ttl_seconds <= 2 * self.heartbeat_interval_seconds:
            raise ValueError("HEARTBEAT_TTL_SECONDS: must exceed twice HEARTBEAT_INTERVAL_SECONDS")
        if self.batch_linger_pressure_high < self.batch_linger_pressure_low:
            raise ValueError(
                "BATCH_LINGER_PRESSURE_HIGH: must not be below BATCH_LINGER_PRESSURE_LOW"
            )
        return self

    # --- Derived values -------------------------------------------------------------------

    # Durations in milliseconds, as Redis's clock and the Lua scripts count them.

    @property
    def claim_lease_ms(self) -> int:
        return _ms(self.batch_claim_seconds)

    @property
    def http_timeout_ms(self) -> int:
        return _ms(self.http_timeout_seconds)

    @property
    def redispatch_grace_ms(self) -> int:
        return _ms(self.batch_redispatch_seconds)

    @property
    def heartbeat_ttl_ms(self) -> int:
        return _ms(self.heartbeat_ttl_seconds)

    @property
    def batch_linger_ms(self) -> int:
        return _ms(self.batch_linger_seconds)

    @property
    def batch_max_hold_ms(self) -> int:
        return _ms(self.batch_max_hold_seconds)

    @property
    def dead_letter_retention_ms(self) -> int:
        return _ms(self.dead_letter_retention_days * 86_400)

    @property
    def rest_endpoint(self) -> str | None:
        """The REST base URL, from BRAZE_REST_ENDPOINT or BRAZE_INSTANCE."""
        if self.braze_rest_endpoint:
            return self.braze_rest_endpoint
        if self.braze_instance:
            return INSTANCES[self.braze_instance]
        return None

    @property
    def workspace_id(self) -> str:
        """A stable, non-secret name for the workspace: endpoint host + a hash of the key.

        Used in Redis key names so that every process posting for one workspace shares one
        rate budget, while the key itself never appears anywhere.
        """
        key = self.braze_api_key.get_secret_value() if self.braze_api_key else ""
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        host = urlsplit(self.rest_endpoint or "").netloc or "unset"
        return f"{host}:{digest}"

    @property
    def is_cluster(self) -> bool:
        """REDIS_URL names a Redis Cluster (redis+cluster://, rediss+cluster://)."""
        return urlsplit(self.redis_url).scheme in CLUSTER_SCHEMES

    @property
    def broker(self) -> str:
        """Celery's broker URL: BROKER_URL, else REDIS_URL."""
        return self.broker_url or self.redis_url

    def redis_tls(self, url: str | None = None) -> dict[str, Any] | None:
        """TLS options of every Redis connection (ours and the broker's) for a rediss://
        URL (REDIS_URL unless `url` is given): the certificate is always verified, against
        REDIS_CA_FILE or the URL's `ssl_ca_certs` if given (else the system's CAs). None for
        other URLs."""
        parts = urlsplit(url or self.redis_url)
        if parts.scheme not in ("rediss", "rediss+cluster"):
            return None
        # The host name is checked against the certificate explicitly: redis-py's default
        # for it changed between the versions pyproject.toml allows (off before 6).
        options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        ca = self.redis_ca_file or dict(parse_qsl(parts.query)).get("ssl_ca_certs")
        if ca:
            options["ssl_ca_certs"] = ca
        return options

    def require_api_tokens(self) -> list[str]:
        """The bearer tokens the HTTP API accepts (API_TOKENS, then API_TOKENS_FILE's
        lines); raise SettingsError if there are none or one is too short to be secret."""
        text = self.api_tokens.get_secret_value() if self.api_tokens else ""
        tokens = [token.strip() for token in text.split(",")]
        if self.api_tokens_file:
            lines = Path(self.api_tokens_file).read_text(encoding="utf-8").splitlines()
            tokens += [line.strip() for line in lines]
        tokens = [token for token in tokens if token and not token.startswith("#")]
        if not tokens:
            raise SettingsError(
                "API_TOKENS: missing (the HTTP API needs at least one bearer token, in "
                "API_TOKENS or API_TOKENS_FILE)"
            )
        for number, token in enumerate(tokens, 1):
            if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
                raise SettingsError(
                    f"API_TOKENS: token {number} must be at least 16 printable characters "
                    "without spaces"
                )
        return tokens

    @property
    def workspace_name(self) -> str:
        """The workspace these settings are for: `default` unless `for_workspace` made
        them for a table of BRAZE_WORKSPACES_FILE."""
        return self._workspace_name

    def for_workspace(self, workspace: Workspace) -> Settings:
        """A copy for one workspace: its key, endpoint and budgets (the optional ones it
        leaves unset: these settings'), so every consumer of `braze_rate_limit`,
        `workspace_id`, `rest_endpoint`, ... is per workspace unchanged."""
        update: dict[str, Any] = {
            "braze_api_key": workspace.api_key,
            "braze_rest_endpoint": workspace.rest_endpoint,
        }
        if workspace.rest_endpoint is not None and workspace.rest_endpoint != self.rest_endpoint:
            update["braze_instance"] = None  # the table's endpoint, not BRAZE_INSTANCE's
        for field, value in (
            ("braze_rate_limit", workspace.rate_limit),
            ("braze_rate_limit_window_seconds", workspace.rate_limit_window_seconds),
            ("braze_read_rate_limit", workspace.read_rate_limit),
        ):
            if value is not None:
                update[field] = value
        copy = self.model_copy(update=update)
        copy._workspace_name = workspace.name
        copy._key_problem = workspace.key_problem
        return copy

    def require_braze(self) -> None:
        """Raise SettingsError unless this process can talk to Braze."""
        if self._key_problem is not None:
            raise SettingsError(self._key_problem)
        if self.braze_api_key is None or not self.braze_api_key.get_secret_value().strip():
            raise SettingsError("BRAZE_API_KEY: missing (required to post to Braze)")
        if self.rest_endpoint is None:
            raise SettingsError(
                "BRAZE_REST_ENDPOINT: missing (set it, or BRAZE_INSTANCE, e.g. US-01)"
            )


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def load_settings(**overrides: object) -> Settings:
    """Build Settings, turning pydantic's report into one line that names the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        location = error.get("loc") or ()
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if location:  # a field error; model-level errors already name their variable
            message = f"{str(location[0]).upper()}: {message}"
        raise SettingsError(message) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; BRAZE_WORKSPACES_FILE is read (and checked)
    with them, so a bad file stops a process at start too."""
    settings = load_settings()
    from config.workspaces import get_workspaces  # it imports this module

    get_workspaces(settings)
    return settings
