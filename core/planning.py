"""How pending changes become batches: pure logic, no I/O.

A batch is one Braze request's worth of identifiers that share everything else the request
says: group, state, identifier kind and the double opt-in flag. The planner takes the
changes that are due, keeps the newest per identifier, and cuts each key's identifiers into
batches of at most `max_identifiers`. Full batches go at once; the last, partial batch of a
key waits for company until its oldest change has been due for `linger_ms`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class PendingChange:
    """A change as the buffer holds it: validated, sequenced, with its due time."""

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
    if max_identifiers < 1:
        raise ValueError("max_identifiers must be at least 1")
    by_key: dict[BatchKey, list[PendingChange]] = defaultdict(list)
    for change in latest_per_identifier(changes):
        if change.due_ms <= now_ms:
            key = BatchKey(change.group_id, change.state, change.kind, change.double_opt_in)
            by_key[key].append(change)

    planned: list[PlannedBatch] = []
    for key, members in by_key.items():
        members.sort(key=lambda change: change.value)
        for start in range(0, len(members), max_identifiers):
            batch = PlannedBatch(key, tuple(members[start : start + max_identifiers]))
            waited = now_ms - batch.oldest_due_ms
            if len(batch.members) == max_identifiers or (
                waited >= linger_ms and (not backlog or waited >= max_hold_ms)
            ):
                planned.append(batch)

    # Oldest first, so that under back-pressure no key waits behind a busier one forever.
    planned.sort(key=lambda batch: (batch.oldest_due_ms, batch.key))
    return planned if max_batches is None else planned[: max(0, max_batches)]


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
