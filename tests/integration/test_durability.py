"""The durability probe against real redis-servers configured both ways (the pure
verdicts: tests/unit/test_durability.py)."""

from __future__ import annotations

from redis import Redis

from stores.durability import check


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
