"""The simulated workspace: subscriptions, request logs, counters, rate windows, faults,
and the applied-states log (the order oracle).

Thread-safe: the server's event loop writes, tests and the control API read from anywhere.

Memory: the request logs hold one small record per request; the applied-states log one
entry per identifier a successful post applied (about 30 bytes, next to nothing for an
identifier's first, `bench/sim_applied_memory.py`: the list's record is shared by its
identifiers, and a first entry rides in the subscription's tuple), kept until `reset()`,
at most `applied_log_limit` of them.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from simulator.config import SimulatorConfig
from simulator.faults import Faults, FaultUpdate
from simulator.model import (
    KINDS,
    SUBSCRIPTION_STATES,
    Applied,
    Channel,
    Endpoint,
    Kind,
    ReadEndpoint,
    SubscriptionState,
    UpdateList,
    ValidatedRequest,
)
from simulator.ratelimit import FixedWindowCounter, WindowStatus, sliding_window_max
from simulator.validation import GroupRules, is_valid_email, is_valid_phone


class Outcome(enum.Enum):
    """Why a subscription post got its answer; decides which counters move."""

    OK = "ok"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    MALFORMED = "malformed"  # 400 from body validation
    REJECTED = "rejected"  # 400 injected by `reject`, `reject_anonymous`, `reject_groups`
    SERVER_ERROR = "server_error"  # 500/503 injected by `error_rate` / `outage` / `answer`
    NOT_BRAZE = "not_braze"  # answered by something in between (the `answer` fault)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    t: float
    endpoint: Endpoint
    identifiers: int
    entries: int
    status: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """One call of a read endpoint; `identifiers` is how many it asked about."""

    t: float
    endpoint: ReadEndpoint
    identifiers: int
    status: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# One identifier's subscription in one group: (state, double_opt_in, updates so far, its
# applied log: indexes into the state's shared `Applied` records, in the order applied).
# A tuple of plain values, which Python's garbage collector stops tracking: 100,000
# objects and lists it traversed at each collection cost ~20 % of the simulator's CPU in
# bench.sim_cpu (issue 26). The log is a tuple up to _TUPLE_ENTRIES indexes, then a list
# (tracked, but rare), not a new tuple per append. One dict for both: one look-up and one
# store an identifier.
Subscription = tuple[SubscriptionState, bool, int, tuple[int, ...] | list[int]]
_TUPLE_ENTRIES = 16


@dataclass(slots=True)
class Counters:
    requests_total: int = 0
    requests_ok: int = 0
    rejected_400: int = 0
    malformed: int = 0
    unauthorized: int = 0
    rate_limited_429: int = 0
    server_errors: int = 0
    soft_errors: int = 0  # identifiers answered in `errors` of a 201 and not applied
    queued_202: int = 0
    external_changes: int = 0  # states set through `/_sim/set_state`
    not_braze: int = 0  # posts answered by something in between (`answer`): not applied

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
        elif outcome is Outcome.NOT_BRAZE:
            self.not_braze += 1


@dataclass(slots=True)
class ReadCounters:
    requests_total: int = 0
    requests_ok: int = 0
    rejected_400: int = 0
    unauthorized: int = 0
    rate_limited_429: int = 0
    server_errors: int = 0

    def count(self, status: int) -> None:
        self.requests_total += 1
        if status == 200:
            self.requests_ok += 1
        elif status == 400:
            self.rejected_400 += 1
        elif status == 401:
            self.unauthorized += 1
        elif status == 429:
            self.rate_limited_429 += 1
        elif status >= 500:
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
        # The groups holding a state for some identifier: `/subscription/user/status` looks
        # an identifier up in each (a few groups, against a set per identifier to keep).
        self._held_groups: set[str] = set()
        self._log: list[RequestRecord] = []
        self._counters = Counters()
        self._faults = Faults.from_config(config)
        self._window = FixedWindowCounter(config.rate_limit, config.window_seconds)
        self._read_window = FixedWindowCounter(config.read_rate_limit, config.read_window_seconds)
        self._read_log: list[ReadRecord] = []
        self._read_counters = ReadCounters()
        # The applied log's records, one per list a post applied or per `set_state` call,
        # shared by its identifiers (a subscription holds their indexes).
        self._applied_records: list[Applied] = []
        self._applied_count = 0
        self._applied_complete = True
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
            self._read_window.configure(
                self._faults.read_rate_limit, self._faults.read_window_seconds
            )
            if update.spend:
                self._window.spend(self._clock(), update.spend)
            if update.read_spend:
                self._read_window.spend(self._clock(), update.read_spend)
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

    def rejected_anonymously(self, identifiers: Iterable[tuple[Kind, str]]) -> bool:
        """True when the `reject_anonymous` fault refuses a post holding these identifiers."""
        reject = self._faults.reject_anonymous
        return bool(reject) and any(value in reject for _, value in identifiers)

    def rejected_group(self, groups: Iterable[str]) -> str | None:
        """The first group id refused by the `reject_groups` fault, if any."""
        reject = self._faults.reject_groups
        if not reject:
            return None
        return next((group for group in groups if group in reject), None)

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

    def consume_read(self, now: float) -> WindowStatus:
        """As `consume`, from the read budget (the read endpoints' own limit)."""
        with self._lock:
            return self._read_window.consume(now)

    def peek_read_window(self, now: float) -> WindowStatus:
        with self._lock:
            return self._read_window.peek(now)

    # --- validation and results -----------------------------------------------------------

    def validation_rules(self) -> GroupRules:
        return GroupRules(
            groups=MappingProxyType(self._groups),
            auto_groups=self._config.auto_groups,
            max_identifiers=self._config.max_identifiers,
        )

    def finish(
        self,
        record: RequestRecord,
        outcome: Outcome,
        request: ValidatedRequest | None = None,
        *,
        skipped: frozenset[tuple[Kind, str]] = frozenset(),
    ) -> None:
        """Log one subscription post; apply its updates (but `skipped`) when it succeeded."""
        with self._lock:
            position = len(self._log)
            self._log.append(record)
            self._counters.count(outcome)
            if outcome is not Outcome.OK or request is None:
                return
            self._counters.soft_errors += len(skipped)
            if record.status == 202:
                self._counters.queued_202 += 1
            for group, channel in request.learned_groups.items():
                self._groups.setdefault(group, channel)
            for update_list in request.lists:
                values = update_list.values
                if skipped:
                    kind = update_list.kind
                    values = tuple(value for value in values if (kind, value) not in skipped)
                # One record for the list's every identifier (they are alike, and frozen).
                applied = Applied(record.t, update_list.state, record.endpoint, position)
                self._apply_list(update_list, values, applied)

    def _apply_list(self, update_list: UpdateList, values: Sequence[str], applied: Applied) -> None:
        """Set `values` of `update_list` to its state and record `applied` for each (as far
        as `applied_log_limit` allows): the per-identifier work of a post, in tight loops
        (issue 26)."""
        group, kind = update_list.group, update_list.kind
        state, double_opt_in = update_list.state, update_list.double_opt_in
        limit = self._config.applied_log_limit
        recorded = len(values)
        if limit is not None and self._applied_count + recorded > limit:
            recorded = max(0, limit - self._applied_count)
            self._applied_complete = False
        self._applied_count += recorded
        record = (len(self._applied_records),)
        self._applied_records.append(applied)
        subscriptions = self._subscriptions
        first = (state, double_opt_in, 1, record)  # shared by the keys new here
        for value in values[:recorded]:
            key = (group, kind, value)
            current = subscriptions.get(key)
            if current is None:
                subscriptions[key] = first
                continue
            entries = current[3]
            if isinstance(entries, list):
                entries.append(record[0])
            elif len(entries) < _TUPLE_ENTRIES:
                entries = entries + record
            else:
                entries = [*entries, record[0]]
            subscriptions[key] = (state, double_opt_in, current[2] + 1, entries)
        unrecorded = (state, double_opt_in, 1, ())
        for value in values[recorded:]:  # past the log's limit: applied, not recorded
            key = (group, kind, value)
            current = subscriptions.get(key)
            subscriptions[key] = (
                unrecorded
                if current is None
                else (state, double_opt_in, current[2] + 1, current[3])
            )
        self._held_groups.add(group)

    def set_state(self, group: str, kind: Kind, value: str, state: SubscriptionState) -> None:
        """Set a state "in Braze" directly, as a footer-link opt-out or a STOP reply would.

        Recorded in the applied log as `external` (not a write by braze-subs); spends no
        budget. Raises ValueError (one line) for an unknown group, kind, state or a value
        the group's channel refuses.
        """
        self.set_states(group, kind, [value], state)

    def set_states(
        self, group: str, kind: Kind, values: Iterable[str], state: SubscriptionState
    ) -> None:
        """`set_state` for many values of one kind: all are checked before any is set."""
        values = list(values)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if state not in SUBSCRIPTION_STATES:
            raise ValueError("state must be 'subscribed' or 'unsubscribed'")
        for value in values:
            if not isinstance(value, str) or not value:
                raise ValueError("value must be a non-empty string")
            if kind == "email" and not is_valid_email(value):
                raise ValueError(f"Invalid email: {value}")
            if kind == "phone" and not is_valid_phone(value):
                raise ValueError(f"Invalid phone: {value}")
        with self._lock:
            channel = self._groups.get(group)
            if channel is None and not self._config.auto_groups:
                raise ValueError(f"Unknown subscription_group_id: {group}")
            if channel == "sms" and kind == "email":
                raise ValueError(f"Subscription group {group} is an SMS group")
            if channel == "email" and kind == "phone":
                raise ValueError(f"Subscription group {group} is an email group")
            if channel is None and kind != "external_id" and values:
                self._groups[group] = "email" if kind == "email" else "sms"
            update_list = UpdateList(group, state, kind, tuple(values), False)
            self._apply_list(update_list, values, Applied(self._clock(), state, "external", None))
            self._counters.external_changes += len(values)

    def finish_read(self, record: ReadRecord) -> None:
        """Log one call of a read endpoint."""
        with self._lock:
            self._read_log.append(record)
            self._read_counters.count(record.status)

    # --- reads -------------------------------------------------------------------------------

    def group_channel(self, group: str) -> Channel | None:
        return self._groups.get(group)

    def status(self, group: str, kind: Kind, value: str) -> SubscriptionState | None:
        """The state of one identifier in one group, None when never set."""
        with self._lock:
            subscription = self._subscriptions.get((group, kind, value))
            return subscription[0] if subscription else None

    def lookup(self, group: str, identifiers: Iterable[tuple[Kind, str]]) -> dict[str, str]:
        """`{value: "subscribed" | "unsubscribed" | "unknown"}`, as the status/get endpoint says."""
        with self._lock:
            result: dict[str, str] = {}
            for kind, value in identifiers:
                subscription = self._subscriptions.get((group, kind, value))
                result[value] = subscription[0] if subscription else "unknown"
            return result

    def user_groups(self, kind: Kind, value: str) -> list[tuple[str, Channel | None, str]]:
        """`(group, channel, state)` of every group holding a state for the identifier,
        sorted by group id: what `/subscription/user/status` lists."""
        with self._lock:
            groups = sorted(
                group for group in self._held_groups if (group, kind, value) in self._subscriptions
            )
            return [
                (group, self._groups.get(group), self._subscriptions[(group, kind, value)][0])
                for group in groups
            ]

    # --- the order oracle ----------------------------------------------------------------

    def applied(
        self, group: str | None = None, kind: Kind | None = None, value: str | None = None
    ) -> dict[SubscriptionKey, list[Applied]]:
        """Per (group, kind, value), every state applied to it since the last reset, in the
        order applied (posts and, flagged `external`, `set_state`). Filters narrow it."""
        with self._lock:
            records = self._applied_records
            return {
                key: [records[index] for index in entries]
                for key, (_, _, _, entries) in self._subscriptions.items()
                if entries
                and (group is None or key[0] == group)
                and (kind is None or key[1] == kind)
                and (value is None or key[2] == value)
            }

    def applied_complete(self) -> bool:
        """False once `applied_log_limit` stopped the recording (the log misses states)."""
        with self._lock:
            return self._applied_complete

    def applied_document(
        self, group: str | None = None, kind: Kind | None = None, value: str | None = None
    ) -> dict[str, Any]:
        """The `GET /_sim/applied` document."""
        applied = self.applied(group, kind, value)
        return {
            "complete": self.applied_complete(),
            "applied": [
                {
                    "group": key_group,
                    "kind": key_kind,
                    "value": key_value,
                    "states": [entry.to_json() for entry in entries],
                }
                for (key_group, key_kind, key_value), entries in applied.items()
            ],
        }

    def subscriptions(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._subscriptions.items())
        return [
            {
                "group": group,
                "kind": kind,
                "value": value,
                "state": state,
                "double_opt_in": double_opt_in,
                "updates": updates,
            }
            for (group, kind, value), (state, double_opt_in, updates, _) in items
        ]

    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def read_requests(self) -> list[ReadRecord]:
        with self._lock:
            return list(self._read_log)

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
            read_counters = dataclasses.asdict(self._read_counters)
            read_window = self._read_window.peek(now)
            read_window_requests = self._read_window.count(now)
            read_max_in_window = self._read_window.max_in_window
            read_log = list(self._read_log) if include_log else None
            read_counted = [r.t for r in self._read_log if r.status not in (401, 429, 503)]
        sliding_max = sliding_window_max(counted, self._window.window_seconds)
        reads: dict[str, Any] = {
            **read_counters,
            "max_requests_in_window": read_max_in_window,
            "max_requests_in_sliding_window": sliding_window_max(
                read_counted, self._read_window.window_seconds
            ),
            "window_requests": read_window_requests,
            "window_remaining": read_window.remaining,
            "window_reset": read_window.reset,
            "rate_limit": read_window.limit,
            "window_seconds": self._read_window.window_seconds,
        }
        if read_log is not None:
            reads["requests"] = [record.to_json() for record in read_log]
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
            "reads": reads,
        }
        if log is not None:
            stats["requests"] = [record.to_json() for record in log]
        return stats

    def snapshot(self, include_log: bool = True) -> dict[str, Any]:
        """The `GET /_sim/state` document."""
        return {"subscriptions": self.subscriptions(), "stats": self.stats(include_log)}

    # --- reset -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget subscriptions, learned groups, logs, counters, the windows, the applied
        log; restore faults."""
        config = self._config
        with self._lock:
            self._groups = dict(self._configured_groups)
            self._subscriptions.clear()
            self._held_groups.clear()
            self._log = []
            self._counters = Counters()
            self._faults = Faults.from_config(config)
            self._window = FixedWindowCounter(config.rate_limit, config.window_seconds)
            self._read_window = FixedWindowCounter(
                config.read_rate_limit, config.read_window_seconds
            )
            self._read_log = []
            self._read_counters = ReadCounters()
            self._applied_records = []
            self._applied_count = 0
            self._applied_complete = True
