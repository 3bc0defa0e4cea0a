"""Fault switches of the control API (`/_sim/faults`) and the parsing of their updates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simulator.config import SimulatorConfig


@dataclass(frozen=True, slots=True)
class Faults:
    """The current switches. `rate_limit` and `window_seconds` start from the config."""

    api_keys: frozenset[str]
    rate_limit: int
    window_seconds: float
    outage: bool = False
    error_rate: float = 0.0
    latency_ms: float = 0.0
    reject: frozenset[str] = frozenset()
    hold: bool = False

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> Faults:
        return cls(
            api_keys=frozenset(config.api_keys),
            rate_limit=config.rate_limit,
            window_seconds=float(config.window_seconds),
            error_rate=float(config.error_rate),
            latency_ms=float(config.latency_ms),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "outage": self.outage,
            "error_rate": self.error_rate,
            "latency_ms": self.latency_ms,
            "reject": sorted(self.reject),
            "api_keys": sorted(self.api_keys),
            "hold": self.hold,
            "rate_limit": self.rate_limit,
            "window_seconds": self.window_seconds,
        }


@dataclass(frozen=True, slots=True)
class FaultUpdate:
    """A parsed `POST /_sim/faults` body: switch changes, and requests to spend now."""

    changes: dict[str, Any] = field(default_factory=dict)
    spend: int = 0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string_set(value: object, name: str) -> frozenset[str] | str:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return f"{name} must be an array of strings"
    return frozenset(value)


def parse_fault_update(body: object) -> FaultUpdate | str:
    """Check a `POST /_sim/faults` body; return the update or an error message."""
    if not isinstance(body, dict):
        return "Body must be a JSON object"
    changes: dict[str, Any] = {}
    spend = 0
    for key, value in body.items():
        if key in ("outage", "hold"):
            if not isinstance(value, bool):
                return f"{key} must be a boolean"
            changes[key] = value
        elif key == "error_rate":
            if not _is_number(value) or not 0 <= value <= 1:
                return "error_rate must be a number between 0 and 1"
            changes[key] = float(value)
        elif key == "latency_ms":
            if not _is_number(value) or value < 0:
                return "latency_ms must be a non-negative number"
            changes[key] = float(value)
        elif key in ("reject", "api_keys"):
            parsed = _string_set(value, key)
            if isinstance(parsed, str):
                return parsed
            changes[key] = parsed
        elif key == "rate_limit":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return "rate_limit must be a positive integer"
            changes[key] = value
        elif key == "window_seconds":
            if not _is_number(value) or value <= 0:
                return "window_seconds must be a positive number"
            changes[key] = float(value)
        elif key == "spend":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return "spend must be a non-negative integer"
            spend = value
        else:
            return f"Unknown fault: {key}"
    return FaultUpdate(changes, spend)
