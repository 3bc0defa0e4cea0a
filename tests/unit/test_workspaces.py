"""Issue 23's spine, pure parts: BRAZE_WORKSPACES_FILE (config/workspaces.py), each
workspace's key space (stores/keys.py) and routing (core/routing.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.settings import SettingsError, load_settings
from config.workspaces import load_workspaces
from core.changes import InvalidChange, parse_change
from core.routing import DEFAULT_WORKSPACE, Routes
from stores.keys import Keys

SECRET = "ws-secret-key-0123456789abcdef"
ROW = {"subscription_group_id": "g-us", "subscription_state": "subscribed", "external_id": "u1"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "workspaces.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, **settings: object):
    path = write(tmp_path, text)
    return load_workspaces(load_settings(braze_workspaces_file=str(path), **settings))


def refused(tmp_path: Path, text: str, **settings: object) -> str:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, text, **settings)
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message
    assert message.startswith("BRAZE_WORKSPACES_FILE: ")
    return message


TWO = """
[workspaces.us]
rest_endpoint = "https://rest.iad-01.braze.com"
api_key_env = "WS_TEST_KEY_US"
groups = ["g-us", "g-shared-name"]
rate_limit = 4000

[workspaces.eu]
rest_endpoint = "https://rest.fra-01.braze.eu/"
api_key_file = "eu.key"
groups = ["g-eu"]
rate_limit_window_seconds = 30
read_rate_limit = 1000
"""


@pytest.fixture
def keys_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_TEST_KEY_US", SECRET + "-us")
    (tmp_path / "eu.key").write_text(f"  {SECRET}-eu\n", encoding="utf-8")


# --- the file -----------------------------------------------------------------------------


def test_without_the_file_the_settings_are_workspace_default():
    settings = load_settings(braze_api_key=SECRET, braze_rest_endpoint="https://x.example")
    workspaces = load_workspaces(settings)
    assert workspaces.names == (DEFAULT_WORKSPACE,)
    only = workspaces[DEFAULT_WORKSPACE]
    assert only.rest_endpoint == "https://x.example" and only.api_key is not None
    assert only.api_key.get_secret_value() == SECRET
    same = settings.for_workspace(only)
    assert same.workspace_name == DEFAULT_WORKSPACE
    assert same.workspace_id == settings.workspace_id  # the budget's key name unchanged
    assert settings.workspace_name == DEFAULT_WORKSPACE


def test_a_file_of_two_workspaces(tmp_path, keys_present):
    workspaces = load(tmp_path, TWO, braze_rate_limit=5000, braze_read_rate_limit=250_000)
    assert workspaces.names == ("us", "eu")
    us, eu = workspaces["us"], workspaces["eu"]
    assert us.groups == {"g-us", "g-shared-name"} and eu.groups == {"g-eu"}
    assert us.api_key is not None and us.api_key.get_secret_value() == SECRET + "-us"
    assert eu.api_key is not None and eu.api_key.get_secret_value() == SECRET + "-eu"
    assert eu.rest_endpoint == "https://rest.fra-01.braze.eu"
    workspaces.require_keys()
    assert SECRET not in repr(workspaces) + repr(us) + repr(eu)


def test_for_workspace_takes_the_tables_values_and_the_settings_for_the_rest(
    tmp_path, keys_present
):
    settings = load_settings(
        braze_workspaces_file=str(write(tmp_path, TWO)),
        braze_api_key="global-key-0123456789",
        braze_instance="US-02",
        braze_rate_limit=5000,
        braze_rate_limit_window_seconds=60,
        braze_read_rate_limit=250_000,
    )
    workspaces = load_workspaces(settings)
    us = settings.for_workspace(workspaces["us"])
    eu = settings.for_workspace(workspaces["eu"])
    assert (us.workspace_name, eu.workspace_name) == ("us", "eu")
    assert us.rest_endpoint == "https://rest.iad-01.braze.com"
    assert eu.rest_endpoint == "https://rest.fra-01.braze.eu"
    assert us.braze_api_key is not None and us.braze_api_key.get_secret_value().endswith("-us")
    assert (us.braze_rate_limit, us.braze_rate_limit_window_seconds) == (4000, 60)
    assert (eu.braze_rate_limit, eu.braze_rate_limit_window_seconds) == (5000, 30)
    assert (us.braze_read_rate_limit, eu.braze_read_rate_limit) == (250_000, 1000)
    assert us.workspace_id != eu.workspace_id
    assert SECRET not in us.workspace_id + eu.workspace_id
    # The settings themselves are untouched.
    assert settings.workspace_name == DEFAULT_WORKSPACE and settings.braze_rate_limit == 5000
    us.require_braze()
    eu.require_braze()


def test_a_group_listed_in_two_workspaces_is_refused_naming_it_and_both_tables(
    tmp_path, keys_present
):
    text = TWO.replace('groups = ["g-eu"]', 'groups = ["g-eu", "g-us"]')
    message = refused(tmp_path, text)
    assert "'g-us'" in message
    assert "[workspaces.us] groups" in message and "[workspaces.eu] groups" in message


def test_a_group_listed_twice_in_one_table(tmp_path, keys_present):
    message = refused(tmp_path, TWO.replace('["g-eu"]', '["g-eu", " g-eu"]'))
    assert "[workspaces.eu] groups: group 'g-eu' listed twice" in message


@pytest.mark.parametrize(
    ("replace", "by", "names"),
    [
        ('api_key_env = "WS_TEST_KEY_US"\n', "", "[workspaces.us] api_key_env / api_key_file"),
        (
            'api_key_env = "WS_TEST_KEY_US"\n',
            'api_key_env = "WS_TEST_KEY_US"\napi_key_file = "us.key"\n',
            "[workspaces.us] api_key_env / api_key_file",
        ),
        (
            'api_key_env = "WS_TEST_KEY_US"\n',
            f'api_key_env = "{SECRET}-not a name"\n',
            "[workspaces.us] api_key_env",
        ),
        (
            'api_key_env = "WS_TEST_KEY_US"\n',
            f'api_key = "{SECRET}"\napi_key_env = "WS_TEST_KEY_US"\n',
            "[workspaces.us] api_key: unknown field",
        ),
        ('rest_endpoint = "https://rest.iad-01.braze.com"\n', "", "[workspaces.us] rest_endpoint"),
        ('"https://rest.iad-01.braze.com"', '"ftp://x"', "[workspaces.us] rest_endpoint"),
        (
            '"https://rest.iad-01.braze.com"',
            '"http://braze.example.com"',
            "[workspaces.us] rest_endpoint: http://",
        ),
        ("rate_limit = 4000", "rate_limit = 0", "[workspaces.us] rate_limit"),
        ("rate_limit = 4000", "rate_limit = true", "[workspaces.us] rate_limit"),
        ("rate_limit = 4000", 'rate_limit = "4000"', "[workspaces.us] rate_limit"),
        (
            "rate_limit_window_seconds = 30",
            "rate_limit_window_seconds = -1.5",
            "[workspaces.eu] rate_limit_window_seconds",
        ),
        ("read_rate_limit = 1000", "read_rate_limit = 1.5", "[workspaces.eu] read_rate_limit"),
        ('groups = ["g-eu"]', 'groups = "g-eu"', "[workspaces.eu] groups"),
        ('groups = ["g-eu"]', 'groups = ["g-eu", ""]', "[workspaces.eu] groups: item 2"),
        ("rate_limit = 4000", "colour = 1", "[workspaces.us] colour: unknown field"),
        ("[workspaces.eu]", '[workspaces."e u"]', "the name must be"),
        ("[workspaces.eu]", "[workspaces.eu.nested]", "[workspaces.eu] nested: unknown field"),
    ],
)
def test_a_bad_table_is_one_line_naming_table_and_field(tmp_path, keys_present, replace, by, names):
    assert replace in TWO
    message = refused(tmp_path, TWO.replace(replace, by, 1))
    assert names in message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "has no [workspaces.NAME] table"),
        ("[other]\nx = 1\n", "unknown top-level entry 'other'"),
        ("[workspaces]\n", "has no [workspaces.NAME] table"),
        ("[workspaces.us\n", "is not valid TOML"),
        ("workspaces = 3\n", "has no [workspaces.NAME] table"),
    ],
)
def test_a_bad_file_is_one_line(tmp_path, text, says):
    assert says in refused(tmp_path, text)


def test_the_file_itself_missing_or_unreadable(tmp_path):
    with pytest.raises(SettingsError, match=r"^BRAZE_WORKSPACES_FILE: no such file"):
        load_settings(braze_workspaces_file=str(tmp_path / "absent.toml"))
    path = write(tmp_path, TWO)
    settings = load_settings(braze_workspaces_file=str(path))
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(SettingsError, match=r"^BRAZE_WORKSPACES_FILE: cannot read .*not UTF-8"):
        load_workspaces(settings)


def test_a_missing_key_is_reported_where_a_key_is_needed(tmp_path, monkeypatch):
    """Producers enqueue without keys (as without the file): the file loads, and the missing
    variable or unreadable file is one line naming the table and field when a key is
    required (a worker's start, a post)."""
    monkeypatch.delenv("WS_TEST_KEY_US", raising=False)
    (tmp_path / "eu.key").mkdir()  # unreadable as a file
    path = write(tmp_path, TWO)
    settings = load_settings(braze_workspaces_file=str(path))
    workspaces = load_workspaces(settings)
    assert workspaces["us"].api_key is None and workspaces["eu"].api_key is None
    with pytest.raises(SettingsError) as caught:
        workspaces.require_keys()
    assert str(caught.value) == (
        "BRAZE_WORKSPACES_FILE: [workspaces.us] api_key_env: the variable WS_TEST_KEY_US is "
        "not set (it holds the API key)"
    )
    with pytest.raises(SettingsError, match=r"^BRAZE_WORKSPACES_FILE: \[workspaces\.eu\] "):
        settings.for_workspace(workspaces["eu"]).require_braze()
    with pytest.raises(SettingsError) as caught:
        workspaces["eu"].require_key()
    message = str(caught.value)
    assert "[workspaces.eu] api_key_file: cannot read" in message and "eu.key" in message


def test_a_key_that_cannot_go_in_a_header_is_refused_without_showing_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WS_TEST_KEY_US", SECRET + " with a space")
    (tmp_path / "eu.key").write_text(SECRET, encoding="utf-8")
    message = refused(tmp_path, TWO)
    assert "[workspaces.us] api_key_env: the key in the variable WS_TEST_KEY_US" in message


def test_a_key_in_the_env_file_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv("WS_TEST_KEY_US", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"WS_TEST_KEY_US={SECRET}\n", encoding="utf-8")
    (tmp_path / "eu.key").write_text(SECRET, encoding="utf-8")
    workspaces = load(tmp_path, TWO)
    workspaces.require_keys()
    assert workspaces["us"].api_key is not None


def test_a_workspace_named_default_in_the_file(tmp_path, keys_present):
    workspaces = load(tmp_path, TWO.replace("[workspaces.us]", "[workspaces.default]"))
    assert workspaces.names == ("default", "eu")


# --- keys ---------------------------------------------------------------------------------


def test_the_default_workspace_keeps_todays_keys():
    """An existing deployment's keys (without the file, or with a workspace named
    `default`) are exactly those of before workspaces: what is in flight stays found."""
    assert Keys("braze-subs").pending == "{braze-subs}:pending"
    assert Keys("braze-subs", "default").pending == "{braze-subs}:pending"
    assert Keys("braze-subs", "default") == Keys("braze-subs")
    assert Keys("p").limiter("host:abc") == "{p}:limiter:host:abc"
    assert Keys("p").batch("b1") == "{p}:batch:b1"


def test_another_workspace_has_a_hash_tag_of_its_own():
    us = Keys("braze-subs", "us")
    assert us.tag == "{braze-subs/us}"
    assert us.pending == "{braze-subs/us}:pending"
    assert us.credentials == "{braze-subs/us}:credentials"
    assert us.dead_letters.startswith("{braze-subs/us}:")
    names = [
        value
        for name in dir(Keys)
        if isinstance(getattr(Keys, name), property) and name not in ("tag", "deployment")
        for value in [getattr(us, name)]
        if isinstance(value, str)
    ]
    assert len(names) > 20
    default = Keys("braze-subs")
    deployment_wide = {default.api_requests, default.beat_seen, default.served_workspaces}
    for name in names:
        if name in deployment_wide:
            continue
        assert re.match(r"\{braze-subs/us\}:", name), name
    # Deployment-wide keys stay in the default tag whichever workspace names them.
    assert us.api_requests == "{braze-subs}:api:requests"
    assert us.beat_seen == "{braze-subs}:beat:seen"
    assert us.served_workspaces == "{braze-subs}:workspaces:served"


def test_no_two_workspaces_share_a_key_space():
    tags = {
        Keys(prefix, name).tag for prefix in ("a", "a.b", "b") for name in ("default", "b", "x")
    }
    assert len(tags) == 9
    with pytest.raises(ValueError):
        Keys("a", "b/c")
    with pytest.raises(ValueError):
        Keys("a", "{x}")


# --- routing ------------------------------------------------------------------------------

ROUTES = Routes(("us", "eu"), {"g-us": "us", "g-eu": "eu"})


def test_a_named_workspace_wins():
    assert ROUTES.route("g-unlisted", "eu") == "eu"
    assert ROUTES.route("g-eu", "eu") == "eu"


def test_else_the_groups_workspace():
    assert ROUTES.route("g-us") == "us"
    assert ROUTES.route("g-eu") == "eu"


def test_a_commands_fallback_comes_after_the_groups_workspace():
    assert ROUTES.route("g-unlisted", None, "eu") == "eu"
    assert ROUTES.route("g-us", None, "eu") == "us"
    assert ROUTES.route("g-us", "us", "eu") == "us"
    with pytest.raises(InvalidChange, match="'apac'"):
        ROUTES.route("g-us", None, "apac")


def test_else_the_only_workspace():
    assert Routes().route("anything") == DEFAULT_WORKSPACE
    assert Routes(("only",)).route("anything") == "only"
    assert Routes(("only",), {"g": "only"}).route("other") == "only"


def test_else_refused_naming_the_group():
    with pytest.raises(InvalidChange) as caught:
        ROUTES.route("g-unlisted")
    assert caught.value.field == "subscription_group_id"
    assert str(caught.value) == (
        "subscription_group_id: group 'g-unlisted' belongs to no workspace in "
        "BRAZE_WORKSPACES_FILE (name one with workspace=)"
    )


def test_an_unknown_workspace_is_refused_naming_it():
    with pytest.raises(InvalidChange) as caught:
        ROUTES.route("g-us", "apac")
    assert caught.value.field == "workspace"
    assert "'apac'" in str(caught.value) and "us, eu" in str(caught.value)
    with pytest.raises(InvalidChange, match="'apac'"):
        Routes().route("g", "apac")


def test_naming_another_workspace_than_the_groups_is_refused():
    with pytest.raises(InvalidChange) as caught:
        ROUTES.route("g-us", "eu")
    assert caught.value.field == "workspace"
    assert "group 'g-us' belongs to workspace 'us'" in str(caught.value)


def test_routing_is_exhaustive_and_pure():
    """Every (group, named) pair either routes to a known workspace or raises
    InvalidChange, the same answer every time, the routes unchanged."""
    before = dict(ROUTES.groups)
    for group in ("g-us", "g-eu", "g-unlisted"):
        for named in (None, "us", "eu", "apac"):
            answers = set()
            for _ in range(2):
                try:
                    answers.add(ROUTES.route(group, named))
                except InvalidChange as exc:
                    answers.add(f"refused {exc.field}")
            assert len(answers) == 1
            (answer,) = answers
            assert answer in ROUTES.names or answer.startswith("refused ")
    assert dict(ROUTES.groups) == before


def test_a_change_names_its_workspace_by_the_row_field():
    change = parse_change({**ROW, "subscription_group_id": "g-new", "workspace": " eu "})
    assert change.workspace == "eu"
    assert ROUTES.of(change) == "eu"
    assert parse_change(ROW).workspace is None
    assert parse_change({**ROW, "workspace": ""}).workspace is None
    assert ROUTES.of(parse_change(ROW)) == "us"
    for bad in ("e/u", "{eu}", "x" * 65, 3):
        with pytest.raises(InvalidChange) as caught:
            parse_change({**ROW, "workspace": bad})
        assert caught.value.field == "workspace"
