"""Unit tests for `config.settings`: defaults (pinned against README's table), env and `.env`,
one-line errors, the secret. Processes stopping at start: tests/integration/test_settings.py."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from config.settings import INSTANCES, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-Secret-Value-0123456789abcdef"


def _setting_env_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No developer environment and no stray `.env` leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith(("BRAZE_", "REDIS_")) or name.upper() in _setting_env_names():
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def settings_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


# --------------------------------------------------------------------------------------
# Defaults (INTERFACE.md)
# --------------------------------------------------------------------------------------


def test_defaults_match_the_interface():
    s = load_settings()
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.braze_rate_limit == 5000
    assert s.braze_rate_limit_window_seconds == 60
    assert s.braze_api_version == "v1"
    assert s.batch_max_identifiers == 50
    assert s.coalesce_interval_seconds == 1
    assert s.braze_api_key is None
    assert s.braze_rest_endpoint is None
    assert s.braze_instance is None
    assert s.rest_endpoint is None


def readme_defaults() -> dict[str, str]:
    """README's configuration table: variable -> its default column, as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Configuration") :]
    table = section[section.index("| variable | default | meaning |") :]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        defaults = cells[1].split(" / ")
        if len(defaults) != len(names):
            defaults = defaults * len(names)
        rows.update(zip(names, defaults, strict=True))
    return rows


# Defaults the table describes in words, not as a value.
WORDED = {
    "IMPORT_JOBS": ("one per CPU", None),
    "HEALTH_DIR": ("temp dir`/braze-subs`", str(Path(tempfile.gettempdir()) / "braze-subs")),
    # Unset: Celery's broker is REDIS_URL (Settings.broker).
    "BROKER_URL": ("`REDIS_URL`", None),
}


# Rows of the table read by other programs, not by the Settings class.
NOT_SETTINGS = {"FLOWER_BASIC_AUTH", "FLOWER_ADDRESS"}


def test_every_setting_has_a_row_in_readme():
    rows = set(readme_defaults())
    assert rows - NOT_SETTINGS == {name.upper() for name in Settings.model_fields}


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_default_is_the_one_readme_documents(field):
    """Every default pinned to the README: attempts, backoff base and cap, claim, redispatch,
    probe, linger, token wait, hold, timeouts and the rest. A default changed in code and not
    in the table (or the other way round) fails here."""
    name = field.upper()
    documented = readme_defaults()[name]
    actual = getattr(load_settings(), field)
    if name in WORDED:
        words, expected = WORDED[name]
        assert (documented, actual) == (words, expected)
        return
    if documented == "—":
        assert actual is None, f"{name}: README says no default, code has {actual!r}"
        return
    written = re.fullmatch(r"`([^`]*)`", documented)
    assert written, f"{name}: README's default {documented!r} is not a `value`"
    value = written.group(1)
    if isinstance(actual, bool):  # written as the environment takes it: true / false
        assert str(actual).lower() == value, f"{name}: README {value!r}, code {actual!r}"
    elif not isinstance(actual, int | float):
        assert str(actual) == value, f"{name}: README {value!r}, code {actual!r}"
    else:
        assert float(value) == actual, f"{name}: README {value}, code {actual}"


def test_the_timing_defaults_users_run():
    """The figures the README's prose relies on (backoff ≈ 20 min over 15 attempts, a claim
    longer than the HTTP timeout, a redispatch longer than the claim), spelled out."""
    s = load_settings()
    assert (s.max_attempts, s.retry_backoff_base_seconds, s.retry_backoff_max_seconds) == (
        15,
        2.0,
        300.0,
    )
    assert (s.http_timeout_seconds, s.batch_claim_seconds, s.batch_redispatch_seconds) == (
        10.0,
        60.0,
        120.0,
    )
    assert s.http_timeout_seconds < s.batch_claim_seconds < s.batch_redispatch_seconds
    assert (s.credentials_probe_seconds, s.token_wait_max_seconds) == (60.0, 2.0)
    assert (s.batch_linger_seconds, s.batch_max_hold_seconds) == (2.0, 30.0)


