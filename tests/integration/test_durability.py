"""Whether a Redis configuration can keep the no-loss promise (pure), and the probe against
real redis-servers configured both ways."""

from __future__ import annotations

import pytest
from redis import Redis

from stores.durability import check, findings

SOUND = {
    "maxmemory-policy": "noeviction",
    "appendonly": "yes",
    "appendfsync": "everysec",
    "save": "",
}


def test_append_only_without_eviction_is_sound():
    assert findings(SOUND) == []
    assert findings({**SOUND, "appendfsync": "always", "save": "3600 1"}) == []


@pytest.mark.parametrize(
    "policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl"]
)
def test_an_evicting_policy_is_named(policy):
    (finding,) = findings({**SOUND, "maxmemory-policy": policy})
    assert policy in finding and "noeviction" in finding


def test_no_persistence_at_all():
    (finding,) = findings({**SOUND, "appendonly": "no", "save": ""})
    assert "persistence is off" in finding


def test_snapshots_only_lose_the_last_minutes():
    (finding,) = findings({**SOUND, "appendonly": "no", "save": "3600 1 300 100"})
    assert "RDB snapshots" in finding and "appendonly yes" in finding


def test_fsync_left_to_the_os():
    (finding,) = findings({**SOUND, "appendfsync": "no"})
    assert "appendfsync is no" in finding


def test_everything_wrong_at_once():
    assert len(findings({"maxmemory-policy": "allkeys-lru", "appendonly": "no", "save": ""})) == 2


def test_the_probe_reads_a_real_server(redis_client: Redis):
    saved = {
        name: redis_client.config_get(name)[name]
        for name in ("appendonly", "save", "maxmemory-policy")
    }
    try:
        redis_client.config_set("appendonly", "no")
        redis_client.config_set("save", "")
        redis_client.config_set("maxmemory-policy", "allkeys-lru")
        found = check(redis_client)
        assert found is not None and len(found) == 2
        redis_client.config_set("maxmemory-policy", "noeviction")
        redis_client.config_set("appendonly", "yes")
        assert check(redis_client) == []
    finally:
        for name, value in saved.items():
            redis_client.config_set(name, value)


def test_a_server_that_refuses_config_get_is_unknown_not_sound(redis_client: Redis):
    redis_client.acl_setuser(
        "producer", enabled=True, passwords=["+pw"], commands=["+@all", "-config"], keys=["*"]
    )
    try:
        port = redis_client.connection_pool.connection_kwargs["port"]
        restricted = Redis(host="127.0.0.1", port=port, username="producer", password="pw")
        assert check(restricted) is None
    finally:
        redis_client.acl_deluser("producer")
