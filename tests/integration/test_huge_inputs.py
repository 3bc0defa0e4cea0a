"""Issue 21 item 7: numbers too big for a float or past Python's int/str conversion limit
(4,300 digits), through every way in, are ordinary bad rows: `import` (with and without
`--skip-invalid`, JSON Lines and CSV), `verify`, the Python API and the Celery task
function. One line naming the line or the field, never a traceback. The readers' own tests
(and the CSV record cap): tests/unit/test_importing.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.changes import InvalidChange
from delivery.services import services
from tasks.producer import ChangesRejected, enqueue_change, enqueue_changes
from tasks.subscriptions import ChangeRefused, record_change
from tests.cli_runs import run_cli

ROW = {"subscription_group_id": "news", "subscription_state": "subscribed"}
HUGE = {"400 digits": "9" * 400, "5000 digits": "9" * 5000}


def write_file(tmp_path: Path, suffix: str, digits: str) -> Path:
    """Three rows; the second's occurred_at is the huge number (a bare JSON number)."""
    path = tmp_path / f"huge.{suffix}"
    if suffix == "jsonl":
        lines = [json.dumps({**ROW, "external_id": "u1"})]
        lines.append(json.dumps({**ROW, "external_id": "u2"})[:-1] + f', "occurred_at": {digits}}}')
        lines.append(json.dumps({**ROW, "external_id": "u3"}))
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(
            "subscription_group_id,subscription_state,external_id,occurred_at\n"
            f"news,subscribed,u1,\nnews,subscribed,u2,{digits}\nnews,subscribed,u3,\n"
        )
    return path


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    assert "Error:" not in result.stderr.replace("ImportFileError", ""), result.stderr[-2000:]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
@pytest.mark.parametrize("digits", list(HUGE.values()), ids=list(HUGE))
def test_import_and_verify_refuse_a_huge_occurred_at_as_a_bad_row(
    env, redis_client, tmp_path, suffix, digits
):
    path = write_file(tmp_path, suffix, digits)
    bad_line = 3 if suffix == "csv" else 2
    pending = services().keys.pending

    refused = run_cli("import", str(path))
    assert refused.returncode == 1, refused.stderr
    assert_no_traceback(refused)
    assert f"line {bad_line}: " in refused.stderr
    assert "1 of 3 rows invalid; nothing enqueued" in refused.stderr
    assert redis_client.hlen(pending) == 0

    skipped = run_cli("import", str(path), "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert_no_traceback(skipped)
    assert "2 changes enqueued, 1 rejected" in skipped.stderr
    assert redis_client.hlen(pending) == 2

    checked = run_cli("verify", str(path))
    assert checked.returncode == 2
    assert_no_traceback(checked)
    assert f"line {bad_line}: " in checked.stderr
    assert "1 of 3 rows invalid; nothing checked" in checked.stderr


@pytest.mark.parametrize("number", [10**400, 10**5000], ids=["400 digits", "5001 digits"])
def test_the_python_api_and_the_task_function_refuse_a_huge_number(env, redis_client, number):
    for field in ("occurred_at", "delay_seconds"):
        row = {**ROW, "external_id": "u1", field: number}
        with pytest.raises(InvalidChange) as caught:
            enqueue_change(**row)
        assert caught.value.field == field
        with pytest.raises(ChangesRejected, match=field):
            enqueue_changes([row])
        with pytest.raises(ChangeRefused, match=f"^{field}: "):
            record_change(**row)
    assert redis_client.hlen(services().keys.pending) == 0
