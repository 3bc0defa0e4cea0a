"""The order oracle: did any identifier receive an older state after a newer one?

Pure functions, no I/O. A test gives what it enqueued per (group, kind, value) — the states
in enqueue order, or `(occurred_at, state)` pairs where its changes carry `occurred_at` —
and what the simulator applied (`SimulatorState.applied()` in-process, or the
`GET /_sim/applied` document through `applied_from_document`). For each key, the states
braze-subs applied must be a subsequence of the enqueued ones in their order: skipping
changes is fine (coalescing keeps the newest), going back is not.

- Order: enqueue order; with `(occurred_at, state)` pairs, `occurred_at` order (ties keep
  enqueue order, as the later change wins a tie). A key's changes carry `occurred_at` all or
  none (mixing them is refused: the winner would be ambiguous).
- States set "in Braze" (`/_sim/set_state`, flagged external) are not braze-subs' writes and
  are left out.
- A state applied again right after itself (a retried post whose first answer was lost) is
  not a violation by default: it changes nothing and cannot be told apart from a duplicate
  delivery of the same change. `allow_repeats=False` makes the check a strict subsequence.
- Values must be spelled as posted (after the product's normalisation: lower-cased email
  domain, E.164 phone).

Violations name the identifier masked (`mask`) and the two states: the newer state applied
before, and the state that arrived after it although no later change set it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

Key = tuple[str, str, str]  # (subscription group id, identifier kind, identifier value)
# One enqueued change: its state, or (occurred_at as epoch seconds, state).
Enqueued = str | tuple[float, str]

IDENTIFIER_FIELDS = ("external_id", "email", "phone")


def mask(value: str) -> str:
    """The first and last few characters of an identifier, the rest hidden: at least a
    third of it is always hidden, and values of 3 characters or fewer are hidden whole."""
    keep = min(3, (len(value) - 1) // 3)
    if keep <= 0:
        return "***"
    return f"{value[:keep]}***{value[-keep:]}"


@dataclass(frozen=True, slots=True)
class Violation:
    """An applied state no enqueued order explains, for one key (the first one found).

    `newer` is the state applied just before (None when nothing was applied before it);
    `arrived` the state that came after it; `position` its index among the key's applied
    states (braze-subs' own, externals left out); `reason` is `older_after_newer` or
    `never_enqueued`.
    """

    group: str
    kind: str
    masked_value: str
    newer: str | None
    arrived: str
    position: int
    reason: str

    def __str__(self) -> str:
        who = f"group {self.group} {self.kind} {self.masked_value}"
        if self.reason == "never_enqueued":
            return f"{who}: '{self.arrived}' was applied but never enqueued for it"
        if self.newer is None:
            return f"{who}: '{self.arrived}' was applied first, out of the enqueued order"
        return (
            f"{who}: '{self.arrived}' arrived after the newer '{self.newer}' "
            f"(applied state #{self.position + 1}); no later change set '{self.arrived}'"
        )


def enqueue_order(changes: Sequence[Enqueued]) -> list[str]:
    """The states of one key's changes in the order that decides the winner."""
    pairs = [change for change in changes if not isinstance(change, str)]
    if not pairs:
        return [change for change in changes if isinstance(change, str)]
    if len(pairs) != len(changes):
        raise ValueError("a key's changes must all carry occurred_at or none")
    for occurred_at, _state in pairs:
        if isinstance(occurred_at, bool) or not isinstance(occurred_at, int | float):
            raise ValueError(f"occurred_at must be a number of epoch seconds: {occurred_at!r}")
        if not math.isfinite(occurred_at):
            raise ValueError(f"occurred_at must be finite: {occurred_at!r}")
    ordered = sorted(enumerate(pairs), key=lambda item: (item[1][0], item[0]))
    return [state for _, (_, state) in ordered]


def _applied_state(entry: object) -> str | None:
    """The state of one applied entry; None for an external change (not braze-subs')."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping):
        return None if entry.get("external") else str(entry["state"])
    if getattr(entry, "external", False):
        return None
    return str(getattr(entry, "state"))  # noqa: B009 - any object with .state (Applied)


def check_key(
    key: Key,
    enqueued: Sequence[Enqueued],
    applied: Iterable[object],
    *,
    allow_repeats: bool = True,
) -> Violation | None:
    """The first violation for one key, or None when its applied states are in order."""
    group, kind, value = key
    order = enqueue_order(enqueued)
    matched = -1  # index in `order` of the change the last applied state is matched to
    position = 0
    for entry in applied:
        state = _applied_state(entry)
        if state is None:
            continue
        newer = order[matched] if matched >= 0 else None
        if not (allow_repeats and state == newer):
            following = next((i for i in range(matched + 1, len(order)) if order[i] == state), None)
            if following is None:
                reason = "older_after_newer" if state in order else "never_enqueued"
                return Violation(group, kind, mask(value), newer, state, position, reason)
            matched = following
        position += 1
    return None


def check_order(
    enqueued: Mapping[Key, Sequence[Enqueued]],
    applied: Mapping[Key, Iterable[object]],
    *,
    allow_repeats: bool = True,
) -> list[Violation]:
    """Every key whose applied states are not a subsequence of its enqueued ones (the first
    violation of each), keys applied but never enqueued included. `applied` values may be
    states, `simulator.model.Applied` records or `/_sim/applied` state objects."""
    violations: list[Violation] = []
    for key in sorted(applied):
        found = check_key(key, enqueued.get(key, ()), applied[key], allow_repeats=allow_repeats)
        if found is not None:
            violations.append(found)
    return violations


def applied_from_document(document: Mapping[str, Any]) -> dict[Key, list[dict[str, Any]]]:
    """The `GET /_sim/applied` document as `check_order` takes it. Refuses an incomplete
    log (`applied_log_limit` reached): a check on it could miss a violation."""
    if not document.get("complete", False):
        raise ValueError("the simulator's applied log is incomplete (applied_log_limit reached)")
    return {
        (item["group"], item["kind"], item["value"]): list(item["states"])
        for item in document["applied"]
    }


def requests_by_key(
    applied: Mapping[Key, Sequence[Mapping[str, Any]]], batch: int
) -> dict[tuple[str, str, str], tuple[int, int, int]]:
    """Per (group, state, kind): how many accepted requests carried it, the fewest it needs
    (ceil(n / batch)) and n, the identifiers applied, from `applied_from_document`'s log
    (one applied time per request: the simulator stamps a request's entries alike). What
    the fill under flips is measured against (issue 26: bench/flip_fill.py, its e2e test)."""
    count: dict[tuple[str, str, str], int] = {}
    sent: dict[float, set[tuple[str, str, str]]] = {}
    for (group, kind, _value), states in applied.items():
        for entry in states:
            key = (group, entry["state"], kind)
            count[key] = count.get(key, 0) + 1
            sent.setdefault(entry["t"], set()).add(key)
    requests: dict[tuple[str, str, str], int] = {}
    for keys in sent.values():
        for key in keys:
            requests[key] = requests.get(key, 0) + 1
    return {key: (requests[key], math.ceil(n / batch), n) for key, n in count.items()}


def applied_from_state(state: Any) -> dict[Key, list[Any]]:
    """`SimulatorState.applied()` as `check_order` takes it, refusing an incomplete log."""
    if not state.applied_complete():
        raise ValueError("the simulator's applied log is incomplete (applied_log_limit reached)")
    applied: dict[Key, list[Any]] = state.applied()
    return applied


def parse_occurred_at(value: object) -> float:
    """Epoch seconds from a number or an RFC 3339 string with a UTC offset."""
    if isinstance(value, bool):
        raise ValueError(f"occurred_at must be a time: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError(f"occurred_at needs a UTC offset: {value!r}")
        return parsed.timestamp()
    raise ValueError(f"occurred_at must be a time: {value!r}")


def enqueued_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[Key, list[Enqueued]]:
    """Per key, the changes of import-format rows (`subscription_group_id`,
    `subscription_state`, one of `external_id`/`email`/`phone`, optional `occurred_at`) in
    the order given. Values are taken as they are: pass them normalised."""
    found: dict[Key, list[Enqueued]] = {}
    for row in rows:
        kinds = [kind for kind in IDENTIFIER_FIELDS if row.get(kind) is not None]
        if len(kinds) != 1:
            raise ValueError("a row needs exactly one of external_id, email, phone")
        kind = kinds[0]
        key = (str(row["subscription_group_id"]), kind, str(row[kind]))
        state = str(row["subscription_state"])
        occurred_at = row.get("occurred_at")
        change: Enqueued = state if occurred_at is None else (parse_occurred_at(occurred_at), state)
        found.setdefault(key, []).append(change)
    return found