# --------------------------------------------------------------------------------------
# Every INTERFACE variable is read from the environment
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "attribute", "expected"),
    [
        (
            "REDIS_URL",
            "redis://cache.internal:6380/3",
            "redis_url",
            "redis://cache.internal:6380/3",
        ),
        ("REDIS_URL", "rediss://:pw@cache:6380/0", "redis_url", "rediss://:pw@cache:6380/0"),
        ("BRAZE_RATE_LIMIT", "250000", "braze_rate_limit", 250_000),
        ("BRAZE_RATE_LIMIT_WINDOW_SECONDS", "3600", "braze_rate_limit_window_seconds", 3600),
        ("BRAZE_RATE_LIMIT_WINDOW_SECONDS", "0.5", "braze_rate_limit_window_seconds", 0.5),
        ("BRAZE_API_VERSION", "v2", "braze_api_version", "v2"),
        ("BATCH_MAX_IDENTIFIERS", "7", "batch_max_identifiers", 7),
        ("BATCH_MAX_IDENTIFIERS", "50", "batch_max_identifiers", 50),
        ("COALESCE_INTERVAL_SECONDS", "0.25", "coalesce_interval_seconds", 0.25),
        ("MAX_ATTEMPTS", "3", "max_attempts", 3),
        ("RETRY_BACKOFF_MAX_SECONDS", "12.5", "retry_backoff_max_seconds", 12.5),
        ("BRAZE_REST_ENDPOINT", "https://rest.iad-07.braze.com", "rest_endpoint", None),
        ("BRAZE_INSTANCE", "EU-02", "rest_endpoint", "https://rest.fra-02.braze.eu"),
    ],
)
def test_interface_variable_read_from_env(monkeypatch, name, raw, attribute, expected):
    monkeypatch.setenv(name, raw)
    value = getattr(load_settings(), attribute)
    assert value == (raw if expected is None else expected)


def test_api_key_read_from_env(monkeypatch):
    monkeypatch.setenv("BRAZE_API_KEY", SECRET)
    s = load_settings()
    assert s.braze_api_key is not None
    assert s.braze_api_key.get_secret_value() == SECRET


def test_variable_names_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("braze_rate_limit", "77")
    assert load_settings().braze_rate_limit == 77


def test_overrides_beat_the_environment(monkeypatch):
    monkeypatch.setenv("BRAZE_RATE_LIMIT", "100")
    assert load_settings(braze_rate_limit=200).braze_rate_limit == 200


# --------------------------------------------------------------------------------------
# .env
# --------------------------------------------------------------------------------------


def test_dotenv_is_read_and_env_overrides_it(monkeypatch, clean_env):
    (clean_env / ".env").write_text(
        "BRAZE_RATE_LIMIT=100\n"
        "REDIS_URL=redis://from-dotenv:6379/2\n"
        f"BRAZE_API_KEY={SECRET}\n"
        "BRAZE_INSTANCE=US-03\n"
        "# a comment\n"
        "UNRELATED_VARIABLE=ignored\n",
        encoding="utf-8",
    )
    s = load_settings()
    assert s.braze_rate_limit == 100
    assert s.redis_url == "redis://from-dotenv:6379/2"
    assert s.rest_endpoint == INSTANCES["US-03"]
    assert s.braze_api_key is not None and s.braze_api_key.get_secret_value() == SECRET

    monkeypatch.setenv("BRAZE_RATE_LIMIT", "200")
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/4")
    s = load_settings()
    assert s.braze_rate_limit == 200
    assert s.redis_url == "redis://from-env:6379/4"
    assert s.rest_endpoint == INSTANCES["US-03"]  # still from .env


def test_env_overrides_a_malformed_dotenv_value(monkeypatch, clean_env):
    (clean_env / ".env").write_text("BRAZE_RATE_LIMIT=abc\n", encoding="utf-8")
    assert settings_error(monkeypatch).startswith("BRAZE_RATE_LIMIT")
    monkeypatch.setenv("BRAZE_RATE_LIMIT", "10")
    assert load_settings().braze_rate_limit == 10


def test_malformed_dotenv_value_is_reported_by_name(monkeypatch, clean_env):
    (clean_env / ".env").write_text("BATCH_MAX_IDENTIFIERS=51\n", encoding="utf-8")
    message = settings_error(monkeypatch)
    assert message.startswith("BATCH_MAX_IDENTIFIERS")
    assert "\n" not in message


# --------------------------------------------------------------------------------------
# Malformed values: one line that starts with the variable's name
# --------------------------------------------------------------------------------------

