"""Settings of one simulator instance (the `braze-subs simulate` flags map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from simulator.model import Channel

DEFAULT_API_KEY = "sim-key"


@dataclass
class SimulatorConfig:
    """How the simulated Braze workspace behaves.

    `latency_ms`, `error_rate` and `legacy_read_values` are the initial values of the fault
    switches of the same names; `POST /_sim/reset` restores them, as it restores `api_keys`,
    the write budget (`rate_limit` per `window_seconds`) and the read budget
    (`read_rate_limit` per `read_window_seconds`, Braze's general 250,000 per hour, separate
    from the 5,000 per minute of the subscription posts).

    `applied_log_limit` caps the applied-states log (one record per identifier a post
    applied, see `SimulatorState.applied`; 1,000,000 records are about 90-200 MB, measured
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
