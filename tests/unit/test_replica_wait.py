"""REDIS_WAIT_REPLICAS / REDIS_WAIT_TIMEOUT_MS as the enqueue paths read them
(`stores.replication`): off by default, and a shortfall is one line naming both settings,
an error every enqueue path already reports (a RedisError, a BrazeSubsError)."""

from __future__ import annotations

import pytest
from redis.exceptions import RedisError

from config.settings import load_settings
from core.errors import EXIT_ENVIRONMENT, BrazeSubsError
from stores.replication import NotReplicated, ReplicaWait


@pytest.fixture(autouse=True)
def no_wait_in_env(monkeypatch):
    for name in ("REDIS_WAIT_REPLICAS", "REDIS_WAIT_TIMEOUT_MS"):
        monkeypatch.delenv(name, raising=False)


def test_off_by_default_no_wait_is_sent():
    wait = ReplicaWait.from_settings(load_settings())
    assert (wait.replicas, wait.timeout_ms, wait.on) == (0, 500, False)


def test_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("REDIS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("REDIS_WAIT_TIMEOUT_MS", "250")
    wait = ReplicaWait.from_settings(load_settings())
    assert wait.on and wait.command() == ("WAIT", 2, 250)


def test_enough_acknowledgements_pass():
    ReplicaWait(2, 100).check(2, 1000)
    ReplicaWait(1, 100).check(3, 1)


def test_a_shortfall_is_one_line_naming_both_settings():
    with pytest.raises(NotReplicated) as caught:
        ReplicaWait(2, 300).check(1, 1000)
    message = str(caught.value)
    assert message.startswith("REDIS_WAIT_REPLICAS=2: 1 replica(s) acknowledged 1000")
    assert "REDIS_WAIT_TIMEOUT_MS=300" in message and "\n" not in message
    assert "sending them again is safe" in message
    assert len(message) < 200  # the import quotes up to 200 characters of it
    assert isinstance(caught.value, RedisError) and isinstance(caught.value, BrazeSubsError)
    assert caught.value.exit_code == EXIT_ENVIRONMENT
    assert (caught.value.acknowledged, caught.value.changes) == (1, 1000)
