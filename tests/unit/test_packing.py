"""v2 packing: which batches may share one request (pure; what it saves: e2e/test_packing.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from core.changes import IdentifierKind, SubscriptionState
from core.planning import BatchKey, PendingChange, PlannedBatch, pack_batches

KINDS = list(IdentifierKind)
STATES = list(SubscriptionState)


def batch(group: str, kind: IdentifierKind, values: list[str], state=SubscriptionState.SUBSCRIBED):
    key = BatchKey(group, state, kind, False)
    members = tuple(
        PendingChange(group, kind, value, state, False, seq, 0)
        for seq, value in enumerate(sorted(set(values)))
    )
    return PlannedBatch(key, members)


batches_strategy = st.lists(
    st.builds(
        batch,
        group=st.sampled_from(["a", "b", "c", "d", "e"]),
        kind=st.sampled_from(KINDS),
        values=st.lists(st.sampled_from([f"v{i}" for i in range(80)]), min_size=1, max_size=50),
        state=st.sampled_from(STATES),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(batches=batches_strategy, max_identifiers=st.integers(min_value=1, max_value=50))
def test_every_pack_is_a_valid_v2_request(batches, max_identifiers):
    batches = [b for b in batches if len(b.members) <= max_identifiers]
    packs = pack_batches(batches, max_identifiers=max_identifiers)
    packed = [b for pack in packs for b in pack]
    assert sorted(map(id, packed)) == sorted(map(id, batches)), "each batch in one pack"
    for pack in packs:
        assert pack
        assert len({b.key.kind for b in pack}) == 1, "one identifier kind per request"
        assert len({b.key.group_id for b in pack}) == len(pack), "no group twice"
        distinct = {m.value for b in pack for m in b.members}
        assert len(distinct) <= max_identifiers


def test_the_same_users_in_many_groups_pack_into_one_request():
    users = [f"user-{n}" for n in range(50)]
    groups = [batch(f"group-{g}", IdentifierKind.EXTERNAL_ID, users) for g in range(8)]
    assert [len(pack) for pack in pack_batches(groups, max_identifiers=50)] == [8]


def test_emails_and_phones_never_share_a_request():
    email = batch("news", IdentifierKind.EMAIL, ["a@example.com"])
    phone = batch("sms", IdentifierKind.PHONE, ["+14155550100"])
    assert len(pack_batches([email, phone], max_identifiers=50)) == 2


def test_full_batches_of_different_users_stay_apart():
    first = batch("a", IdentifierKind.EXTERNAL_ID, [f"x{n}" for n in range(50)])
    second = batch("b", IdentifierKind.EXTERNAL_ID, [f"y{n}" for n in range(50)])
    assert len(pack_batches([first, second], max_identifiers=50)) == 2
