"""Settings of one simulator instance (the `braze-subs simulate` flags map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from simulator.model import Channel

DEFAULT_API_KEY = "sim-key"


@dataclass
class SimulatorConfig:
    """How the simulated Braze workspace behaves.

    `latency_ms` and `error_rate` are the initial values of the fault switches of the same
    names; `POST /_sim/reset` restores them, as it restores `api_keys`, `rate_limit` and
    `window_seconds`.
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

    def group_channels(self) -> dict[str, Channel]:
        """The configured groups and their channel."""
        channels: dict[str, Channel] = dict.fromkeys(self.email_groups, "email")
        channels.update(dict.fromkeys(self.sms_groups, "sms"))
        return channels
