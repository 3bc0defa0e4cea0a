"""The simulated workspace: subscriptions, request log, counters, rate window, fault switches.

Thread-safe: the server's event loop writes, tests and the control API read from anywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from simulator.config import SimulatorConfig
from simulator.faults import Faults, FaultUpdate
from simulator.model import Channel, Endpoint, Kind, SubscriptionState, ValidatedRequest
from simulator.ratelimit import FixedWindowCounter, WindowStatus, sliding_window_max
from simulator.validation import GroupRules


class Outcome(enum.Enum):
    """Why a subscription post got its answer; decides which counters move."""

    OK = "ok"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    MALFORMED = "malformed"  # 400 from body validation
    REJECTED = "rejected"  # 400 injected by the `reject` fault
    SERVER_ERROR = "server_error"  # 500/503 injected by `error_rate` / `outage`


@dataclass(frozen=True, slots=True)
class RequestRecord:
    t: float
    endpoint: Endpoint
    identifiers: int
    entries: int
    status: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class Subscription:
    state: SubscriptionState
    double_opt_in: bool
    updates: int


@dataclass(slots=True)
class Counters:
    requests_total: int = 0
    requests_ok: int = 0
    rejected_400: int = 0
    malformed: int = 0
    unauthorized: int = 0
    rate_limited_429: int = 0
    server_errors: int = 0

    def count(self, outcome: Outcome) -> None:
        self.requests_total += 1
        if outcome is Outcome.OK:
            self.requests_ok += 1
        elif outcome is Outcome.MALFORMED:
            self.rejected_400 += 1
            self.malformed += 1
        elif outcome is Outcome.REJECTED:
            self.rejected_400 += 1
        elif outcome is Outcome.UNAUTHORIZED:
            self.unauthorized += 1
        elif outcome is Outcome.RATE_LIMITED:
            self.rate_limited_429 += 1
        elif outcome is Outcome.SERVER_ERROR:
            self.server_errors += 1


SubscriptionKey = tuple[str, Kind, str]


class SimulatorState:
    """Everything the simulator remembers; `reset()` returns it to its configured start."""

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._configured_groups: dict[str, Channel] = config.group_channels()
        self._groups: dict[str, Channel] = dict(self._configured_groups)
        self._subscriptions: dict[SubscriptionKey, Subscription] = {}
        self._log: list[RequestRecord] = []
        self._counters = Counters()
        self._faults = Faults.from_config(config)
        self._window = FixedWindowCounter(config.rate_limit, config.window_seconds)
        self._held = 0

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def now(self) -> float:
        return self._clock()

    # --- auth and faults -------------------------------------------------------------------

    def authorize(self, api_key: str | None) -> bool:
        return api_key is not None and api_key in self._faults.api_keys

    def faults(self) -> Faults:
        return self._faults

    def update_faults(self, update: FaultUpdate) -> Faults:
        with self._lock:
            self._faults = dataclasses.replace(self._faults, **update.changes)
            self._window.configure(self._faults.rate_limit, self._faults.window_seconds)
            if update.spend:
                self._window.spend(self._clock(), update.spend)
            return self._faults

    def roll_server_error(self) -> bool:
        """True when the `error_rate` fault picks this request for a 500."""
        rate = self._faults.error_rate
        if rate <= 0:
            return False
        with self._lock:
            return rate >= 1 or self._rng.random() < rate

    def rejected_identifier(
        self, identifiers: Iterable[tuple[Kind, str]]
    ) -> tuple[Kind, str] | None:
        """The first identifier named by the `reject` fault, if any."""
        reject = self._faults.reject
        if not reject:
            return None
        return next(((kind, value) for kind, value in identifiers if value in reject), None)

    # --- hold --------------------------------------------------------------------------------

    def holding(self) -> bool:
        return self._faults.hold

    def enter_hold(self) -> None:
        with self._lock:
            self._held += 1

    def leave_hold(self) -> None:
        with self._lock:
            self._held -= 1

    def release_holds(self) -> None:
        with self._lock:
            self._faults = dataclasses.replace(self._faults, hold=False)

    # --- rate limit --------------------------------------------------------------------------

    def consume(self, now: float) -> WindowStatus:
        """Count a request into the current window, or refuse it (429) without counting."""
        with self._lock:
            return self._window.consume(now)

    def peek_window(self, now: float) -> WindowStatus:
        with self._lock:
            return self._window.peek(now)

    # --- validation and results -----------------------------------------------------------

    def validation_rules(self) -> GroupRules:
        return GroupRules(
            groups=MappingProxyType(self._groups),
            auto_groups=self._config.auto_groups,
            max_identifiers=self._config.max_identifiers,
        )

    def finish(
        self, record: RequestRecord, outcome: Outcome, request: ValidatedRequest | None = None
    ) -> None:
        """Log one subscription post; apply its updates when it succeeded."""
        with self._lock:
            self._log.append(record)
            self._counters.count(outcome)
            if outcome is not Outcome.OK or request is None:
                return
            for group, channel in request.learned_groups.items():
                self._groups.setdefault(group, channel)
            for update in request.updates:
                key = (update.group, update.kind, update.value)
                current = self._subscriptions.get(key)
                if current is None:
                    self._subscriptions[key] = Subscription(update.state, update.double_opt_in, 1)
                else:
                    current.state = update.state
                    current.double_opt_in = update.double_opt_in
                    current.updates += 1

    # --- reads -------------------------------------------------------------------------------

    def group_channel(self, group: str) -> Channel | None:
        return self._groups.get(group)

    def status(self, group: str, kind: Kind, value: str) -> SubscriptionState | None:
        """The state of one identifier in one group, None when never set."""
        with self._lock:
            subscription = self._subscriptions.get((group, kind, value))
            return subscription.state if subscription else None

    def lookup(self, group: str, identifiers: Iterable[tuple[Kind, str]]) -> dict[str, str]:
        """`{value: "subscribed" | "unsubscribed" | "unknown"}`, as the status/get endpoint says."""
        with self._lock:
            result: dict[str, str] = {}
            for kind, value in identifiers:
                subscription = self._subscriptions.get((group, kind, value))
                result[value] = subscription.state if subscription else "unknown"
            return result

    def subscriptions(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._subscriptions.items())
        return [
            {
                "group": group,
                "kind": kind,
                "value": value,
                "state": sub.state,
                "double_opt_in": sub.double_opt_in,
                "updates": sub.updates,
            }
            for (group, kind, value), sub in items
        ]

    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def stats(self, include_log: bool = True) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            counters = dataclasses.asdict(self._counters)
            window = self._window.peek(now)
            window_requests = self._window.count(now)
            max_in_window = self._window.max_in_window
            held = self._held
            log = list(self._log) if include_log else None
            # The requests the window counted (401, 429 and 503 answers spend nothing).
            counted = [r.t for r in self._log if r.status not in (401, 429, 503)]
        sliding_max = sliding_window_max(counted, self._window.window_seconds)
        stats: dict[str, Any] = {
            **counters,
            "held": held,
            "max_requests_in_window": max_in_window,
            "max_requests_in_sliding_window": sliding_max,
            "window_requests": window_requests,
            "window_remaining": window.remaining,
            "window_reset": window.reset,
            "rate_limit": window.limit,
            "window_seconds": self._window.window_seconds,
        }
        if log is not None:
            stats["requests"] = [record.to_json() for record in log]
        return stats

    def snapshot(self, include_log: bool = True) -> dict[str, Any]:
        """The `GET /_sim/state` document."""
        return {"subscriptions": self.subscriptions(), "stats": self.stats(include_log)}

    # --- reset -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget subscriptions, learned groups, log, counters, the window; restore faults."""
        with self._lock:
            self._groups = dict(self._configured_groups)
            self._subscriptions.clear()
            self._log = []
            self._counters = Counters()
            self._faults = Faults.from_config(self._config)
            self._window = FixedWindowCounter(self._config.rate_limit, self._config.window_seconds)
