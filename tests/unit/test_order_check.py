"""The order oracle (`simulator.order_check`): pure, checked against independent oracles."""

from __future__ import annotations

import itertools
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.model import Applied
from simulator.order_check import (
    Violation,
    applied_from_document,
    check_key,
    check_order,
    enqueue_order,
    enqueued_from_rows,
    mask,
)

S, U = "subscribed", "unsubscribed"
KEY = ("g1", "email", "jane.doe@example.com")


# --- independent oracles ------------------------------------------------------------------


def brute_subsequence(applied: tuple[str, ...], order: tuple[str, ...]) -> bool:
    """Some choice of increasing positions in `order` spells `applied` (tries them all)."""
    return any(
        tuple(order[i] for i in positions) == applied
        for positions in itertools.combinations(range(len(order)), len(applied))
    )


def collapse_runs(applied: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(state for state, _run in itertools.groupby(applied))


def recursive_subsequence(applied: tuple[str, ...], order: tuple[str, ...]) -> bool:
    """Non-greedy: match applied[i:] into order[j:], trying every next position."""

    @cache
    def fits(i: int, j: int) -> bool:
        if i == len(applied):
            return True
        return any(order[k] == applied[i] and fits(i + 1, k + 1) for k in range(j, len(order)))

    return fits(0, 0)


def sequences(alphabet: tuple[str, ...], longest: int) -> list[tuple[str, ...]]:
    return [seq for n in range(longest + 1) for seq in itertools.product(alphabet, repeat=n)]


# --- exhaustive -----------------------------------------------------------------------------


@pytest.mark.parametrize(("alphabet", "longest"), [((S, U), 6), (("a", "b", "c"), 4)])
def test_every_pair_of_short_sequences_agrees_with_brute_force(alphabet, longest):
    """Every enqueued x applied pair up to the length: strict mode is exactly 'a
    subsequence'; the default also accepts a state re-applied right after itself."""
    checked = 0
    for order in sequences(alphabet, longest):
        for applied in sequences(alphabet, longest):
            strict = check_key(KEY, list(order), applied, allow_repeats=False)
            assert (strict is None) == brute_subsequence(applied, order), (order, applied)
            lenient = check_key(KEY, list(order), applied)
            expected = brute_subsequence(collapse_runs(applied), order)
            assert (lenient is None) == expected, (order, applied)
            checked += 1
    assert checked == len(sequences(alphabet, longest)) ** 2


# --- properties -----------------------------------------------------------------------------

states = st.sampled_from([S, U])


@settings(max_examples=400, deadline=None)
@given(order=st.lists(states, max_size=14), applied=st.lists(states, max_size=14))
def test_random_sequences_agree_with_a_non_greedy_oracle(order, applied):
    found = check_key(KEY, order, applied, allow_repeats=False)
    assert (found is None) == recursive_subsequence(tuple(applied), tuple(order))


@settings(max_examples=300, deadline=None)
@given(order=st.lists(states, min_size=1, max_size=20), data=st.data())
def test_any_subsequence_with_duplicate_deliveries_passes(order, data):
    picked = data.draw(st.lists(st.sampled_from(range(len(order))), unique=True))
    applied: list[str] = []
    for index in sorted(picked):
        copies = data.draw(st.integers(1, 3))  # a retried post applies the same state again
        applied += [order[index]] * copies
    assert check_key(KEY, order, applied) is None


@settings(max_examples=300, deadline=None)
@given(order=st.lists(states, min_size=2, max_size=20), data=st.data())
def test_a_stale_state_after_the_newest_is_caught(order, data):
    """Deliver up to the last change, then an older state that differs from it."""
    last = order[-1]
    older = [i for i, state in enumerate(order) if state != last]
    if not older:
        return
    stale = order[data.draw(st.sampled_from(older))]
    found = check_key(KEY, order, [*order, stale])
    assert found == Violation(
        "g1", "email", mask(KEY[2]), last, stale, len(order), "older_after_newer"
    )


@settings(max_examples=200, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.integers(0, 10**9), states), min_size=1, max_size=12, unique_by=lambda c: c[0]
    ),
    data=st.data(),
)
def test_occurred_at_order_does_not_depend_on_arrival_order(changes, data):
    shuffled = data.draw(st.permutations(changes))
    by_time = [state for _t, state in sorted(changes)]
    assert enqueue_order(shuffled) == by_time
    assert check_key(KEY, shuffled, by_time) is None


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_mask_hides_at_least_a_third_and_never_the_whole_value(value):
    masked = mask(value)
    keep = min(3, (len(value) - 1) // 3)
    assert masked == (f"{value[:keep]}***{value[-keep:]}" if keep > 0 else "***")
    assert 2 * keep <= len(value) - len(value) // 3


# --- examples -------------------------------------------------------------------------------


def test_violation_names_the_identifier_masked_and_both_states():
    enqueued = {KEY: [S, U]}
    violations = check_order(enqueued, {KEY: [U, S]})
    assert violations == [Violation("g1", "email", "jan***com", U, S, 1, "older_after_newer")]
    message = str(violations[0])
    assert "jan***com" in message and "jane.doe" not in message
    assert "'subscribed' arrived after the newer 'unsubscribed'" in message


def test_in_order_keys_pass_and_coalesced_changes_may_be_skipped():
    other = ("g2", "phone", "+14155550100")
    enqueued = {KEY: [S, U, S, U], other: [U, S]}
    assert check_order(enqueued, {KEY: [S, U], other: [S]}) == []
    assert check_order(enqueued, {KEY: [U]}) == []  # only the newest arrived


def test_a_key_applied_but_never_enqueued_is_a_violation():
    stray = ("g1", "external_id", "user-1234567")
    (violation,) = check_order({KEY: [S]}, {KEY: [S], stray: [U]})
    assert (violation.reason, violation.arrived, violation.newer) == ("never_enqueued", U, None)
    assert violation.masked_value == "use***567"
    assert "never enqueued" in str(violation)


def test_strict_mode_counts_a_repeated_state():
    assert check_key(KEY, [S], [S, S]) is None
    found = check_key(KEY, [S], [S, S], allow_repeats=False)
    assert found is not None and (found.newer, found.arrived) == (S, S)


def test_external_changes_are_not_braze_subs_writes():
    """An opt-out made in Braze between two of our writes is left out of the check."""
    applied = [
        Applied(1.0, S, "v1", 0),
        Applied(2.0, U, "external", None),
        Applied(3.0, S, "v2", 1),
    ]
    assert check_order({KEY: [S]}, {KEY: applied}) == []
    as_json = [entry.to_json() for entry in applied]
    assert check_order({KEY: [S]}, {KEY: as_json}) == []
    assert check_order({KEY: [U, S]}, {KEY: [*applied, Applied(4.0, U, "v1", 2)]}) != []


def test_occurred_at_ties_keep_enqueue_order_and_mixing_is_refused():
    assert enqueue_order([(5.0, U), (5.0, S), (1.0, U)]) == [U, U, S]
    with pytest.raises(ValueError, match="all carry occurred_at or none"):
        enqueue_order([S, (1.0, U)])
    with pytest.raises(ValueError, match="finite"):
        enqueue_order([(float("nan"), S)])


def test_applied_document_refuses_an_incomplete_log():
    item = {"group": "g1", "kind": "email", "value": KEY[2], "states": [{"state": S}]}
    assert applied_from_document({"complete": True, "applied": [item]}) == {KEY: [{"state": S}]}
    with pytest.raises(ValueError, match="incomplete"):
        applied_from_document({"complete": False, "applied": [item]})


def test_enqueued_from_rows_reads_import_rows():
    rows = [
        {"subscription_group_id": "g1", "subscription_state": S, "email": KEY[2]},
        {"subscription_group_id": "g1", "subscription_state": U, "email": KEY[2]},
        {
            "subscription_group_id": "g2",
            "subscription_state": U,
            "external_id": "u1",
            "occurred_at": "2026-01-01T00:00:01Z",
        },
        {
            "subscription_group_id": "g2",
            "subscription_state": S,
            "external_id": "u1",
            "occurred_at": 1767225600,  # 2026-01-01T00:00:00Z: older, so it loses
        },
    ]
    enqueued = enqueued_from_rows(rows)
    assert enqueued[KEY] == [S, U]
    assert enqueue_order(enqueued[("g2", "external_id", "u1")]) == [S, U]
    with pytest.raises(ValueError, match="exactly one"):
        enqueued_from_rows([{"subscription_group_id": "g", "subscription_state": S}])
    with pytest.raises(ValueError, match="UTC offset"):
        enqueued_from_rows(
            [{**rows[2], "occurred_at": "2026-01-01T00:00:00"}]  # no offset
        )
