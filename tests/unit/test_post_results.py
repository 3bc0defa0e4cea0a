"""The post tasks' results as Flower and the success log line show them (issue 26): a
report's dict as `dataclasses.asdict` made it, rendered by `repr` as Celery's `saferepr`
rendered the plain data, at a twelfth of its cost."""

from __future__ import annotations

import ast
from dataclasses import asdict, fields

from celery.utils.saferepr import saferepr
from celery.utils.text import truncate

from core.outcome import PostStatus
from delivery.poster import PostReport
from tasks.subscriptions import Shown

# Celery's default `resultrepr_maxsize`: the length a result is shown up to.
SHOWN_UP_TO = 1024


def every_field_set(index: int = 0) -> PostReport:
    return PostReport(
        batch_id=f"0190a8b2c3d4e5f6a7b8c9d0e1f2a3b{index}",
        status=PostStatus.RETRY,
        size=50,
        entries=2,
        http_status=503,
        latency_ms=3.25,
        attempt=3,
        retry_in=1.5,
        detail="Braze answered 503: 'busy' \"again\"",
    )


def test_a_reports_dict_is_asdicts_with_every_field():
    report = every_field_set()
    assert report.as_dict() == asdict(report)
    assert list(report.as_dict()) == [field.name for field in fields(PostReport)]
    assert type(report.as_dict()["status"]) is str  # shown 'retry', as saferepr showed it
    assert PostReport("b", PostStatus.DELIVERED).as_dict() == asdict(
        PostReport("b", PostStatus.DELIVERED)
    )


def delivered(index: int) -> PostReport:
    return PostReport(
        f"0190a8b2c3d4e5f6a7b8c9d0e1f2a3b{index}",
        PostStatus.DELIVERED,
        size=50,
        entries=1,
        http_status=201,
        latency_ms=3.25,
        attempt=1,
    )


def test_a_result_is_shown_as_saferepr_showed_its_plain_data():
    report = delivered(0)
    shown = saferepr(Shown(report.as_dict()), SHOWN_UP_TO)
    assert shown == saferepr(asdict(report), SHOWN_UP_TO)
    assert Shown(report.as_dict()) == asdict(report)
    # A text with a quote in it is quoted as `repr` quotes it: the same value.
    quoted = every_field_set()
    shown = saferepr(Shown(quoted.as_dict()), SHOWN_UP_TO)
    assert ast.literal_eval(shown) == ast.literal_eval(saferepr(asdict(quoted), SHOWN_UP_TO))
    # Ten reports are longer than the limit: the same text, cut where Celery's `truncate`
    # cuts a text (saferepr cut at the token that crossed it and closed the brackets).
    reports = [delivered(index) for index in range(10)]
    before = saferepr([asdict(report) for report in reports], SHOWN_UP_TO)
    now = saferepr(Shown([report.as_dict() for report in reports]), SHOWN_UP_TO)
    assert now == truncate(repr([report.as_dict() for report in reports]), SHOWN_UP_TO)
    assert len(before) > SHOWN_UP_TO
    same = next(i for i, (a, b) in enumerate(zip(before, now, strict=False)) if a != b)
    assert same >= SHOWN_UP_TO - len("'latency_ms': 3.25, ")
