"""What `verify` makes of a row Braze does not match (issue 21 item 1), as a pure function
of the row, Braze's answer and the latest change accepted here. With Redis and the
simulator: tests/integration/test_verify.py."""

from __future__ import annotations

import pytest

from admin.verify import repair_time, weigh
from delivery.braze_reads import ReadState

ROW = 1_000_000
HORIZON = 500_000
SUB, UNSUB, UNKNOWN = ReadState.SUBSCRIBED, ReadState.UNSUBSCRIBED, ReadState.UNKNOWN


@pytest.mark.parametrize(
    ("expected", "braze", "accepted", "outcome"),
    [
        # A change accepted after the row set the other state: the row is out of date.
        ("subscribed", UNSUB, (ROW + 1, "unsubscribed"), "superseded"),
        ("unsubscribed", SUB, (ROW + 1, "subscribed"), "superseded"),
        ("unsubscribed", UNKNOWN, (ROW + 1, "subscribed"), "superseded"),
        # ... or a state the history no longer holds: assume the worst.
        ("unsubscribed", SUB, (ROW + 1, None), "superseded"),
        # Accepted after the row with the row's own state (the import of this file): the
        # row stands; Braze moved since.
        ("unsubscribed", SUB, (ROW + 1, "unsubscribed"), "drift"),
        ("subscribed", UNSUB, (ROW + 1, "subscribed"), "opted_out_in_braze"),
        # Accepted before the row, or at the same time: the row is the newer.
        ("unsubscribed", SUB, (ROW, "subscribed"), "drift"),
        ("subscribed", UNSUB, (ROW - 1, "unsubscribed"), "opted_out_in_braze"),
        ("subscribed", UNKNOWN, (None, None), "unknown"),
        ("unsubscribed", UNKNOWN, (None, None), "unknown"),
    ],
)
def test_weigh(expected: str, braze: ReadState, accepted, outcome: str) -> None:
    assert weigh(expected, braze, ROW, accepted, HORIZON) == outcome


def test_a_row_older_than_the_retention_without_a_watermark_is_left_alone() -> None:
    old = HORIZON - 1
    assert weigh("unsubscribed", SUB, old, (None, None), HORIZON) == "beyond_retention"
    assert weigh("subscribed", UNSUB, old, (None, None), HORIZON) == "beyond_retention"
    # A watermark held says what was accepted since, however old the row.
    assert weigh("unsubscribed", SUB, old, (old - 5, "subscribed"), HORIZON) == "drift"


def test_a_repair_carries_the_row_time_or_the_accepted_change_it_re_applies() -> None:
    assert repair_time(ROW, (None, None)) == ROW
    assert repair_time(ROW, (ROW - 5, "subscribed")) == ROW
    assert repair_time(ROW, (ROW + 5, "subscribed")) == ROW + 5
