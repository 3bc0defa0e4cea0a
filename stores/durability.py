"""Whether the Redis in use can keep the no-loss promise: the buffer, the batch records and
the dead letters live only there, so Redis must persist them and must never evict them.

`findings` is pure (the server's configuration in, the problems out); `check` reads the
configuration with CONFIG GET, which managed services (ElastiCache, Memorystore…) may refuse,
in which case it says it could not tell rather than guess.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisError

log = logging.getLogger("braze_subs.durability")

# Policies under which Redis deletes keys to make room: any of ours could go.
EVICTING = {
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
}


def findings(config: Mapping[str, str]) -> list[str]:
    """What in this configuration can lose changes, one sentence each; empty when sound."""
    found = []
    policy = config.get("maxmemory-policy", "noeviction")
    # volatile-* only evict keys with a TTL, and some of ours (claims, locks) carry one.
    if policy in EVICTING:
        found.append(
            f"maxmemory-policy is {policy}: Redis may evict pending changes or batch records "
            "when memory is full; set it to noeviction"
        )
    append_only = config.get("appendonly", "no") == "yes"
    snapshots = bool(config.get("save", "").strip())
    if not append_only and not snapshots:
        found.append(
            "persistence is off (appendonly no, no save points): a Redis restart loses every "
            "pending change; set appendonly yes"
        )
    elif not append_only:
        found.append(
            "only RDB snapshots are on: a Redis crash loses the changes since the last "
            "snapshot; set appendonly yes (appendfsync everysec)"
        )
    elif config.get("appendfsync", "everysec") == "no":
        found.append("appendfsync is no: the OS decides when writes reach the disk; use everysec")
    return found


def check(client: Redis) -> list[str] | None:
    """The findings for the server behind `client`, or None if it would not say. On a
    Redis Cluster, every node's (masters and replicas: a replica promoted by a failover
    serves with its own configuration), each finding naming the nodes it holds for."""
    if isinstance(client, RedisCluster):
        nodes: dict[str, list[str]] = {}
        for name, node, owned in _cluster_nodes(client):
            found = _check_one(node)
            if owned:
                node.close()
            if found is None:
                return None
            for finding in found:
                nodes.setdefault(finding, []).append(name)
        return [f"{finding} (nodes {', '.join(sorted(names))})" for finding, names in nodes.items()]
    return _check_one(client)


def _cluster_nodes(client: RedisCluster) -> list[tuple[str, Redis, bool]]:
    """(host:port, client, made here: close it after use) of every master the cluster
    client knows and of each master's replicas (redis-py keeps only the masters unless
    it reads from replicas; their addresses come from the master's INFO replication),
    with the client's credentials and TLS."""
    found: list[tuple[str, Redis, bool]] = []
    options = dict(client.nodes_manager.connection_kwargs)
    for node in client.get_nodes():
        master = client.get_redis_connection(node)
        found.append((node.name, master, False))
        try:
            replication = master.info("replication")
        except RedisError:
            continue
        for index in range(int(replication.get("connected_slaves", 0))):
            replica = replication.get(f"slave{index}")
            if isinstance(replica, dict) and "ip" in replica and "port" in replica:
                options.update(host=replica["ip"], port=int(replica["port"]))
                name = f"{replica['ip']}:{replica['port']}"
                found.append((name, Redis(**options), True))
    return found


def _check_one(client: Redis) -> list[str] | None:
    pipe = client.pipeline(transaction=False)
    for name in ("maxmemory-policy", "appendonly", "appendfsync", "save"):
        pipe.config_get(name)
    try:
        answers = pipe.execute()
    except RedisError:
        return None
    config = {_text(key): _text(value) for answer in answers for key, value in answer.items()}
    return findings(config)


def warn_if_unsafe(client: Redis) -> None:
    """One WARNING line per finding, at process start."""
    found = check(client)
    if found is None:
        log.info("could not read the Redis configuration (CONFIG GET refused); check persistence")
        return
    for finding in found:
        log.warning("redis: %s", finding)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