MALFORMED = [
    ("BRAZE_RATE_LIMIT", {"BRAZE_RATE_LIMIT": "abc"}),
    ("BRAZE_RATE_LIMIT", {"BRAZE_RATE_LIMIT": "0"}),
    ("BRAZE_RATE_LIMIT", {"BRAZE_RATE_LIMIT": "-5"}),
    ("BRAZE_RATE_LIMIT_WINDOW_SECONDS", {"BRAZE_RATE_LIMIT_WINDOW_SECONDS": "0"}),
    ("BRAZE_RATE_LIMIT_WINDOW_SECONDS", {"BRAZE_RATE_LIMIT_WINDOW_SECONDS": "nan"}),
    ("BATCH_MAX_IDENTIFIERS", {"BATCH_MAX_IDENTIFIERS": "51"}),
    ("BATCH_MAX_IDENTIFIERS", {"BATCH_MAX_IDENTIFIERS": "0"}),
    ("BRAZE_API_VERSION", {"BRAZE_API_VERSION": "v3"}),
    ("BRAZE_INSTANCE", {"BRAZE_INSTANCE": "US-99"}),
    ("BRAZE_REST_ENDPOINT", {"BRAZE_REST_ENDPOINT": "ftp://x"}),
    ("BRAZE_REST_ENDPOINT", {"BRAZE_REST_ENDPOINT": "rest.iad-01.braze.com"}),
    ("REDIS_URL", {"REDIS_URL": "http://x"}),
    ("COALESCE_INTERVAL_SECONDS", {"COALESCE_INTERVAL_SECONDS": "soon"}),
    ("MAX_ATTEMPTS", {"MAX_ATTEMPTS": "0"}),
    ("RETRY_BACKOFF_MAX_SECONDS", {"RETRY_BACKOFF_MAX_SECONDS": "-1"}),
    ("REDIS_WAIT_REPLICAS", {"REDIS_WAIT_REPLICAS": "-1"}),
    ("REDIS_WAIT_REPLICAS", {"REDIS_WAIT_REPLICAS": "one"}),
    ("REDIS_WAIT_TIMEOUT_MS", {"REDIS_WAIT_TIMEOUT_MS": "0"}),  # WAIT's 0 is "forever"
    ("REDIS_WAIT_TIMEOUT_MS", {"REDIS_WAIT_TIMEOUT_MS": "0.5"}),
    (
        "BRAZE_INSTANCE",
        {"BRAZE_INSTANCE": "US-01", "BRAZE_REST_ENDPOINT": "https://rest.iad-02.braze.com"},
    ),
]


@pytest.mark.parametrize(("variable", "env"), MALFORMED, ids=lambda v: str(v))
def test_malformed_value_gives_one_line_naming_the_variable(monkeypatch, variable, env):
    monkeypatch.setenv("BRAZE_API_KEY", SECRET)
    message = settings_error(monkeypatch, **env)
    assert message.startswith(variable), message
    assert len(message.splitlines()) == 1, message
    assert SECRET not in message


@pytest.mark.parametrize(("variable", "env"), MALFORMED, ids=lambda v: str(v))
def test_settings_error_has_no_secret_in_its_chain(monkeypatch, variable, env):
    monkeypatch.setenv("BRAZE_API_KEY", SECRET)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    assert SECRET not in repr(caught.value)
    assert SECRET not in str(caught.value.__context__ or "")


def test_override_errors_name_the_variable_too():
    with pytest.raises(SettingsError, match=r"^BRAZE_RATE_LIMIT"):
        load_settings(braze_rate_limit=0)


# --------------------------------------------------------------------------------------
# Endpoints and instances
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("instance", "endpoint"), sorted(INSTANCES.items()))
def test_instance_maps_to_the_table(monkeypatch, instance, endpoint):
    monkeypatch.setenv("BRAZE_INSTANCE", instance)
    assert load_settings().rest_endpoint == endpoint


@pytest.mark.parametrize("spelling", ["us-01", "Us-01", " US-01 ", "uS-01"])
def test_instance_is_case_insensitive(monkeypatch, spelling):
    monkeypatch.setenv("BRAZE_INSTANCE", spelling)
    assert load_settings().rest_endpoint == "https://rest.iad-01.braze.com"


def test_instance_table_matches_the_spec():
    assert INSTANCES == {
        "US-01": "https://rest.iad-01.braze.com",
        "US-02": "https://rest.iad-02.braze.com",
        "US-03": "https://rest.iad-03.braze.com",
        "US-04": "https://rest.iad-04.braze.com",
        "US-05": "https://rest.iad-05.braze.com",
        "US-06": "https://rest.iad-06.braze.com",
        "US-08": "https://rest.iad-08.braze.com",
        "EU-01": "https://rest.fra-01.braze.eu",
        "EU-02": "https://rest.fra-02.braze.eu",
    }


