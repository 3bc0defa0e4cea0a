"""How pending changes become batches: pure logic, no I/O.

A batch is one Braze request's worth of identifiers that share everything else the request
says: group, state, identifier kind and the double opt-in flag. The planner takes the
changes that are due, keeps the newest per identifier, and cuts each key's identifiers into
batches of at most `max_identifiers`. Full batches go at once; the last, partial batch of a
key waits for company until its oldest change has been due for `linger_ms`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple

from core.changes import IdentifierKind, Lane, SubscriptionState

# A live batch's id starts with this; a bulk batch's id is bare hex. The lane travels with
# the id, so whatever sends a batch a message (a new cut, the schedule, a take-back, the
# sweep) routes it to its lane's queue without reading the record.
LIVE_BATCH_PREFIX = "live-"


def batch_lane(batch_id: str) -> Lane:
    """The lane of a batch, read off its id."""
    return Lane.LIVE if batch_id.startswith(LIVE_BATCH_PREFIX) else Lane.BULK


def lane_prefix(lane: Lane) -> str:
    """What the ids of a lane's batches start with."""
    return LIVE_BATCH_PREFIX if lane is Lane.LIVE else ""


class PendingChange(NamedTuple):
    """A change as the buffer holds it: validated, sequenced, with its due time.

    A named tuple, not a frozen dataclass (issue 26, the tick): every due change a tick
    reads becomes one, 1.3-2 times per change under a backlog, and a frozen dataclass's
    `__init__` sets each of its seven fields through `object.__setattr__` (~3 times the
    cost of a tuple's construction)."""

    group_id: str
    kind: IdentifierKind
    value: str
    state: SubscriptionState
    double_opt_in: bool
    seq: int
    due_ms: int


@dataclass(frozen=True, slots=True, order=True)
class BatchKey:
    """What every identifier in one batch shares."""

    group_id: str
    state: SubscriptionState
    kind: IdentifierKind
    double_opt_in: bool


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    key: BatchKey
    members: tuple[PendingChange, ...]

    @property
    def oldest_due_ms(self) -> int:
        return min(member.due_ms for member in self.members)


def latest_per_identifier(changes: Iterable[PendingChange]) -> list[PendingChange]:
    """Keep, for each (group, kind, value), only the change with the highest sequence."""
    latest: dict[tuple[str, str, str], PendingChange] = {}
    for change in changes:
        slot = (change.group_id, change.kind, change.value)
        current = latest.get(slot)
        if current is None or change.seq > current.seq:
            latest[slot] = change
    return list(latest.values())


def plan_batches(
    changes: Iterable[PendingChange],
    *,
    now_ms: int,
    max_identifiers: int,
    linger_ms: int = 0,
    max_batches: int | None = None,
    backlog: bool = False,
    max_hold_ms: int = 0,
) -> list[PlannedBatch]:
    """Cut the due changes into batches, oldest first.

    - only changes due at `now_ms` take part; for each identifier only its newest change;
    - every batch is uniform in its `BatchKey` and holds 1..`max_identifiers` members, each
      identifier at most once;
    - a key's partial remainder is planned only once its oldest member has been due for
      `linger_ms`; while a `backlog` is being drained (more due changes than were read),
      only once it has been due for `max_hold_ms`, since more of its key may be coming;
    - at most `max_batches` batches (back-pressure); what is left stays in the buffer.

    Members are ordered by value, so the same users changing several groups land in
    aligned batches (v2 can pack those into one request).
    """
    return plan_cut(
        changes,
        now_ms=now_ms,
        max_identifiers=max_identifiers,
        linger_ms=linger_ms,
        max_batches=max_batches,
        backlog=backlog,
        max_hold_ms=max_hold_ms,
    ).batches


class Cut(NamedTuple):
    """A plan (`plan_batches`) and when the oldest due change it leaves out became due."""

    batches: list[PlannedBatch]
    # The lowest due time among the changes read and not planned (a key's remainder held
    # for company, batches past `max_batches`, changes not due yet); None: all planned.
    held_due_ms: int | None


_VALUE = attrgetter("value")


