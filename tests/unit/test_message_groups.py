"""Several batches in one Celery message (issue 26, the ceiling): how a cut's batch ids are
split into messages (pure; the fleet posting them: e2e/test_message_groups.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from core.planning import MESSAGE_MOST_BATCHES, MESSAGES_AT_LEAST, message_groups


def test_a_few_batches_keep_a_message_each() -> None:
    ids = [f"b{i}" for i in range(MESSAGES_AT_LEAST)]
    assert message_groups(ids) == [[batch_id] for batch_id in ids]


def test_many_batches_share_messages_of_at_most_the_most() -> None:
    ids = [f"b{i}" for i in range(500)]
    groups = message_groups(ids)
    assert len(groups) == 50
    assert {len(group) for group in groups} == {MESSAGE_MOST_BATCHES}


def test_a_cut_just_above_the_floor_is_spread_over_the_floor() -> None:
    groups = message_groups([f"b{i}" for i in range(20)])
    assert len(groups) == MESSAGES_AT_LEAST
    assert sorted(len(group) for group in groups) == [2, 2, 2, 2, 3, 3, 3, 3]


@given(count=st.integers(0, 3000), at_least=st.integers(1, 40), most=st.integers(1, 40))
def test_every_batch_once_in_order_within_bounds(count: int, at_least: int, most: int) -> None:
    ids = [f"b{i}" for i in range(count)]
    groups = message_groups(ids, at_least=at_least, most=most)
    assert [batch_id for group in groups for batch_id in group] == ids
    assert all(group for group in groups)
    if count <= at_least:
        assert len(groups) == count
    else:
        assert len(groups) >= at_least
        assert max(len(g) for g in groups) <= max(most, -(-count // at_least))
        assert max(len(g) for g in groups) - min(len(g) for g in groups) <= 1


def test_a_message_of_several_batches_nacked_is_published_again(monkeypatch) -> None:
    """As a single batch's message (unit/test_broker_url.py): a nacked publish goes again,
    into the lane's queue, with every batch id."""
    from amqp.exceptions import MessageNacked
    from kombu.exceptions import OperationalError

    import tasks.subscriptions as subscriptions

    calls: list[dict] = []

    def publish(**options):
        calls.append(options)
        if len(calls) == 1:
            error = OperationalError("")
            error.__cause__ = MessageNacked()
            raise error

    monkeypatch.setattr(subscriptions.post_batches, "apply_async", publish)
    monkeypatch.setattr(subscriptions.time, "sleep", lambda _s: None)
    subscriptions._dispatch_many("default", ["live-b1", "live-b2", "live-b3"])
    assert len(calls) == 2
    assert all(c["queue"] == "braze-subs.post.live" for c in calls)
    assert calls[-1]["args"] == (["live-b1", "live-b2", "live-b3"],)
