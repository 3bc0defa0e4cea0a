"""Redis clients for REDIS_URL: redis://, rediss:// (certificate verified), unix://,
sentinel:// (the master the sentinels name, followed across a failover) and
redis+cluster:// / rediss+cluster:// (a Redis Cluster by its seed nodes).

Every braze-subs Redis client is made here, so TLS and Sentinel are configured in one
place; the Celery broker gets the same from `broker_options` (tasks/celery_app.py), on
BROKER_URL when it is set: another Redis, or RabbitMQ (amqp://, amqps://).
"""

from __future__ import annotations

import ssl
from typing import Any, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from redis import Redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import Sentinel

from config.settings import Settings, cluster_seeds

# The errors of a Redis that does not answer for now, as during a failover: the master is
# gone (connection refused or timed out) until a replica is promoted, a cluster slot has
# no master (CLUSTERDOWN, TRYAGAIN mid-resharding, redis-py's slot not covered or no node
# reachable), or the old master was demoted under a client that still writes to it
# (READONLY). A caller that may wait a little tries again after these; any other error is
# an answer (a script's error, a bug) and is not tried again.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    SlotNotCoveredError,
    RedisClusterUnreachableError,
)


def _sentinel_hosts(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """(sentinels, password, db) of `sentinel://[:pw@]h1:26379;sentinel://h2:26379/0`."""
    hosts: list[tuple[str, int]] = []
    password: str | None = None
    db = 0
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        hosts.append((parts.hostname or "localhost", parts.port or 26379))
        if parts.password:
            password = unquote(parts.password)
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
    return hosts, password, db


def cluster_client(settings: Settings, **options: Any) -> RedisCluster:
    """A client of the Redis Cluster a redis+cluster:// (rediss+cluster://) REDIS_URL
    names by its seed nodes: redis-py's RedisCluster, which learns the slot map from a
    seed, sends each command to the master of its keys' slot, follows MOVED/ASK and
    learns the map again after a failover. Replicas are not read (every read must see
    the last write: the claims and fences depend on it)."""
    seeds, username, password = cluster_seeds(settings.redis_url)
    try:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            username=username,
            password=password,
            ssl=settings.redis_tls() is not None,
            **(settings.redis_tls() or {}),
            **options,
        )
    except RedisClusterException as exc:
        # RedisCluster asks a seed for the slot map as it is made; no seed answering is
        # the ConnectionError every caller already reports in one line ("cannot reach
        # Redis at ..."), not redis-py's RedisClusterException, which is no RedisError.
        raise RedisConnectionError(str(exc)) from None


def redis_client(settings: Settings, **options: Any) -> Redis:
    """A client of the Redis that REDIS_URL names. `options` go to each connection
    (timeouts, health checks).

    For a Redis Cluster it is a `RedisCluster`, which speaks the same commands (typed as
    Redis for the callers): every multi-key command, transaction and script of braze-subs
    touches the keys of one workspace, one hash tag, so one slot; pipelines without a
    transaction may span workspaces (RedisCluster sends each node its part)."""
    if settings.is_cluster:
        return cast(Redis, cluster_client(settings, **options))
    url = settings.redis_url
    if url.startswith("sentinel://"):
        hosts, password, db = _sentinel_hosts(url)
        timeout = options.get("socket_timeout")
        sentinel = Sentinel(hosts, socket_timeout=timeout, socket_connect_timeout=timeout)
        assert settings.redis_sentinel_master is not None  # Settings refuses it missing
        return sentinel.master_for(
            settings.redis_sentinel_master, db=db, password=password, **options
        )
    return Redis.from_url(url, **(settings.redis_tls() or {}), **options)


# RabbitMQ queues are declared quorum queues: replicated (Raft) and durable, so a broker
# node's loss keeps the messages a majority holds. Celery's requirements for them, met in
# tasks/celery_app.py: no global QoS (Celery turns it off itself when it sees a quorum
# queue, `worker_detect_quorum_queues`), no ETA/countdown messages (none are sent: a
# waiting batch waits in Redis's schedule), durable and not auto-deleted or exclusive.
QUORUM_QUEUE = {"x-queue-type": "quorum"}


def is_amqp(url: str) -> bool:
    """True for a RabbitMQ broker URL (amqp://, amqps://)."""
    return urlsplit(url).scheme in ("amqp", "amqps")


def broker_queue_arguments(settings: Settings) -> dict[str, Any] | None:
    """The `x-arguments` every queue of the app is declared with: quorum on RabbitMQ,
    none on Redis (where a queue is a list)."""
    return dict(QUORUM_QUEUE) if is_amqp(settings.broker) else None


def broker_options(settings: Settings) -> dict[str, Any]:
    """Celery configuration for the broker on BROKER_URL (else REDIS_URL): its URL in
    kombu's terms, TLS with verification (kombu would otherwise fall back to CERT_NONE
    with a warning), the Sentinel master's name, and for RabbitMQ publisher confirms and
    quorum queues for any queue created on the fly."""
    url = settings.broker
    options: dict[str, Any] = {"broker_url": url}
    transport: dict[str, Any] = {}
    if is_amqp(url):
        # A message published is confirmed by RabbitMQ (for a quorum queue: written by a
        # majority of its replicas) before apply_async returns.
        transport["confirm_publish"] = True
        options["task_create_missing_queue_type"] = "quorum"
        options["task_default_queue_type"] = "quorum"
        # After a lost connection Celery lowers the prefetch of the new consumers by the
        # tasks still running, then raises it back as they end with basic.qos: a no-op on
        # quorum queues, whose QoS is per consumer and fixed when it starts (celery#9512,
        # fixed upstream after 5.6.3 by skipping the reduction in that case). Measured here
        # (tests/e2e/test_rabbitmq_cluster.py): a worker failing over to another node
        # stalled ~60 s with it; without it the drain ended 2-6 s after the kill.
        options["worker_enable_prefetch_count_reduction"] = False
        if urlsplit(url).scheme == "amqps":
            # py-amqp builds the context with ssl.create_default_context: certificate and
            # host name verified against BROKER_CA_FILE's CAs, else the system's; kombu puts
            # the URL's host in for a server_hostname of None.
            context: dict[str, Any] = {"check_hostname": True}
            if settings.broker_ca_file:
                context["cafile"] = settings.broker_ca_file
            options["broker_use_ssl"] = {"context": context, "server_hostname": None}
        options["broker_transport_options"] = transport
        return options
    tls = settings.redis_tls(url)
    if tls is not None:
        options["broker_use_ssl"] = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": tls.get("ssl_ca_certs"),
            # Explicit, as for our clients: kombu hands these to redis-py's SSLConnection,
            # whose default changed between the versions pyproject.toml allows.
            "ssl_check_hostname": True,
        }
    parts = urlsplit(url)
    if parts.scheme == "unix":  # kombu names it redis+socket://
        query = dict(parse_qsl(parts.query))
        db = query.get("db", "0")
        # redis-py takes the password from the userinfo or `?password=`; kombu only from
        # the userinfo of its redis+socket:// URL.
        password = unquote(parts.password) if parts.password else query.get("password")
        username = unquote(parts.username) if parts.username else query.get("username")
        userinfo = ""
        if password or username:
            userinfo = f"{quote(username or '', safe='')}:{quote(password or '', safe='')}@"
        options["broker_url"] = f"redis+socket://{userinfo}{parts.path}?virtual_host={db}"
    if parts.scheme == "sentinel":
        transport["master_name"] = settings.redis_sentinel_master
    options["broker_transport_options"] = transport
    return options
