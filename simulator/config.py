"""Settings of one simulator instance: one simulated workspace (`SimulatorConfig`, the
`braze-subs simulate` flags map onto its fields) or several (`WorkspacesConfig`, from
`simulate --config FILE`, see `simulator.config_file`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from simulator.model import Channel

DEFAULT_API_KEY = "sim-key"
# The name of the workspace of a simulator given one `SimulatorConfig`.
DEFAULT_WORKSPACE = "default"
# Workspace names: as braze-subs' BRAZE_WORKSPACES_FILE names them (and REDIS_KEY_PREFIX).
WORKSPACE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class SimulatorConfig:
    """How the simulated Braze workspace behaves.

    `latency_ms`, `error_rate` and `legacy_read_values` are the initial values of the fault
    switches of the same names; `POST /_sim/reset` restores them, as it restores `api_keys`,
    the write budget (`rate_limit` per `window_seconds`) and the read budget
    (`read_rate_limit` per `read_window_seconds`, Braze's general 250,000 per hour, separate
    from the 5,000 per minute of the subscription posts).

    `applied_log_limit` caps the applied-states log (one record per identifier a post
    applied, see `SimulatorState.applied`; 1,000,000 records are up to ~30 MB, measured
    by `bench/sim_applied_memory.py`), so a simulator kept running does not grow without
    bound. Once the cap is reached, recording stops and the log says it is incomplete (the
    order check then refuses it); None keeps every record.
    """

    api_keys: set[str] = field(default_factory=lambda: {DEFAULT_API_KEY})
    email_groups: set[str] = field(default_factory=set)
    sms_groups: set[str] = field(default_factory=set)
    auto_groups: bool = False
    rate_limit: int = 5000
    window_seconds: float = 60
    max_identifiers: int = 50
    latency_ms: float = 0
    error_rate: float = 0.0
    read_rate_limit: int = 250_000
    read_window_seconds: float = 3600
    read_max_identifiers: int = 100
    legacy_read_values: bool = False
    applied_log_limit: int | None = 1_000_000

    def __post_init__(self) -> None:
        self.api_keys = set(self.api_keys)
        self.email_groups = set(self.email_groups)
        self.sms_groups = set(self.sms_groups)
        if not self.api_keys or not all(isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must hold at least one non-empty key")
        both = self.email_groups & self.sms_groups
        if both:
            raise ValueError(f"groups cannot be both email and SMS groups: {sorted(both)}")
        if self.rate_limit < 1:
            raise ValueError("rate_limit must be at least 1")
        if self.window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if self.max_identifiers < 1:
            raise ValueError("max_identifiers must be at least 1")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must not be negative")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if self.read_rate_limit < 1:
            raise ValueError("read_rate_limit must be at least 1")
        if self.read_window_seconds <= 0:
            raise ValueError("read_window_seconds must be positive")
        if self.read_max_identifiers < 1:
            raise ValueError("read_max_identifiers must be at least 1")
        if self.applied_log_limit is not None and self.applied_log_limit < 0:
            raise ValueError("applied_log_limit must not be negative")

    def group_channels(self) -> dict[str, Channel]:
        """The configured groups and their channel."""
        channels: dict[str, Channel] = dict.fromkeys(self.email_groups, "email")
        channels.update(dict.fromkeys(self.sms_groups, "sms"))
        return channels


@dataclass
class WorkspacesConfig:
    """Several simulated Braze workspaces served by one simulator, in order (the first is
    what the control API means when a request names none).

    Each workspace has its own keys, groups, budgets, fault switches and state; a Braze
    request is served by the workspace that accepts its key. A key accepted by two
    workspaces would make that choice ambiguous, so it is refused (naming the workspaces,
    never the key).
    """

    workspaces: dict[str, SimulatorConfig]

    def __post_init__(self) -> None:
        self.workspaces = dict(self.workspaces)
        if not self.workspaces:
            raise ValueError("at least one workspace is needed")
        for name in self.workspaces:
            if not isinstance(name, str) or not WORKSPACE_NAME.fullmatch(name):
                raise ValueError(
                    f"workspace name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
                )
        clash = shared_key(self.workspaces)
        if clash is not None:
            first, second = clash
            raise ValueError(f"workspaces {first} and {second} accept the same API key")

    @classmethod
    def single(cls, config: SimulatorConfig, name: str = DEFAULT_WORKSPACE) -> WorkspacesConfig:
        return cls({name: config})

    @property
    def names(self) -> list[str]:
        return list(self.workspaces)


def shared_key(configs: Mapping[str, SimulatorConfig]) -> tuple[str, str] | None:
    """The first two workspaces accepting a common key, None when every key is one's own."""
    owner: dict[str, str] = {}
    for name, config in configs.items():
        for key in config.api_keys:
            if key in owner and owner[key] != name:
                return owner[key], name
            owner[key] = name
    return None


def as_workspaces(config: SimulatorConfig | WorkspacesConfig) -> WorkspacesConfig:
    """A simulator's config as workspaces: one `SimulatorConfig` is workspace `default`."""
    return config if isinstance(config, WorkspacesConfig) else WorkspacesConfig.single(config)
