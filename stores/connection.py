"""Redis clients for REDIS_URL: redis://, rediss:// (certificate verified), unix:// and
sentinel:// (the master the sentinels name, followed across a failover).

Every braze-subs Redis client is made here, so TLS and Sentinel are configured in one
place; the Celery broker gets the same from `broker_options` (tasks/celery_app.py).
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from redis import Redis
from redis.sentinel import Sentinel

from config.settings import Settings


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


def redis_client(settings: Settings, **options: Any) -> Redis:
    """A client of the Redis that REDIS_URL names. `options` go to each connection
    (timeouts, health checks)."""
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


def broker_options(settings: Settings) -> dict[str, Any]:
    """Celery configuration for the broker on REDIS_URL: its URL in kombu's terms, TLS
    with verification (kombu would otherwise fall back to CERT_NONE with a warning) and
    the Sentinel master's name."""
    url = settings.redis_url
    options: dict[str, Any] = {"broker_url": url}
    transport: dict[str, Any] = {}
    tls = settings.redis_tls()
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
