"""Unit tests for `delivery.braze_client.v1_body`: the JSON of one v1 request."""

from __future__ import annotations

import json

import pytest

from core.changes import IdentifierKind, SubscriptionState
from core.planning import BatchKey
from delivery.braze_client import v1_body

SUB = SubscriptionState.SUBSCRIBED
UNSUB = SubscriptionState.UNSUBSCRIBED


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        (IdentifierKind.EXTERNAL_ID, ("u1", "u2")),
        (IdentifierKind.EMAIL, ("a@example.com",)),
        (IdentifierKind.PHONE, ("+14155550100", "+14155550101", "+14155550102")),
    ],
)
def test_identifier_field_named_after_the_kind(kind, values):
    body = v1_body(BatchKey("group-1", SUB, kind, False), values)
    assert body == {
        "subscription_group_id": "group-1",
        "subscription_state": "subscribed",
        kind.value: list(values),
    }
    assert isinstance(body[kind.value], list)
    others = {"external_id", "email", "phone"} - {kind.value}
    assert not others & body.keys()


def test_state_is_the_plain_string():
    body = v1_body(BatchKey("g", UNSUB, IdentifierKind.EXTERNAL_ID, False), ["u"])
    assert body["subscription_state"] == "unsubscribed"
    assert json.loads(json.dumps(body)) == body  # JSON-serialisable as is


def test_values_are_copied_into_a_new_list():
    values = ["u1", "u2"]
    body = v1_body(BatchKey("g", SUB, IdentifierKind.EXTERNAL_ID, False), values)
    values.append("u3")
    assert body["external_id"] == ["u1", "u2"]


def test_order_of_values_is_kept():
    values = ("c", "a", "b")
    body = v1_body(BatchKey("g", SUB, IdentifierKind.EXTERNAL_ID, False), values)
    assert body["external_id"] == ["c", "a", "b"]


@pytest.mark.parametrize(
    ("state", "doi", "present"),
    [(SUB, True, True), (SUB, False, False), (UNSUB, True, False), (UNSUB, False, False)],
)
@pytest.mark.parametrize("kind", [IdentifierKind.PHONE, IdentifierKind.EXTERNAL_ID])
def test_double_opt_in_only_when_subscribed(kind, state, doi, present):
    body = v1_body(BatchKey("sms-group", state, kind, doi), ["+14155550100"])
    if present:
        assert body["use_double_opt_in_logic"] is True
    else:
        assert "use_double_opt_in_logic" not in body


def test_body_of_fifty_identifiers():
    values = tuple(f"user-{i}" for i in range(50))
    body = v1_body(BatchKey("g", SUB, IdentifierKind.EXTERNAL_ID, False), values)
    assert body["external_id"] == list(values)
    assert len(body) == 3