def test_instance_and_matching_endpoint_agree(monkeypatch):
    monkeypatch.setenv("BRAZE_INSTANCE", "us-01")
    monkeypatch.setenv("BRAZE_REST_ENDPOINT", "https://rest.iad-01.braze.com/")
    assert load_settings().rest_endpoint == "https://rest.iad-01.braze.com"


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:8080", "http://127.0.0.1:65535/", "http://localhost:9000"]
)
def test_plain_http_local_endpoint_accepted(monkeypatch, endpoint):
    monkeypatch.setenv("BRAZE_REST_ENDPOINT", endpoint)
    assert load_settings().rest_endpoint == endpoint.rstrip("/")


def test_blank_endpoint_counts_as_unset(monkeypatch):
    monkeypatch.setenv("BRAZE_REST_ENDPOINT", "")
    monkeypatch.setenv("BRAZE_INSTANCE", "EU-01")
    assert load_settings().rest_endpoint == INSTANCES["EU-01"]


# --------------------------------------------------------------------------------------
# The API key stays secret
# --------------------------------------------------------------------------------------


def test_api_key_not_in_repr_or_str(monkeypatch):
    monkeypatch.setenv("BRAZE_API_KEY", SECRET)
    monkeypatch.setenv("BRAZE_INSTANCE", "US-01")
    s = load_settings()
    assert SECRET not in repr(s)
    assert SECRET not in str(s)
    assert SECRET not in repr(s.braze_api_key)
    assert SECRET not in str(s.model_dump())


def test_workspace_id_hides_the_key_and_tells_keys_apart():
    endpoint = "https://rest.iad-01.braze.com"
    a = load_settings(braze_api_key=SECRET, braze_rest_endpoint=endpoint)
    a_again = load_settings(braze_api_key=SECRET, braze_rest_endpoint=endpoint)
    b = load_settings(braze_api_key=SECRET + "x", braze_rest_endpoint=endpoint)
    elsewhere = load_settings(
        braze_api_key=SECRET, braze_rest_endpoint="https://rest.fra-01.braze.eu"
    )
    assert SECRET not in a.workspace_id
    assert SECRET[:12] not in a.workspace_id
    assert a.workspace_id == a_again.workspace_id
    assert a.workspace_id != b.workspace_id
    assert a.workspace_id != elsewhere.workspace_id


def test_workspace_id_same_for_instance_and_its_endpoint():
    by_instance = load_settings(braze_api_key=SECRET, braze_instance="US-02")
    by_endpoint = load_settings(
        braze_api_key=SECRET, braze_rest_endpoint="https://rest.iad-02.braze.com/"
    )
    assert by_instance.workspace_id == by_endpoint.workspace_id


def test_workspace_id_without_key_or_endpoint_is_defined():
    assert load_settings().workspace_id


# --------------------------------------------------------------------------------------
# require_braze
# --------------------------------------------------------------------------------------


def test_require_braze_passes_with_key_and_endpoint():
    load_settings(braze_api_key=SECRET, braze_instance="US-01").require_braze()
    load_settings(braze_api_key=SECRET, braze_rest_endpoint="http://127.0.0.1:1").require_braze()


@pytest.mark.parametrize("key", [None, "", "   "])
def test_require_braze_names_the_missing_key(key):
    s = load_settings(braze_api_key=key, braze_instance="US-01")
    with pytest.raises(SettingsError) as caught:
        s.require_braze()
    assert str(caught.value).startswith("BRAZE_API_KEY")
    assert len(str(caught.value).splitlines()) == 1


def test_require_braze_names_the_missing_endpoint():
    s = load_settings(braze_api_key=SECRET)
    with pytest.raises(SettingsError) as caught:
        s.require_braze()
    message = str(caught.value)
    assert message.startswith("BRAZE_REST_ENDPOINT")
    assert len(message.splitlines()) == 1
    assert SECRET not in message


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "unix://"}, "REDIS_URL: unix:// needs the socket's path"),
        ({"REDIS_URL": "sentinel://:26379"}, "REDIS_URL: sentinel URLs are sentinel://HOST:PORT"),
        ({"REDIS_URL": "sentinel://h1:26379"}, "REDIS_SENTINEL_MASTER: required"),
        ({"REDIS_URL": "rediss://h:6380/0?ssl_cert_reqs=none"}, "REDIS_URL: ssl_cert_reqs"),
        ({"REDIS_CA_FILE": "/nonexistent/ca.pem"}, "REDIS_CA_FILE: no such file"),
        ({"REDIS_URL": "redis+cluster://h:7000"}, "BROKER_URL: required with a redis+cluster"),
    ],
)
def test_redis_connection_settings_are_checked_at_start(monkeypatch, env, message):
    found = settings_error(monkeypatch, **env)
    assert found.startswith(message), found
    assert len(found.splitlines()) == 1


