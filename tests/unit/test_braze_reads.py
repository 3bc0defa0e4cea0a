"""Reading Braze's read answers: both forms of the state, the shapes, chunks of 100."""

from __future__ import annotations

import json

import pytest

from delivery.braze_reads import (
    MAX_READ_IDENTIFIERS,
    BrazeReadError,
    ReadState,
    chunked,
    parse_read_state,
    parse_status_reply,
    parse_user_reply,
)


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("subscribed", ReadState.SUBSCRIBED),
        ("Unsubscribed", ReadState.UNSUBSCRIBED),
        ("unknown", ReadState.UNKNOWN),
        # The older form (seed 003): 0 subscribed, 1 unsubscribed, null unknown.
        (0, ReadState.SUBSCRIBED),
        (1, ReadState.UNSUBSCRIBED),
        (None, ReadState.UNKNOWN),
        ("0", ReadState.SUBSCRIBED),
        ("1", ReadState.UNSUBSCRIBED),
    ],
)
def test_states_in_either_form(raw, state):
    assert parse_read_state(raw) is state


@pytest.mark.parametrize("raw", [True, 2, "maybe", [], {}, 0.5])
def test_anything_else_is_not_a_state(raw):
    assert parse_read_state(raw) is None


def test_status_reply_gives_every_identifier_sent_a_state():
    body = json.dumps(
        {"status": {"a@x.io": "subscribed", "B@X.IO": 1, "c@x.io": None}, "message": "success"}
    )
    states = parse_status_reply(body, ["a@x.io", "b@x.io", "c@x.io", "d@x.io"])
    assert states == {
        "a@x.io": ReadState.SUBSCRIBED,
        "b@x.io": ReadState.UNSUBSCRIBED,  # echoed in another case
        "c@x.io": ReadState.UNKNOWN,
        "d@x.io": ReadState.UNKNOWN,  # left out of the answer
    }


@pytest.mark.parametrize(
    "body", ["<html>", json.dumps({"message": "success"}), json.dumps({"status": {"a": "x"}})]
)
def test_a_status_reply_of_another_shape_is_one_clear_error(body):
    with pytest.raises(BrazeReadError) as caught:
        parse_status_reply(body, ["a"])
    assert "\n" not in str(caught.value)


def test_user_reply_lists_users_and_their_groups():
    body = json.dumps(
        {
            "users": [
                {
                    "email": "jane@x.io",
                    "external_id": "j1",
                    "subscription_groups": [
                        {"id": "news", "name": "News", "channel": "email", "status": "Subscribed"},
                        {"id": "promo", "channel": "email", "status": "Unsubscribed"},
                        {"name": "no id", "status": "Subscribed"},
                    ],
                }
            ],
            "message": "success",
        }
    )
    (user,) = parse_user_reply(body)
    assert (user.email, user.external_id, user.phone) == ("jane@x.io", "j1", None)
    assert [(g.group_id, g.state, g.name) for g in user.groups] == [
        ("news", ReadState.SUBSCRIBED, "News"),
        ("promo", ReadState.UNSUBSCRIBED, ""),
    ]
    assert user.as_dict()["groups"][0]["state"] == "subscribed"


def test_user_reply_without_users_is_an_error():
    with pytest.raises(BrazeReadError):
        parse_user_reply(json.dumps({"message": "success"}))


def test_chunks_of_at_most_100_in_order():
    values = [str(n) for n in range(250)]
    chunks = list(chunked(values))
    assert [len(chunk) for chunk in chunks] == [MAX_READ_IDENTIFIERS, MAX_READ_IDENTIFIERS, 50]
    assert [v for chunk in chunks for v in chunk] == values
