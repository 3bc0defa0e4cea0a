"""A post message's renderings of its arguments (the headers' `argsrepr`/`kwargsrepr` and the
task-sent event's, which Flower shows) are made by `repr` where that gives Celery's
`saferepr` text (tasks/masked_messages.py `_shown_plainly`, issue 26's seventh step: ~55
us a message of ten batch ids against ~2), and left to Celery otherwise."""

from __future__ import annotations

import uuid
from typing import Any

from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.celery_app import app
from tasks.masked_messages import _shown_plainly

texts = st.text(max_size=12) | st.sampled_from(["live-" + uuid.uuid4().hex, "w1", "", "a'b"])
arguments = st.lists(texts | st.lists(texts, max_size=4) | st.integers(), max_size=3)


@settings(max_examples=400, deadline=None)
@given(args=arguments, kwargs=st.dictionaries(texts, texts, max_size=2))
def test_a_plain_rendering_is_celerys_saferepr_text(args: list[Any], kwargs: dict[str, str]):
    for given_args in (args, tuple(args)):
        shown = _shown_plainly(given_args, kwargs, 1024, 1024)
        if shown is not None:
            assert shown == (saferepr(given_args or (), 1024), saferepr(kwargs, 1024))


def test_a_post_messages_headers_and_sent_event_show_its_batch_ids_as_celery_did():
    ids = ["live-" + uuid.uuid4().hex for _ in range(10)]
    for args, kwargs in (((ids,), {"workspace": "eu"}), ((ids[0],), {}), ((ids * 3,), {})):
        message = app.amqp.as_task_v2(
            uuid.uuid4().hex, "subscriptions.post_batches", args, kwargs, create_sent_event=True
        )
        expected = saferepr(args, 1024), saferepr(kwargs, 1024)
        assert (message.headers["argsrepr"], message.headers["kwargsrepr"]) == expected
        assert (message.sent_event["args"], message.sent_event["kwargs"]) == expected
    # Past Celery's size, or a text repr would quote otherwise: Celery renders it.
    assert _shown_plainly((ids * 3,), {}, 1024, 1024) is None
    assert _shown_plainly((["it's"],), {}, 1024, 1024) is None
    assert _shown_plainly((ids,), {}, 1024, 1024) is not None
