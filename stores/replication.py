"""WAIT-acknowledged enqueues (REDIS_WAIT_REPLICAS, REDIS_WAIT_TIMEOUT_MS).

Redis replicates asynchronously: an enqueue the master has answered may not have reached a
replica yet, and a failover after a crash of the master loses it (README "State on a Redis
Cluster", "Failover"). With `REDIS_WAIT_REPLICAS=N` every enqueue call (one script call,
one chunk) is followed by `WAIT N REDIS_WAIT_TIMEOUT_MS` on the same connection: Redis
answers once N replicas have acknowledged every write that connection made, or at the
timeout with how many did. Fewer than N is `NotReplicated` for the producer.

WAIT counts the writes of its own connection, so it must run on the connection that made
the write: a pipeline (one connection) holding the script call and the WAIT, sent to the
node that took the write. On a Redis Cluster redis-py sends a WAIT of its own to every node
(no key: its "all nodes" commands) and adds the answers up, which says nothing about the
write; `write_node` finds the master of the workspace's slot and the pipeline goes there.

What WAIT does not do: it is no strong consistency. The change is on N replicas when it
answers; a failover may still promote a replica that was not among them (with several
replicas per master), and a `NotReplicated` write may survive all the same. Re-sending a
change is safe: the change that occurred last wins (equal times: the later), so the same
change sent twice ends in the same state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, ClusterDownError, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.settings import Settings
from core.errors import BrazeSubsError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """How many replicas must acknowledge each enqueue, within how many milliseconds
    (`replicas` 0: no WAIT, Redis's asynchronous replication as it is)."""

    replicas: int = 0
    timeout_ms: int = 500

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplicaWait:
        return cls(settings.redis_wait_replicas, settings.redis_wait_timeout_ms)

    @property
    def on(self) -> bool:
        return self.replicas > 0

    def command(self) -> tuple[str, int, int]:
        return ("WAIT", self.replicas, self.timeout_ms)

    def check(self, acknowledged: int, changes: int) -> None:
        """Raise `NotReplicated` if fewer replicas than asked acknowledged the write of
        `changes` changes."""
        if int(acknowledged) < self.replicas:
            raise NotReplicated(self, int(acknowledged), changes)


class NotReplicated(BrazeSubsError, RedisError):
    """Fewer replicas than REDIS_WAIT_REPLICAS acknowledged an enqueue within
    REDIS_WAIT_TIMEOUT_MS. The master applied it; it may or may not survive a failover.
    A RedisError too, so every enqueue path reports it as Redis refusing writes (the HTTP
    API's 503, the import's resume point) and a BrazeSubsError for the CLI's one line."""

    def __init__(self, wait: ReplicaWait, acknowledged: int, changes: int) -> None:
        self.acknowledged = acknowledged
        self.changes = changes
        super().__init__(
            f"REDIS_WAIT_REPLICAS={wait.replicas}: {acknowledged} replica(s) acknowledged "
            f"{changes} change(s) within REDIS_WAIT_TIMEOUT_MS={wait.timeout_ms}: applied, "
            "but a failover may lose them; sending them again is safe"
        )


def write_node(client: Redis, key: str) -> Redis:
    """A plain client of the node that takes writes of `key`: `client` itself, or on a
    Redis Cluster the client of the master serving the key's slot as the cluster client
    knows it now (a pipeline there runs on one connection, so a WAIT in it counts the
    pipeline's writes). `on_write_node` learns the slot map again when it is stale."""
    if isinstance(client, RedisCluster):
        cluster: RedisCluster = client
        return cluster.get_redis_connection(cluster.get_node_from_key(key))
    return client


# What a node of a cluster answers when it no longer serves the slot (or cannot be
# reached: a master that died): the slot map is learnt again and the call made once more.
_MAP_STALE = (AskError, ClusterDownError, TryAgainError, RedisConnectionError, RedisTimeoutError)
MAP_ATTEMPTS = 3


def on_write_node(client: Redis, key: str, call: Callable[[Redis], T]) -> T:
    """`call(node)` on the node that takes writes of `key` (`write_node`). On a Redis
    Cluster a MOVED/ASK (a failover, a slot moved), CLUSTERDOWN, TRYAGAIN or a connection
    error makes the cluster client learn the slot map again, and the call goes again to
    the master the map names, up to `MAP_ATTEMPTS` times: what RedisCluster does for the
    commands it routes itself, which a call on one node's client bypasses. An enqueue
    sent twice is harmless (the same change at the same time ends in the same state)."""
    if not isinstance(client, RedisCluster):
        return call(client)
    cluster: RedisCluster = client
    for attempt in range(1, MAP_ATTEMPTS + 1):
        try:
            return call(write_node(cluster, key))
        except _MAP_STALE:
            if attempt == MAP_ATTEMPTS:
                raise
            cluster.nodes_manager.initialize()
    raise AssertionError("unreachable")


def replicas_short(client: Redis, key: str, wait: ReplicaWait) -> str | None:
    """One sentence when the node that takes `key`'s writes has fewer replicas connected
    than `wait` asks, so that every enqueue would be refused (after a failover that left
    the promoted master alone, say); None when there are enough, when `wait` is off, or
    when the node will not say."""
    if not wait.on:
        return None
    try:
        replication = write_node(client, key).info("replication")
    except RedisError:
        return None
    connected = int(replication.get("connected_slaves", 0))
    if connected >= wait.replicas:
        return None
    return (
        f"REDIS_WAIT_REPLICAS={wait.replicas} but the master taking the enqueues has "
        f"{connected} replica(s) connected: every enqueue is refused until "
        f"{wait.replicas} are"
    )
