"""`occurred_at`, `source` and `respect_opt_out` travel with a change from every entry point
(Python API, Celery task function, CLI, import) through the buffer into the batch record and
the dead-letter store, against a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from delivery.services import services
from stores.batch_records import BatchRecord
from stores.buffer import Buffer
from stores.clock import server_time_ms
from stores.dead_letters import DeadLetters
from stores.keys import buffer_field
from tasks.bulk_import import enqueue_file
from tasks.producer import enqueue_change, enqueue_changes
from tasks.subscriptions import record_change
from tests.cli_runs import run_real
from tests.conftest import email, take_each

GROUP = "news"
OCCURRED = "2026-01-02T03:04:05.678Z"
OCCURRED_MS = 1_767_323_045_678


def pending(buffer: Buffer, value: str, group: str = GROUP, kind: str = "email") -> dict[str, Any]:
    raw = buffer.client.hget(buffer.keys.pending, buffer_field(group, kind, value))
    assert raw is not None, f"nothing pending for {value}"
    return json.loads(raw)


def take_all(buffer: Buffer) -> list[BatchRecord]:
    from core.planning import plan_batches

    now = server_time_ms(buffer.client)
    changes, _ = buffer.read_due(now, 10_000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50, linger_ms=0)
    return [
        BatchRecord.from_json(buffer.client.get(buffer.keys.batch(batch_id)))
        for batch_id, _ in take_each(buffer, plan, 60_000)
    ]


def test_python_api_carries_the_fields_into_the_batch_record(env, redis_client):
    buffer = services().buffer
    before = server_time_ms(redis_client)
    enqueue_change(
        subscription_group_id=GROUP,
        subscription_state="subscribed",
        email=email(1),
        occurred_at=OCCURRED,
        source="checkout-form",
        respect_opt_out=True,
    )
    enqueue_changes(
        [
            {
                "subscription_group_id": GROUP,
                "subscription_state": "subscribed",
                "email": email(2),
                "occurred_at": 1_767_323_045,
            },
        ]
    )
    first, second = pending(buffer, email(1)), pending(buffer, email(2))
    assert (first["w"], first["c"], first["r"]) == (OCCURRED_MS, "checkout-form", 1)
    assert (second["w"], second.get("c"), second.get("r")) == (1_767_323_045_000, None, None)
    # Without occurred_at, Redis's clock at arrival (the due time, less any delay) stands in.
    enqueue_change(subscription_group_id=GROUP, subscription_state="subscribed", email=email(3))
    third = pending(buffer, email(3))
    assert "w" not in third and third["t"] >= before

    [record] = take_all(buffer)
    assert set(record.values) == {email(1), email(2), email(3)}
    assert record.respect_opt_out == {email(1)}


def test_celery_task_function_takes_the_new_keyword_arguments(env, redis_client):
    result = record_change(
        subscription_group_id=GROUP,
        subscription_state="unsubscribed",
        phone="+14155550100",
        occurred_at=OCCURRED,
        source="sms-stop",
        respect_opt_out="false",
    )
    assert result == {"group": GROUP, "state": "unsubscribed", "kind": "phone"}
    change = pending(services().buffer, "+14155550100", kind="phone")
    assert (change["w"], change["c"], change.get("r")) == (OCCURRED_MS, "sms-stop", None)


def test_dead_letter_replay_keeps_occurred_at_and_respect_opt_out(env, redis_client):
    found = services()
    enqueue_change(
        subscription_group_id=GROUP,
        subscription_state="subscribed",
        email=email(1),
        occurred_at=OCCURRED,
        respect_opt_out=True,
    )
    [record] = take_all(found.buffer)
    claim = found.batches.claim(record.id, "token", 60_000)
    assert claim.record is not None and claim.record.respect_opt_out == {email(1)}
    found.batches.dead_letter(record.id, "token", "HTTP 500")
    assert DeadLetters(redis_client, found.keys).replay(None).requeued == 1
    change = pending(found.buffer, email(1))
    assert (change["w"], change["r"]) == (OCCURRED_MS, 1)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_import_jsonl_and_csv_columns(env, redis_client, tmp_path):
    buffer = services().buffer
    jsonl = write(
        tmp_path / "a.jsonl",
        json.dumps(
            {
                "subscription_group_id": GROUP,
                "subscription_state": "unsubscribed",
                "email": email(1),
                "occurred_at": OCCURRED,
                "source": "backfill",
                "respect_opt_out": False,
            }
        )
        + "\n",
    )
    assert enqueue_file(jsonl, buffer).enqueued == 1
    csv_file = write(
        tmp_path / "b.csv",
        "subscription_group_id,subscription_state,email,occurred_at,source,respect_opt_out\n"
        f"{GROUP},subscribed,{email(2)},1767323045.678,crm,yes\n"
        f"{GROUP},subscribed,{email(3)},,,\n",
    )
    assert enqueue_file(csv_file, buffer).enqueued == 2
    one, two, three = (pending(buffer, email(n)) for n in (1, 2, 3))
    assert (one["w"], one["c"], one.get("r")) == (OCCURRED_MS, "backfill", None)
    assert (two["w"], two["c"], two["r"]) == (OCCURRED_MS, "crm", 1)
    assert (three.get("c"), three.get("r")) == (None, None)


def test_import_respect_opt_outs_sets_every_row(env, redis_client, tmp_path):
    buffer = services().buffer
    lines = [
        {
            "subscription_group_id": GROUP,
            "subscription_state": "subscribed",
            "email": email(n),
            "respect_opt_out": n == 0 and "false",
        }
        for n in range(3)
    ]
    path = write(tmp_path / "c.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    result = run_real("import", str(path), "--respect-opt-outs")
    assert result.returncode == 0, result.stderr
    assert [pending(buffer, email(n)).get("r") for n in range(3)] == [1, 1, 1]


def test_cli_enqueue_options(env, redis_client):
    result = run_real(
        "enqueue",
        "--group",
        GROUP,
        "--state",
        "subscribed",
        "--email",
        email(1),
        "--occurred-at",
        OCCURRED,
        "--source",
        "support:ticket-123",
        "--respect-opt-out",
    )
    assert result.returncode == 0, result.stderr
    change = pending(services().buffer, email(1))
    assert (change["w"], change["c"], change["r"]) == (OCCURRED_MS, "support:ticket-123", 1)


def test_cli_enqueue_bad_time_is_one_line_and_enqueues_nothing(env, redis_client):
    result = run_real(
        "enqueue",
        "--group",
        GROUP,
        "--state",
        "subscribed",
        "--email",
        email(1),
        "--occurred-at",
        "2026-01-02T03:04:05",
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "occurred_at: needs a UTC offset" in lines[0], result.stderr
    assert redis_client.hlen(services().keys.pending) == 0


def test_import_names_the_line_of_a_bad_time(env, redis_client, tmp_path):
    rows = [
        {
            "subscription_group_id": GROUP,
            "subscription_state": "subscribed",
            "email": email(1),
            "occurred_at": OCCURRED,
        },
        {
            "subscription_group_id": GROUP,
            "subscription_state": "subscribed",
            "email": email(2),
            "occurred_at": "2999-01-01T00:00:00Z",
        },
    ]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    result = run_real("import", str(path))
    assert result.returncode != 0
    assert "line 2: occurred_at: lies more than 5 minutes in the future" in result.stderr
    assert redis_client.hlen(services().keys.pending) == 0
