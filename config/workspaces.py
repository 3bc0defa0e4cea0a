"""The Braze workspaces one deployment serves (issue 23), from BRAZE_WORKSPACES_FILE.

    [workspaces.us]
    rest_endpoint = "https://rest.iad-01.braze.com"
    api_key_env = "BRAZE_KEY_US"            # or api_key_file = "/run/secrets/braze-us"
    groups = ["newsletter-us", "sms-us"]    # optional: the group ids it owns
    rate_limit = 5000                       # optional, as BRAZE_RATE_LIMIT
    rate_limit_window_seconds = 60          # optional, as BRAZE_RATE_LIMIT_WINDOW_SECONDS
    read_rate_limit = 250000                # optional, as BRAZE_READ_RATE_LIMIT

Without the file, the settings (BRAZE_API_KEY, BRAZE_REST_ENDPOINT, ...) are one workspace
named `default`, exactly as before workspaces. A workspace named `default` in the file keeps
the keys of before (stores/keys.py), which is how a deployment moves to the file.

A bad file stops the process at start with one line naming `[workspaces.NAME] field`; a key
is never printed. The keys themselves are read at load, but a missing one is reported only
where a key is needed (`Workspaces.require_keys`, a worker's start, a post): producers, the
HTTP API and the CLI enqueue without keys, as before.

TOML through the standard library's `tomllib` (nothing to add). The tables are checked by
hand rather than by a pydantic model: pydantic's messages name a location path and may quote
the input, while every message here must name the table and field as the file has them and
never show an `api_key_*` value.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from config.settings import Settings, SettingsError, get_settings, is_loopback_host
from core.changes import InvalidChange, parse_group_id
from core.routing import DEFAULT_WORKSPACE, WORKSPACE_NAME_RULE, Routes, is_workspace_name

VARIABLE = "BRAZE_WORKSPACES_FILE"
REQUIRED_FIELDS = ("rest_endpoint",)
KEY_FIELDS = ("api_key_env", "api_key_file")
OPTIONAL_FIELDS = ("groups", "rate_limit", "rate_limit_window_seconds", "read_rate_limit")
KNOWN_FIELDS = (*REQUIRED_FIELDS, *KEY_FIELDS, *OPTIONAL_FIELDS)
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Workspace:
    """One Braze workspace: its endpoint, key, groups and budgets (None: the settings')."""

    name: str
    rest_endpoint: str | None
    api_key: SecretStr | None
    groups: frozenset[str] = frozenset()
    rate_limit: int | None = None
    rate_limit_window_seconds: float | None = None
    read_rate_limit: int | None = None
    # Why `api_key` is None, as one line naming the table and field (never the key); None
    # when the key is there or when it comes from the settings (BRAZE_API_KEY's own check).
    key_problem: str | None = None

    def require_key(self) -> None:
        """Raise `SettingsError` (one line naming `[workspaces.NAME] field`) without a key."""
        if self.key_problem is not None:
            raise SettingsError(self.key_problem)


class Workspaces(Mapping[str, Workspace]):
    """The workspaces in the file's order (one, `default`, without the file)."""

    def __init__(self, workspaces: list[Workspace], source: str | None = None) -> None:
        self._by_name = {workspace.name: workspace for workspace in workspaces}
        self.source = source  # the file, or None: from the settings
        self.routes = Routes(
            tuple(self._by_name),
            {group: workspace.name for workspace in workspaces for group in workspace.groups},
        )

    @property
    def names(self) -> tuple[str, ...]:
        return self.routes.names

    def __getitem__(self, name: str) -> Workspace:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"Workspaces({', '.join(self.names)})"

    @property
    def default(self) -> str | None:
        """The workspace a task or call naming none stands for: the only one, else the one
        named `default`; None when there are several and none is named so."""
        if len(self._by_name) == 1:
            return self.names[0]
        return DEFAULT_WORKSPACE if DEFAULT_WORKSPACE in self._by_name else None

    def require_keys(self) -> None:
        """Every workspace's key must be there (a worker's start): raise `SettingsError`
        naming the first table and field without one."""
        for workspace in self._by_name.values():
            workspace.require_key()


def load_workspaces(settings: Settings) -> Workspaces:
    """The workspaces `settings` describe: BRAZE_WORKSPACES_FILE's, else `default`."""
    path = settings.braze_workspaces_file
    if path is None:
        return Workspaces(
            [
                Workspace(
                    DEFAULT_WORKSPACE,
                    rest_endpoint=settings.rest_endpoint,
                    api_key=settings.braze_api_key,
                )
            ]
        )
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{VARIABLE}: cannot read {path}: {_reason(exc)}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{VARIABLE}: {path} is not valid TOML: {exc}") from None
    extra = sorted(set(document) - {"workspaces"})
    if extra:
        raise SettingsError(
            f"{VARIABLE}: {path}: unknown top-level entry {extra[0]!r} "
            "(only [workspaces.NAME] tables)"
        )
    tables = document.get("workspaces")
    if not isinstance(tables, dict) or not tables:
        raise SettingsError(f"{VARIABLE}: {path} has no [workspaces.NAME] table")
    env_file = _env_file_values(settings)
    workspaces = [
        _workspace(name, table, settings, env_file, Path(path).parent)
        for name, table in tables.items()
    ]
    _check_groups_once(workspaces)
    return Workspaces(workspaces, source=path)


_loaded: tuple[Settings, Workspaces] | None = None


def get_workspaces(settings: Settings | None = None) -> Workspaces:
    """The process's workspaces (of `get_settings()` unless other settings are given), read
    once per settings object."""
    global _loaded
    settings = settings or get_settings()
    found = _loaded
    if found is None or found[0] is not settings:
        found = (settings, load_workspaces(settings))
        _loaded = found
    return found[1]


def forget_workspaces() -> None:
    """Read the file again next time (tests that change settings)."""
    global _loaded
    _loaded = None


# --------------------------------------------------------------------------------------
# One table
# --------------------------------------------------------------------------------------


def _workspace(
    name: str, table: Any, settings: Settings, env_file: Mapping[str, str | None], folder: Path
) -> Workspace:
    where = f"[workspaces.{name}]" if is_workspace_name(name) else f"[workspaces.{name!r}]"
    if not is_workspace_name(name):
        raise SettingsError(f"{VARIABLE}: {where}: the name must be {WORKSPACE_NAME_RULE}")
    if not isinstance(table, dict):
        raise SettingsError(f"{VARIABLE}: workspaces.{name}: must be a table ({where})")

    def fail(field: str, message: str) -> SettingsError:
        return SettingsError(f"{VARIABLE}: {where} {field}: {message}")

    for field in table:
        if field not in KNOWN_FIELDS:
            hint = (
                " (give the key by api_key_env or api_key_file, never in the file)"
                if "key" in field.lower()
                else f" (known: {', '.join(KNOWN_FIELDS)})"
            )
            raise fail(field, f"unknown field{hint}")

    endpoint = _endpoint(table.get("rest_endpoint"), settings, fail)
    api_key, key_problem = _key(table, env_file, folder, fail)
    return Workspace(
        name,
        rest_endpoint=endpoint,
        api_key=api_key,
        groups=_groups(table.get("groups"), fail),
        rate_limit=_positive_int(table, "rate_limit", fail),
        rate_limit_window_seconds=_positive_number(table, "rate_limit_window_seconds", fail),
        read_rate_limit=_positive_int(table, "read_rate_limit", fail),
        key_problem=None if key_problem is None else f"{VARIABLE}: {where} {key_problem}",
    )


def _endpoint(value: Any, settings: Settings, fail: Any) -> str:
    if value is None:
        raise fail("rest_endpoint", "missing (the workspace's REST endpoint, https://...)")
    if not isinstance(value, str):
        raise fail("rest_endpoint", f"must be a string, got {type(value).__name__}")
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise fail("rest_endpoint", "must be an http:// or https:// URL")
    if (
        parts.scheme == "http"
        and not settings.braze_allow_insecure_http
        and not is_loopback_host(parts.hostname or "")
    ):
        raise fail(
            "rest_endpoint",
            "http:// would send the API key in clear text; use https://, a loopback host, "
            "or set BRAZE_ALLOW_INSECURE_HTTP=true",
        )
    return url


def _key(
    table: dict[str, Any], env_file: Mapping[str, str | None], folder: Path, fail: Any
) -> tuple[SecretStr | None, str | None]:
    """The key and None, or None and why (`field: reason`, never the key's value)."""
    given = [field for field in KEY_FIELDS if field in table]
    if len(given) != 1:
        detail = "give one, not both" if given else "missing: give one"
        raise fail(
            "api_key_env / api_key_file",
            f"{detail} (a variable's name, or a file holding the key)",
        )
    field = given[0]
    where = table[field]
    if not isinstance(where, str) or not where.strip():
        raise fail(field, "must be a non-empty string")
    where = where.strip()
    if field == "api_key_env":
        if not _VARIABLE_NAME.fullmatch(where):
            # Not echoed: a key pasted here in place of the variable's name stays secret.
            raise fail(field, "must be an environment variable's name (letters, digits, '_')")
        raw = os.environ.get(where)
        if raw is None:
            raw = env_file.get(where)
        if raw is None or not raw.strip():
            return None, f"{field}: the variable {where} is not set (it holds the API key)"
        source = f"the variable {where}"
    else:
        path = Path(where).expanduser()
        if not path.is_absolute():
            path = folder / path
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"{field}: cannot read {path}: {_reason(exc)}"
        if not raw.strip():
            return None, f"{field}: {path} is empty (it should hold the API key)"
        source = str(path)
    try:
        key = Settings._header_safe_key(raw)
    except ValueError as exc:
        raise fail(field, f"the key in {source} {exc}") from None
    assert isinstance(key, str)
    return SecretStr(key), None


def _groups(value: Any, fail: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise fail("groups", f"must be a list of group ids, got {type(value).__name__}")
    seen: set[str] = set()
    for number, item in enumerate(value, 1):
        try:
            group = parse_group_id(item)
        except InvalidChange as exc:
            raise fail("groups", f"item {number}: {exc.message}") from None
        if group in seen:
            raise fail("groups", f"group {group!r} listed twice")
        seen.add(group)
    return frozenset(seen)


def _positive_int(table: dict[str, Any], field: str, fail: Any) -> int | None:
    value = table.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise fail(field, f"must be a whole number above 0, got {value!r}")
    return value


def _positive_number(table: dict[str, Any], field: str, fail: Any) -> float | None:
    value = table.get(field)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise fail(field, f"must be a number of seconds above 0, got {value!r}")
    return float(value)


def _check_groups_once(workspaces: list[Workspace]) -> None:
    """Group ids are unique across workspaces: a group's workspace is never a guess."""
    owner: dict[str, str] = {}
    for workspace in workspaces:
        for group in sorted(workspace.groups):
            first = owner.setdefault(group, workspace.name)
            if first != workspace.name:
                raise SettingsError(
                    f"{VARIABLE}: [workspaces.{first}] groups and [workspaces.{workspace.name}] "
                    f"groups: group {group!r} listed in both (a group belongs to one workspace)"
                )


def _env_file_values(settings: Settings) -> Mapping[str, str | None]:
    """The `.env` file's variables: api_key_env may name one there, as BRAZE_API_KEY may
    be (the environment wins, as for every setting)."""
    env_file = settings.model_config.get("env_file")
    if not isinstance(env_file, str) or not Path(env_file).is_file():
        return {}
    from dotenv import dotenv_values  # pydantic-settings' own reader of `.env`

    return dotenv_values(env_file)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return type(exc).__name__
