"""Fault switches of the control API (`/_sim/faults`) and the parsing of their updates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simulator.config import SimulatorConfig


@dataclass(frozen=True, slots=True)
class Faults:
    """The current switches. The budgets and `legacy_reads` start from the config.

    - `reject`: a post holding one of these values is refused with a 400 naming it
      (`Invalid <kind>: <value>`), as Braze names a bad identifier.
    - `reject_anonymous`: a post holding one of these values is refused with a 400 that
      names no identifier (the sender must find the culprit by splitting).
    - `reject_groups`: posts and reads for these group ids are refused with a 400 naming
      the group (`Unknown subscription_group_id: <id>`), as for a deleted group.
    - `soft_errors`: a post holding one of these values is answered 201 with `message:
      success` plus `errors: [...]` naming them (Braze's non-fatal errors); those
      identifiers are not applied, the rest of the post is.
    - `queued`: posts are answered 202 `{"message": "queued"}` (maintenance) and applied.
    - `legacy_reads`: `/subscription/status/get` answers the older 0 (subscribed),
      1 (unsubscribed), null (unknown) form.
    - `answer`: what answers a subscription post instead of Braze (nothing is applied
      unless said): `html` (200 with a captive portal's HTML page), `redirect` (301 to
      another host), `nested` (201 whose JSON nests `nested_depth` deep), `huge` (500 with
      a `huge_bytes` body), `trickle` (Braze's answer, applied, its body sent one byte
      every `trickle_ms`); null: Braze answers.
    - `absurd_rate_limit_headers`: every post's X-RateLimit-Reset is `1e308` and its
      X-RateLimit-Limit 400 digits (X-RateLimit-Remaining a plausible 3).
    """

    api_keys: frozenset[str]
    rate_limit: int
    window_seconds: float
    outage: bool = False
    error_rate: float = 0.0
    latency_ms: float = 0.0
    reject: frozenset[str] = frozenset()
    hold: bool = False
    read_rate_limit: int = 250_000
    read_window_seconds: float = 3600.0
    reject_anonymous: frozenset[str] = frozenset()
    reject_groups: frozenset[str] = frozenset()
    soft_errors: frozenset[str] = frozenset()
    queued: bool = False
    legacy_reads: bool = False
    answer: str | None = None
    nested_depth: int = 100_000
    huge_bytes: int = 30 * 1024 * 1024
    trickle_ms: float = 200.0
    absurd_rate_limit_headers: bool = False

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> Faults:
        return cls(
            api_keys=frozenset(config.api_keys),
            rate_limit=config.rate_limit,
            window_seconds=float(config.window_seconds),
            error_rate=float(config.error_rate),
            latency_ms=float(config.latency_ms),
            read_rate_limit=config.read_rate_limit,
            read_window_seconds=float(config.read_window_seconds),
            legacy_reads=config.legacy_read_values,
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
            "read_rate_limit": self.read_rate_limit,
            "read_window_seconds": self.read_window_seconds,
            "reject_anonymous": sorted(self.reject_anonymous),
            "reject_groups": sorted(self.reject_groups),
            "soft_errors": sorted(self.soft_errors),
            "queued": self.queued,
            "legacy_reads": self.legacy_reads,
            "answer": self.answer,
            "nested_depth": self.nested_depth,
            "huge_bytes": self.huge_bytes,
            "trickle_ms": self.trickle_ms,
            "absurd_rate_limit_headers": self.absurd_rate_limit_headers,
        }


# The answers `answer` can switch on (see Faults).
ANSWERS = ("html", "redirect", "nested", "huge", "trickle")


@dataclass(frozen=True, slots=True)
class FaultUpdate:
    """A parsed `POST /_sim/faults` body: switch changes, and requests to spend now
    (`spend` from the write budget, `read_spend` from the read budget)."""

    changes: dict[str, Any] = field(default_factory=dict)
    spend: int = 0
    read_spend: int = 0


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
    spend = read_spend = 0
    for key, value in body.items():
        if key == "answer":
            if value is not None and value not in ANSWERS:
                return f"answer must be null or one of {', '.join(ANSWERS)}"
            changes[key] = value
        elif key in ("nested_depth", "huge_bytes"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"{key} must be a positive integer"
            changes[key] = value
        elif key == "trickle_ms":
            if not _is_number(value) or value < 0:
                return "trickle_ms must be a non-negative number"
            changes[key] = float(value)
        elif key in ("outage", "hold", "queued", "legacy_reads", "absurd_rate_limit_headers"):
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
        elif key in ("reject", "api_keys", "reject_anonymous", "reject_groups", "soft_errors"):
            parsed = _string_set(value, key)
            if isinstance(parsed, str):
                return parsed
            changes[key] = parsed
        elif key in ("rate_limit", "read_rate_limit"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"{key} must be a positive integer"
            changes[key] = value
        elif key in ("window_seconds", "read_window_seconds"):
            if not _is_number(value) or value <= 0:
                return f"{key} must be a positive number"
            changes[key] = float(value)
        elif key in ("spend", "read_spend"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"{key} must be a non-negative integer"
            if key == "spend":
                spend = value
            else:
                read_spend = value
        else:
            return f"Unknown fault: {key}"
    return FaultUpdate(changes, spend, read_spend)
