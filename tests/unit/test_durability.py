"""Whether a Redis configuration can keep the no-loss promise (pure; the probe against
real redis-servers: tests/integration/test_durability.py)."""

from __future__ import annotations

import pytest

from stores.durability import findings

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