def test_rediss_always_verifies_with_the_ca_given(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    monkeypatch.setenv("REDIS_URL", "rediss://h:6380/0")
    verify = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    assert load_settings().redis_tls() == verify
    monkeypatch.setenv("REDIS_CA_FILE", str(ca))
    assert load_settings().redis_tls() == {**verify, "ssl_ca_certs": str(ca)}
    monkeypatch.setenv("REDIS_URL", "redis://h:6379/0")
    assert load_settings().redis_tls() is None


# --------------------------------------------------------------------------------------
# Settings that would break an invariant silently (issue 21, items 8 and 9)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["acme{x}", "a}b", "{braze-subs}", "a b", "a:b", "é", "a*"])
def test_a_key_prefix_that_could_change_the_hash_tag_is_refused(monkeypatch, prefix):
    """`{`/`}` move the hash tag: Python and the Lua scripts (which derive keys from
    KEYS[1]) would name different keys. Only [A-Za-z0-9._-] is allowed."""
    message = settings_error(monkeypatch, REDIS_KEY_PREFIX=prefix)
    assert message.startswith("REDIS_KEY_PREFIX: only letters, digits"), message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("prefix", ["braze-subs", "acme.subs_2", "A-b.C_9"])
def test_a_plain_key_prefix_is_accepted(monkeypatch, prefix):
    monkeypatch.setenv("REDIS_KEY_PREFIX", prefix)
    assert load_settings().redis_key_prefix == prefix


@pytest.mark.parametrize(
    "env",
    [
        {"BATCH_CLAIM_SECONDS": "10.5", "HTTP_TIMEOUT_SECONDS": "10"},
        {"BATCH_CLAIM_SECONDS": "11", "HTTP_TIMEOUT_SECONDS": "10"},
        {
            "BATCH_CLAIM_SECONDS": "20",
            "HTTP_TIMEOUT_SECONDS": "10",
            "HEARTBEAT_INTERVAL_SECONDS": "10",
            "HEARTBEAT_TTL_SECONDS": "30",
        },
    ],
)
def test_a_claim_the_fence_would_refuse_is_refused_at_start_naming_both(monkeypatch, env):
    """The fence needs more than HTTP_TIMEOUT_SECONDS of lease left, renewed every
    heartbeat interval: a lease not above their sum never (or not always) lets a send go."""
    message = settings_error(monkeypatch, **env)
    assert message.startswith("BATCH_CLAIM_SECONDS: must exceed HTTP_TIMEOUT_SECONDS"), message
    assert "HEARTBEAT_INTERVAL_SECONDS" in message
    assert len(message.splitlines()) == 1


def test_a_claim_just_above_timeout_plus_heartbeat_is_accepted(monkeypatch):
    monkeypatch.setenv("BATCH_CLAIM_SECONDS", "11.5")
    monkeypatch.setenv("HTTP_TIMEOUT_SECONDS", "10")
    assert load_settings().batch_claim_seconds == 11.5


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://rest.iad-01.braze.com",
        "http://10.0.0.5:8700",
        "http://simulator:8700",
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io",
    ],
)
def test_plain_http_to_a_host_that_is_not_loopback_is_refused(monkeypatch, endpoint):
    """The key would travel in clear text."""
    monkeypatch.setenv("BRAZE_API_KEY", SECRET)
    message = settings_error(monkeypatch, BRAZE_REST_ENDPOINT=endpoint)
    assert message.startswith("BRAZE_REST_ENDPOINT: http:// would send the API key"), message
    assert "BRAZE_ALLOW_INSECURE_HTTP" in message
    assert len(message.splitlines()) == 1
    assert SECRET not in message


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:8700", "http://127.8.0.1:80", "http://[::1]:8700", "http://LOCALHOST:1"],
)
def test_plain_http_to_loopback_is_accepted(monkeypatch, endpoint):
    monkeypatch.setenv("BRAZE_REST_ENDPOINT", endpoint)
    assert load_settings().rest_endpoint == endpoint


def test_plain_http_elsewhere_only_when_allowed(monkeypatch):
    monkeypatch.setenv("BRAZE_REST_ENDPOINT", "http://simulator:8700")
    monkeypatch.setenv("BRAZE_ALLOW_INSECURE_HTTP", "true")
    assert load_settings().rest_endpoint == "http://simulator:8700"


def test_the_exporter_binds_loopback_unless_told(monkeypatch):
    assert load_settings().metrics_address == "127.0.0.1"
    monkeypatch.setenv("METRICS_ADDRESS", "0.0.0.0")
    assert load_settings().metrics_address == "0.0.0.0"
