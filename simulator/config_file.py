"""`braze-subs simulate --config FILE`: several simulated workspaces from a TOML file.

    [workspaces.us]
    api_keys = ["us-key"]
    email_groups = ["us-news"]
    rate_limit = 5000

    [workspaces.eu]
    api_keys = ["eu-key"]
    auto_groups = true
    rate_limit = 1000
    window_seconds = 60

One `[workspaces.NAME]` table per workspace, in the file's order (the first is the control
API's default). Each table names its `api_keys` (required: a key belongs to one workspace);
its other fields are those of `SimulatorConfig` and, when unset, take the command line's
values (the `simulate` flags or their defaults). A bad file is refused with one line naming
the table and field (never a key's value).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from simulator.config import WORKSPACE_NAME, SimulatorConfig, WorkspacesConfig, shared_key

# Field -> what it must be: "keys" (non-empty list of non-empty strings), "strings" (list
# of strings), "bool", "int", "number".
FIELDS: dict[str, str] = {
    "api_keys": "keys",
    "email_groups": "strings",
    "sms_groups": "strings",
    "auto_groups": "bool",
    "rate_limit": "int",
    "window_seconds": "number",
    "max_identifiers": "int",
    "latency_ms": "number",
    "error_rate": "number",
    "read_rate_limit": "int",
    "read_window_seconds": "number",
    "read_max_identifiers": "int",
    "legacy_read_values": "bool",
    "applied_log_limit": "int",
}
_EXPECTED = {
    "keys": "a non-empty array of non-empty strings",
    "strings": "an array of strings",
    "bool": "true or false",
    "int": "an integer",
    "number": "a number",
}


class ConfigFileError(ValueError):
    """A simulator config file that cannot be used; the message is one line."""


def _fits(kind: str, value: Any) -> bool:
    if kind == "keys":
        return (
            isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
        )
    if kind == "strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _workspace(name: str, table: Any, base: SimulatorConfig) -> SimulatorConfig:
    where = f"[workspaces.{name}]"
    if not isinstance(table, dict):
        raise ConfigFileError(f"{where} must be a table")
    if not WORKSPACE_NAME.fullmatch(name):
        raise ConfigFileError(f"{where}: the name must be 1-64 letters, digits, '.', '_' or '-'")
    for field_name, value in table.items():
        kind = FIELDS.get(field_name)
        if kind is None:
            raise ConfigFileError(
                f"{where} {field_name}: unknown field (known: {', '.join(FIELDS)})"
            )
        if not _fits(kind, value):
            raise ConfigFileError(f"{where} {field_name}: must be {_EXPECTED[kind]}")
    if "api_keys" not in table:
        raise ConfigFileError(f"{where} api_keys: missing (each workspace names its own keys)")
    values: dict[str, Any] = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    values.update(table)
    try:
        return SimulatorConfig(**values)
    except ValueError as error:  # one line that starts with the field's name
        raise ConfigFileError(f"{where} {error}") from None


def workspaces_from_document(
    document: Mapping[str, Any], base: SimulatorConfig, source: str = "config"
) -> WorkspacesConfig:
    """The workspaces of a parsed TOML document; unset fields from `base`."""
    unknown = sorted(set(document) - {"workspaces"})
    if unknown:
        raise ConfigFileError(
            f"{source}: unknown key {unknown[0]!r} (the file holds [workspaces.NAME] tables)"
        )
    tables = document.get("workspaces")
    if not isinstance(tables, dict) or not tables:
        raise ConfigFileError(f"{source}: no [workspaces.NAME] table")
    configs = {name: _workspace(name, table, base) for name, table in tables.items()}
    clash = shared_key(configs)
    if clash is not None:
        first, second = clash
        raise ConfigFileError(
            f"[workspaces.{second}] api_keys: a key [workspaces.{first}] accepts too "
            "(a key belongs to one workspace)"
        )
    return WorkspacesConfig(configs)


def load_config_file(path: Path, base: SimulatorConfig) -> WorkspacesConfig:
    """Read `path` (TOML); raise `ConfigFileError` with one line naming what is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigFileError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"{path}: not valid TOML ({error})") from None
    return workspaces_from_document(document, base, str(path))