def plan_cut(
    changes: Iterable[PendingChange],
    *,
    now_ms: int,
    max_identifiers: int,
    linger_ms: int = 0,
    max_batches: int | None = None,
    backlog: bool = False,
    max_hold_ms: int = 0,
) -> Cut:
    """`plan_batches`' plan, with the oldest due time of what it leaves out (the coalescer
    ticks again when a held remainder is ready). The tick's planning (issue 26): per due change
    two dict look-ups by plain tuples (the newest per identifier, then its key's list),
    not a `BatchKey` made and hashed in Python per change; a `BatchKey` is made once a
    key and a batch's oldest due time once a batch."""
    if max_identifiers < 1:
        raise ValueError("max_identifiers must be at least 1")
    # The newest change of each identifier (group, kind, value), then its key's members.
    latest: dict[tuple[str, IdentifierKind, str], PendingChange] = {}
    for change in changes:
        slot = (change.group_id, change.kind, change.value)
        current = latest.get(slot)
        if current is None or change.seq > current.seq:
            latest[slot] = change
    by_key: dict[tuple[str, SubscriptionState, IdentifierKind, bool], list[PendingChange]]
    by_key = {}
    for change in latest.values():
        key = (change.group_id, change.state, change.kind, change.double_opt_in)
        members = by_key.get(key)
        if members is None:
            by_key[key] = [change]
        else:
            members.append(change)
    # A superseded change is not held: the buffer holds the newer one in its place.
    held: int | None = None

    planned: list[tuple[int, BatchKey, PlannedBatch]] = []
    for key_tuple, changes_of_key in by_key.items():
        members = sorted(
            (change for change in changes_of_key if change.due_ms <= now_ms), key=_VALUE
        )
        if len(members) < len(changes_of_key):
            for change in changes_of_key:
                if change.due_ms > now_ms and (held is None or change.due_ms < held):
                    held = change.due_ms
        if not members:
            continue
        key = BatchKey(*key_tuple)
        for start in range(0, len(members), max_identifiers):
            chunk = tuple(members[start : start + max_identifiers])
            oldest = min(member.due_ms for member in chunk)
            waited = now_ms - oldest
            if len(chunk) == max_identifiers or (
                waited >= linger_ms and (not backlog or waited >= max_hold_ms)
            ):
                planned.append((oldest, key, PlannedBatch(key, chunk)))
            elif held is None or oldest < held:
                held = oldest

    # Oldest first, so that under back-pressure no key waits behind a busier one forever.
    planned.sort(key=lambda entry: (entry[0], entry[1]))
    if max_batches is not None:
        for oldest, _key, _batch in planned[max(0, max_batches) :]:
            if held is None or oldest < held:
                held = oldest
        planned = planned[: max(0, max_batches)]
    return Cut([batch for _oldest, _key, batch in planned], held)


# Most entries (groups) in one v2 request. SPEC.md sets no number; 50 keeps a request's
# size in line with v1's 50 identifiers.
MAX_PACK_ENTRIES = 50


def pack_batches(
    batches: Iterable[PlannedBatch],
    *,
    max_identifiers: int,
    max_entries: int = MAX_PACK_ENTRIES,
) -> list[list[PlannedBatch]]:
    """Group batches into packs that one v2 request can carry together.

    A pack holds batches of one identifier kind only (SPEC: a request with emails or phones
    cannot mix email and SMS groups; one kind per request is always safe), at most
    `max_identifiers` distinct identifiers in all (the same user in several groups counts
    once), no group twice, and at most `max_entries` batches. Batches with the same members
    sort next to each other, so "the same users changed several groups" packs fully.
    """
    packs: list[list[PlannedBatch]] = []
    ordered = sorted(batches, key=lambda b: (b.key.kind, tuple(m.value for m in b.members), b.key))
    current: list[PlannedBatch] = []
    values: set[str] = set()
    groups: set[str] = set()
    for batch in ordered:
        batch_values = {member.value for member in batch.members}
        fits = (
            current
            and current[0].key.kind == batch.key.kind
            and len(current) < max_entries
            and batch.key.group_id not in groups
            and len(values | batch_values) <= max_identifiers
        )
        if not fits:
            if current:
                packs.append(current)
            current, values, groups = [], set(), set()
        current.append(batch)
        values |= batch_values
        groups.add(batch.key.group_id)
    if current:
        packs.append(current)
    return packs


# Several batches in one Celery message (issue 26, the ceiling). A message costs the fleet
# about as much as a batch's whole post: the tick's publish and its task-sent event, the
# worker's consume, its received/started/succeeded events (Flower's) and the ack. While the
# budget is far from binding, the pipeline's own CPU is the ceiling, so a tick that cuts
# many batches sends them in fewer messages, each posted batch by batch by one worker
# thread (`subscriptions.post_batches`). At least MESSAGES_AT_LEAST messages keep that many
# threads posting side by side; at most MESSAGE_MOST_BATCHES in one keep a message's last
# batch from waiting long behind its first ones.
MESSAGES_AT_LEAST = 8
MESSAGE_MOST_BATCHES = 10


def message_groups(
    batch_ids: list[str],
    *,
    at_least: int = MESSAGES_AT_LEAST,
    most: int = MESSAGE_MOST_BATCHES,
) -> list[list[str]]:
    """`batch_ids` (in the order they were cut: oldest due first) split into consecutive
    groups, one message each: one batch a message while there are no more than
    `at_least`; otherwise as few messages as hold at most `most` batches each, but never
    fewer than `at_least`, their sizes differing by one at most."""
    count = len(batch_ids)
    if count <= at_least:
        return [[batch_id] for batch_id in batch_ids]
    messages = max(at_least, -(-count // max(1, most)))
    size, extra = divmod(count, messages)
    groups: list[list[str]] = []
    start = 0
    for index in range(messages):
        stop = start + size + (1 if index < extra else 0)
        groups.append(batch_ids[start:stop])
        start = stop
    return groups
