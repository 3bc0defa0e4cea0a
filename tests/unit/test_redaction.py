"""Unit tests for `core.redaction`: masks hide most of emails and phones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.redaction import mask_email, mask_identifier, mask_phone, mask_text


@pytest.mark.parametrize(
    ("email", "masked"),
    [
        ("jane.doe@example.com", "j***@example.com"),
        ("a@example.com", "a***@example.com"),
        ("@example.com", "***@example.com"),
        ("john.smith+news@mail.example.co.uk", "j***@mail.example.co.uk"),
    ],
)
def test_mask_email(email, masked):
    assert mask_email(email) == masked


def test_mask_email_without_at_masks_everything_but_the_first_character():
    assert mask_email("not-an-email") == "n***"
    assert mask_email("") == ""


@settings(max_examples=200, deadline=None)
@given(
    local=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=64),
    domain=st.from_regex(r"[a-z0-9]{1,20}\.[a-z]{2,6}", fullmatch=True),
)
def test_mask_email_reveals_at_most_one_character_of_the_local_part(local, domain):
    masked = mask_email(f"{local}@{domain}")
    masked_local, at, masked_domain = masked.partition("@")
    assert at == "@"
    assert masked_domain == domain
    assert masked_local == local[0] + "***"  # the length of the local part is hidden too


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("+14155550100", "+1*******100"),
        ("+447911123456", "+4********456"),
        ("+12345", "******"),
        ("12345", "*****"),
        ("+1", "**"),
        ("", ""),
    ],
)
def test_mask_phone(phone, masked):
    assert mask_phone(phone) == masked


@settings(max_examples=200, deadline=None)
@given(phone=st.from_regex(r"\+[1-9][0-9]{9,14}", fullmatch=True))
def test_mask_phone_hides_most_digits_of_real_numbers(phone):
    masked = mask_phone(phone)
    assert len(masked) == len(phone)
    assert masked[:2] == phone[:2]
    assert masked[-3:] == phone[-3:]
    assert set(masked[2:-3]) == {"*"}
    shown_digits = sum(ch.isdigit() for ch in masked)
    assert shown_digits <= 4  # country-code digit and the last three
    assert shown_digits < sum(ch.isdigit() for ch in phone) / 2


def test_mask_text():
    assert mask_text("secret") == "s***"
    assert mask_text("x") == "x***"
    assert mask_text("") == ""


@pytest.mark.parametrize(
    ("kind", "value", "masked"),
    [
        ("email", "jane.doe@example.com", "j***@example.com"),
        ("phone", "+14155550100", "+1*******100"),
        ("external_id", "user-123", "user-123"),
        ("external_id", "jane.doe@example.com", "jane.doe@example.com"),
    ],
)
def test_mask_identifier(kind, value, masked):
    assert mask_identifier(kind, value) == masked


def test_mask_identifier_accepts_the_enum():
    from core.changes import IdentifierKind

    assert mask_identifier(IdentifierKind.EMAIL, "jane@example.com") == "j***@example.com"
    assert mask_identifier(IdentifierKind.PHONE, "+14155550100") == "+1*******100"
    assert mask_identifier(IdentifierKind.EXTERNAL_ID, "u-1") == "u-1"


# --------------------------------------------------------------------------------------
# What this project's Celery app puts in a record_change message and its task-sent event
# --------------------------------------------------------------------------------------


def _message(name: str, kwargs: dict, **options):
    from celery import Celery

    # A fresh app with the same message factory, so the test needs no broker or settings.
    app = Celery("t", amqp="tasks.masked_messages:MaskingAMQP", set_as_current=False)
    app.conf.task_send_sent_event = True
    return app.amqp.create_task_message("id-1", name, (), kwargs, create_sent_event=True, **options)


def test_record_change_messages_and_sent_events_carry_masked_identifiers():
    kwargs = {
        "subscription_group_id": "sms",
        "subscription_state": "subscribed",
        "phone": "+14155550123",
    }
    headers, _properties, body, sent_event = _message("subscriptions.record_change", kwargs)
    for shown in (headers["kwargsrepr"], sent_event["kwargs"]):
        assert "+14155550123" not in shown
        assert "'phone': '+1*******123'" in shown and "'subscription_group_id': 'sms'" in shown
    assert body[1] == kwargs  # the task itself still gets the real value


def test_other_tasks_and_explicit_renderings_are_left_alone():
    headers, *_ = _message("subscriptions.post_batch", {"batch_id": "abc"})
    assert headers["kwargsrepr"] == "{'batch_id': 'abc'}"
    headers, *_ = _message(
        "subscriptions.record_change", {"email": "jane@example.com"}, kwargsrepr="<given>"
    )
    assert headers["kwargsrepr"] == "<given>"
