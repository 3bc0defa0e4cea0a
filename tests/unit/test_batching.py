"""Unit and property tests for `core.planning`: which changes become which batches."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.changes import IdentifierKind, SubscriptionState
from core.planning import (
    BatchKey,
    PendingChange,
    PlannedBatch,
    latest_per_identifier,
    plan_batches,
    plan_cut,
)

NOW = 1_000_000
GROUPS = ("g1", "g2", "g3")
VALUES = tuple(f"v{i}" for i in range(8))
SUB = SubscriptionState.SUBSCRIBED
UNSUB = SubscriptionState.UNSUBSCRIBED
EXT = IdentifierKind.EXTERNAL_ID

Identity = tuple[str, str, str]


def change(
    value: str,
    *,
    seq: int,
    group: str = "g1",
    kind: IdentifierKind = EXT,
    state: SubscriptionState = SUB,
    doi: bool = False,
    due_ms: int = NOW,
) -> PendingChange:
    return PendingChange(group, kind, value, state, doi, seq, due_ms)


def identity(c: PendingChange) -> Identity:
    return (c.group_id, c.kind, c.value)


def key_of(c: PendingChange) -> BatchKey:
    return BatchKey(c.group_id, c.state, c.kind, c.double_opt_in)


def members(plan: list[PlannedBatch]) -> list[PendingChange]:
    return [m for batch in plan for m in batch.members]


def expected_due_latest(changes: list[PendingChange], now_ms: int) -> set[PendingChange]:
    """Oracle: the newest change of every identifier, if that newest change is due."""
    latest: dict[Identity, PendingChange] = {}
    for c in sorted(changes, key=lambda c: c.seq):
        latest[identity(c)] = c  # a later write replaces an earlier one, due or not
    return {c for c in latest.values() if c.due_ms <= now_ms}


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------


@st.composite
def change_lists(
    draw: st.DrawFn,
    *,
    values: tuple[str, ...] = VALUES,
    max_size: int = 60,
    due_spread: int = 3_000,
) -> list[PendingChange]:
    """Changes over a small alphabet, with increasing seq, given in arbitrary order."""
    rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from(GROUPS[: draw(st.integers(2, 3))]),
                st.sampled_from(list(IdentifierKind)),
                st.sampled_from(values),
                st.sampled_from(list(SubscriptionState)),
                st.booleans(),
                st.integers(-due_spread, due_spread),
            ),
            max_size=max_size,
        )
    )
    # The i-th change written gets seq i (gaps do not matter to the planner).
    changes = [
        PendingChange(group, kind, value, state, doi, seq, NOW + offset)
        for seq, (group, kind, value, state, doi, offset) in enumerate(rows, start=1)
    ]
    return draw(st.permutations(changes))


PROPERTY = settings(max_examples=300, deadline=None)


# --------------------------------------------------------------------------------------
# Properties (linger 0, no max_batches)
# --------------------------------------------------------------------------------------


@PROPERTY
@given(changes=change_lists(), max_identifiers=st.integers(1, 5))
def test_planned_members_are_exactly_the_due_latest_changes(changes, max_identifiers):
    plan = plan_batches(changes, now_ms=NOW, max_identifiers=max_identifiers)
    planned = members(plan)
    # Nothing missing, nothing extra, no stale state, nothing that is not due yet.
    assert set(planned) == expected_due_latest(changes, NOW)
    assert len(planned) == len(set(planned))
    assert all(member.due_ms <= NOW for member in planned)


@PROPERTY
@given(changes=change_lists(), max_identifiers=st.integers(1, 5))
def test_batches_are_uniform_sized_and_oldest_first(changes, max_identifiers):
    plan = plan_batches(changes, now_ms=NOW, max_identifiers=max_identifiers)
    for batch in plan:
        assert 1 <= len(batch.members) <= max_identifiers
        for member in batch.members:
            assert key_of(member) == batch.key
    dues = [batch.oldest_due_ms for batch in plan]
    assert dues == sorted(dues)


@PROPERTY
@given(changes=change_lists(), max_identifiers=st.integers(1, 5))
def test_no_identifier_twice_across_batches(changes, max_identifiers):
    planned = members(plan_batches(changes, now_ms=NOW, max_identifiers=max_identifiers))
    identities = [identity(m) for m in planned]
    assert len(identities) == len(set(identities))


@PROPERTY
@given(
    changes=change_lists(values=tuple(f"user-{i:03d}" for i in range(300)), max_size=400),
    max_identifiers=st.integers(1, 50),
)
def test_at_most_one_non_full_batch_per_key(changes, max_identifiers):
    plan = plan_batches(changes, now_ms=NOW, max_identifiers=max_identifiers)
    per_key: dict[BatchKey, list[PlannedBatch]] = defaultdict(list)
    for batch in plan:
        per_key[batch.key].append(batch)
    due_per_key: dict[BatchKey, int] = defaultdict(int)
    for c in expected_due_latest(changes, NOW):
        due_per_key[key_of(c)] += 1
    assert set(per_key) == set(due_per_key)
    for key, batches in per_key.items():
        partial = [b for b in batches if len(b.members) < max_identifiers]
        assert len(partial) <= 1
        # ... which means the key uses the fewest batches possible.
        assert len(batches) == math.ceil(due_per_key[key] / max_identifiers)


# --------------------------------------------------------------------------------------
# Linger and back-pressure
# --------------------------------------------------------------------------------------


@PROPERTY
@given(
    changes=change_lists(),
    max_identifiers=st.integers(1, 5),
    linger_ms=st.integers(0, 4_000),
)
def test_linger_holds_only_young_partial_batches(changes, max_identifiers, linger_ms):
    eager = plan_batches(changes, now_ms=NOW, max_identifiers=max_identifiers)
    lingering = plan_batches(
        changes, now_ms=NOW, max_identifiers=max_identifiers, linger_ms=linger_ms
    )
    assert set(lingering) <= set(eager)
    for batch in eager:
        if len(batch.members) == max_identifiers:
            assert batch in lingering, "a full batch was held"
        else:
            held = NOW - batch.oldest_due_ms < linger_ms
            assert (batch not in lingering) == held


def test_lone_change_is_held_until_linger_elapsed():
    c = change("a", seq=1, due_ms=NOW - 999)
    assert plan_batches([c], now_ms=NOW, max_identifiers=50, linger_ms=1_000) == []
    plan = plan_batches([c], now_ms=NOW + 1, max_identifiers=50, linger_ms=1_000)
    assert members(plan) == [c]


def test_full_batch_is_never_held():
    full = [change(f"u{i:02d}", seq=i, due_ms=NOW) for i in range(50)]
    plan = plan_batches(full, now_ms=NOW, max_identifiers=50, linger_ms=10**9)
    assert len(plan) == 1
    assert len(plan[0].members) == 50


def test_linger_holds_the_remainder_but_not_the_full_batch():
    changes = [change(f"u{i:02d}", seq=i, due_ms=NOW) for i in range(51)]
    plan = plan_batches(changes, now_ms=NOW, max_identifiers=50, linger_ms=500)
    assert [len(b.members) for b in plan] == [50]


@PROPERTY
@given(
    changes=change_lists(),
    max_identifiers=st.integers(1, 5),
    max_batches=st.integers(-2, 40),
)
def test_max_batches_keeps_the_oldest(changes, max_identifiers, max_batches):
    full = plan_batches(changes, now_ms=NOW, max_identifiers=max_identifiers)
    limited = plan_batches(
        changes, now_ms=NOW, max_identifiers=max_identifiers, max_batches=max_batches
    )
    assert limited == full[: max(0, max_batches)]
    if limited and len(limited) < len(full):
        assert max(b.oldest_due_ms for b in limited) <= min(
            b.oldest_due_ms for b in full[len(limited) :]
        )


@PROPERTY
@given(
    changes=change_lists(),
    max_identifiers=st.integers(1, 5),
    linger_ms=st.integers(0, 4_000),
    max_batches=st.one_of(st.none(), st.integers(0, 40)),
    backlog=st.booleans(),
)
def test_the_cut_names_the_oldest_due_time_it_leaves_out(
    changes, max_identifiers, linger_ms, max_batches, backlog
):
    """`plan_cut` (the tick's planning, issue 26) plans what `plan_batches` plans and says
    when the oldest change it leaves out became due: of the identifiers' newest changes,
    those not planned (a remainder held, a batch past `max_batches`, one not due yet) —
    what the coalescer's `_held_until` used to work out from the changes and the plan."""
    options = dict(
        now_ms=NOW,
        max_identifiers=max_identifiers,
        linger_ms=linger_ms,
        max_batches=max_batches,
        backlog=backlog,
        max_hold_ms=2_000,
    )
    cut = plan_cut(changes, **options)
    assert cut.batches == plan_batches(changes, **options)
    planned = {identity(member) for member in members(cut.batches)}
    left = [c.due_ms for c in latest_per_identifier(changes) if identity(c) not in planned]
    assert cut.held_due_ms == (min(left) if left else None)


def test_max_batches_prefers_the_oldest_key():
    old = [change(f"o{i}", seq=i, group="g2", due_ms=NOW - 5_000) for i in range(3)]
    new = [change(f"n{i}", seq=10 + i, group="g1", due_ms=NOW - 10) for i in range(3)]
    plan = plan_batches(new + old, now_ms=NOW, max_identifiers=2, max_batches=2)
    assert [b.key.group_id for b in plan] == ["g2", "g2"]
    assert plan_batches(new + old, now_ms=NOW, max_identifiers=2, max_batches=0) == []


# --------------------------------------------------------------------------------------
# Last write wins, even when it is not due yet
# --------------------------------------------------------------------------------------


def test_future_change_is_not_planned():
    c = change("a", seq=1, due_ms=NOW + 1)
    assert plan_batches([c], now_ms=NOW, max_identifiers=50) == []
    assert members(plan_batches([c], now_ms=NOW + 1, max_identifiers=50)) == [c]


def test_newer_future_change_hides_older_due_one():
    older_due = change("a", seq=1, state=SUB, due_ms=NOW - 1_000)
    newer_future = change("a", seq=2, state=UNSUB, due_ms=NOW + 1_000)
    for order in ([older_due, newer_future], [newer_future, older_due]):
        # The older change must not be sent: the newer one replaces it when it is due.
        assert plan_batches(order, now_ms=NOW, max_identifiers=50) == []
        later = plan_batches(order, now_ms=NOW + 1_000, max_identifiers=50)
        assert members(later) == [newer_future]


def test_newer_due_change_replaces_older_one():
    older = change("a", seq=1, state=SUB, due_ms=NOW - 2_000)
    newer = change("a", seq=2, state=UNSUB, due_ms=NOW - 1_000)
    plan = plan_batches([newer, older], now_ms=NOW, max_identifiers=50)
    assert members(plan) == [newer]
    assert plan[0].key.state is UNSUB


def test_latest_per_identifier_keeps_highest_seq_regardless_of_order():
    a1 = change("a", seq=1)
    a3 = change("a", seq=3, state=UNSUB)
    a2 = change("a", seq=2)
    b1 = change("b", seq=1)
    a_other_group = change("a", seq=0, group="g2")
    result = latest_per_identifier([a1, a3, a2, b1, a_other_group])
    assert set(result) == {a3, b1, a_other_group}


def test_same_value_different_kind_are_different_identifiers():
    ext = change("x@example.com", seq=1, kind=IdentifierKind.EXTERNAL_ID)
    email = change("x@example.com", seq=2, kind=IdentifierKind.EMAIL)
    assert set(members(plan_batches([ext, email], now_ms=NOW, max_identifiers=50))) == {
        ext,
        email,
    }


# --------------------------------------------------------------------------------------
# Examples and argument checks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_identifiers", [0, -1])
def test_max_identifiers_below_one_raises(max_identifiers):
    with pytest.raises(ValueError):
        plan_batches([change("a", seq=1)], now_ms=NOW, max_identifiers=max_identifiers)


def test_no_changes_no_batches():
    assert plan_batches([], now_ms=NOW, max_identifiers=50) == []


def test_fifty_changes_make_one_full_batch():
    changes = [change(f"u{i:02d}", seq=i) for i in range(50)]
    plan = plan_batches(changes, now_ms=NOW, max_identifiers=50)
    assert len(plan) == 1
    assert set(plan[0].members) == set(changes)
    assert plan[0].key == BatchKey("g1", SUB, EXT, False)


def test_fifty_one_changes_make_fifty_plus_one():
    changes = [change(f"u{i:02d}", seq=i) for i in range(51)]
    plan = plan_batches(changes, now_ms=NOW, max_identifiers=50)
    assert sorted(len(b.members) for b in plan) == [1, 50]
    assert set(members(plan)) == set(changes)


def test_two_states_of_one_group_make_two_batches():
    subscribed = [change(f"s{i}", seq=i, state=SUB) for i in range(3)]
    unsubscribed = [change(f"u{i}", seq=10 + i, state=UNSUB) for i in range(2)]
    plan = plan_batches(subscribed + unsubscribed, now_ms=NOW, max_identifiers=50)
    assert len(plan) == 2
    by_state = {b.key.state: set(b.members) for b in plan}
    assert by_state == {SUB: set(subscribed), UNSUB: set(unsubscribed)}


def test_double_opt_in_splits_batches():
    plain = change("+14155550100", seq=1, kind=IdentifierKind.PHONE)
    doi = change("+14155550101", seq=2, kind=IdentifierKind.PHONE, doi=True)
    plan = plan_batches([plain, doi], now_ms=NOW, max_identifiers=50)
    assert {b.key.double_opt_in for b in plan} == {False, True}


def test_members_are_ordered_by_value():
    changes = [change(v, seq=i) for i, v in enumerate(["c", "a", "d", "b"])]
    plan = plan_batches(changes, now_ms=NOW, max_identifiers=3)
    assert [[m.value for m in b.members] for b in plan] == [["a", "b", "c"], ["d"]]


def test_oldest_due_ms_is_min_of_members():
    batch = PlannedBatch(
        BatchKey("g1", SUB, EXT, False),
        (change("a", seq=1, due_ms=5), change("b", seq=2, due_ms=3)),
    )
    assert batch.oldest_due_ms == 3
