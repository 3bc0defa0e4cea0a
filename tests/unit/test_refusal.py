"""What a 400 says about a batch, and the errors of a 2xx (core.refusal)."""

from __future__ import annotations

import pytest

from core.refusal import Sibling, Verdict, decide_bad_request, delivery_errors, names_group

VALUES = ("a@example.com", "b@example.com", "c@example.com")


def decide(message: str, sibling: Sibling | None = None, values=VALUES) -> Verdict:
    return decide_bad_request(message, group_id="news", values=values, sibling=sibling).verdict


@pytest.mark.parametrize(
    "message",
    [
        "HTTP 400: Unknown subscription_group_id: news",
        "HTTP 400: Subscription group news is an SMS group: emails are not accepted",
        "HTTP 400: subscription_groups[0]: Unknown subscription_group_id: news",
    ],
)
def test_a_message_naming_the_group_condemns_the_batch(message):
    assert decide(message) is Verdict.CONDEMN
    assert decide(message, values=VALUES[:1]) is Verdict.CONDEMN


def test_the_group_id_alone_or_as_an_identifier_is_not_a_group_refusal():
    assert not names_group("HTTP 400: Invalid external_id: news", "news", ("news",))
    assert not names_group("HTTP 400: news letter broke", "news")
    assert not names_group("HTTP 400: Unknown subscription_group_id: newsletter", "news")


def test_a_named_identifier_is_isolated_or_dead_lettered_alone():
    decision = decide_bad_request(
        "HTTP 400: Invalid email: b@example.com", group_id="news", values=VALUES
    )
    assert (decision.verdict, decision.isolate) == (Verdict.ISOLATE, "b@example.com")
    assert decide("HTTP 400: Invalid email: a@example.com", values=VALUES[:1]) is (
        Verdict.DEAD_LETTER
    )


@pytest.mark.parametrize(
    ("sibling", "verdict"),
    [
        (None, Verdict.SPLIT),
        (Sibling.PENDING, Verdict.HOLD),
        (Sibling.REFUSED, Verdict.CONDEMN),
        (Sibling.GONE, Verdict.SPLIT),
    ],
)
def test_an_anonymous_400_splits_unless_the_sibling_half_was_refused_too(sibling, verdict):
    assert decide("HTTP 400: Bad request", sibling) is verdict


def test_a_single_identifier_of_a_half_follows_its_sibling():
    assert decide("HTTP 400: Bad request", Sibling.GONE, VALUES[:1]) is Verdict.DEAD_LETTER
    assert decide("HTTP 400: Bad request", Sibling.REFUSED, VALUES[:1]) is Verdict.CONDEMN


def test_delivery_errors_read_from_a_2xx_body():
    assert delivery_errors('{"message": "success"}') == []
    assert delivery_errors("not json") == []
    assert delivery_errors('{"message": "success", "errors": ["x", {"email": "a"}]}') == [
        "x",
        '{"email":"a"}',
    ]
