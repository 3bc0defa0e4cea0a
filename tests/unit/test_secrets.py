"""Issue 10, secrets (pure): a key with surrounding whitespace, a key that cannot go in a
header, every password of a sentinel list hidden. Over HTTP and Redis:
tests/integration/test_secrets.py."""

from __future__ import annotations

import pytest

from config.settings import SettingsError, load_settings

KEY = "sk-Secret-Value-0123456789abcdef"


@pytest.mark.parametrize("raw", [f"{KEY}\n", f"  {KEY} ", f"\t{KEY}\r\n"])
def test_surrounding_whitespace_is_stripped_from_the_key(monkeypatch, raw):
    monkeypatch.setenv("BRAZE_API_KEY", raw)
    settings = load_settings()
    assert settings.braze_api_key is not None
    assert settings.braze_api_key.get_secret_value() == KEY
    # One workspace (one rate budget) whatever whitespace a deployment leaves around it.
    monkeypatch.setenv("BRAZE_API_KEY", KEY)
    assert load_settings().workspace_id == settings.workspace_id


@pytest.mark.parametrize("raw", [f"{KEY[:5]} {KEY[5:]}", f"{KEY}\x7fx", f"{KEY}é", f"a\nb{KEY}"])
def test_a_key_that_cannot_go_in_a_header_is_refused_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("BRAZE_API_KEY", raw)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("BRAZE_API_KEY: ")
    assert "header" in message
    assert len(message.splitlines()) == 1
    assert KEY[:8] not in message and KEY[-8:] not in message


def test_every_password_of_a_sentinel_list_is_hidden_in_messages():
    from admin.cli import redact_url

    url = "sentinel://:pw-one@h1:26379;sentinel://:pw-two@h2:26379/0"
    shown = redact_url(url)
    assert "pw-one" not in shown and "pw-two" not in shown
    assert shown.count("***") == 2


@pytest.mark.parametrize(
    "url",
    [
        "unix:///run/redis.sock?password=s3cret-pw&db=0",
        "redis://h:6379/0?password=s3cret-pw",
        "unix://:s3cret-pw@/run/redis.sock?db=1",
        "sentinel://h1:26379;sentinel://h2:26379/0?password=s3cret-pw",
    ],
)
def test_a_password_in_the_query_is_hidden_in_messages_too(url):
    """redis-py reads `?password=` as well as the userinfo: both are credentials."""
    from core.redaction import redact_url

    shown = redact_url(url)
    assert "s3cret-pw" not in shown and "***" in shown
    assert shown.split("://", 1)[0] == url.split("://", 1)[0]
    assert "/run/redis.sock" in shown or "h" in shown


def test_rediss_checks_the_host_name_explicitly_for_our_clients_and_the_broker():
    """Not left to redis-py's default, which changed between the versions pyproject.toml
    allows (off before 6.0)."""
    from stores.connection import broker_options

    settings = load_settings(redis_url="rediss://h:6380/0")
    assert settings.redis_tls()["ssl_check_hostname"] is True
    assert broker_options(settings)["broker_use_ssl"]["ssl_check_hostname"] is True


@pytest.mark.parametrize(
    ("url", "broker"),
    [
        ("unix:///run/r.sock?db=2", "redis+socket:///run/r.sock?virtual_host=2"),
        ("unix://:p%40ss@/run/r.sock?db=1", "redis+socket://:p%40ss@/run/r.sock?virtual_host=1"),
        (
            "unix:///run/r.sock?password=p@ss&db=3",
            "redis+socket://:p%40ss@/run/r.sock?virtual_host=3",
        ),
    ],
)
def test_a_unix_socket_password_reaches_the_broker(url, broker):
    """kombu's redis+socket:// takes the password only from its userinfo."""
    from stores.connection import broker_options

    assert broker_options(load_settings(redis_url=url))["broker_url"] == broker
