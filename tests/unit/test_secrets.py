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
