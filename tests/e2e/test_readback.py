"""Reading Braze back, the way an operator does: `braze-subs import`, real worker and beat,
then states changed "in Braze" behind braze-subs' back, `verify`, `verify --repair`,
`lookup`."""

from __future__ import annotations

import json

import pytest

from tests.cli_runs import run_real
from tests.conftest import drained, wait_for
from tests.import_files import write_rows
from tests.sim_control import set_in_braze

pytestmark = pytest.mark.slow


def test_verify_reports_exactly_the_rows_changed_in_braze_and_repair_brings_them_back(
    env, sim, processes, tmp_path
):
    rows = [
        {"subscription_group_id": "news", "subscription_state": "subscribed", "email": f"u{n}@x.io"}
        for n in range(300)
    ] + [
        {
            "subscription_group_id": "sms",
            "subscription_state": "unsubscribed",
            "external_id": f"e{n}",
        }
        for n in range(150)
    ]
    file = write_rows(tmp_path / "snapshot.jsonl", rows)
    processes.worker("w1", concurrency=4)
    processes.beat()
    imported = run_real("import", str(file))
    assert imported.returncode == 0, imported.stderr
    wait_for(drained, timeout=60, what="the import to be delivered")

    clean = run_real("verify", str(file), "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["matching"] == 450

    flipped_emails = [f"u{n}@x.io" for n in (3, 77, 250)]
    flipped_ids = ["e5", "e149"]
    set_in_braze(sim.url, "news", "unsubscribed", flipped_emails)
    set_in_braze(sim.url, "sms", "subscribed", flipped_ids, kind="external_id")

    found = run_real("verify", str(file), "--json")
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert (report["checked"], report["matching"], report["drift"], report["unknown"]) == (
        450,
        445,
        5,
        0,
    )
    assert report["groups"]["news"]["drift"] == 3
    assert report["groups"]["sms"]["drift"] == 2
    assert {
        (m["subscription_group_id"], m["kind"], m["value"], m["braze"])
        for m in report["mismatches"]
    } == {("news", "email", v, "unsubscribed") for v in flipped_emails} | {
        ("sms", "external_id", v, "subscribed") for v in flipped_ids
    }
    assert report["mismatches"][0]["expected"] == "subscribed"
    # Reads of up to 100 per group and kind: 300 emails in 3 calls, 150 ids in 2.
    assert report["read_calls"] == 5

    repaired = run_real("verify", str(file), "--repair")
    assert repaired.returncode == 1, repaired.stderr
    assert "5 repaired" in repaired.stderr
    wait_for(drained, timeout=60, what="the repairs to be delivered")
    again = run_real("verify", str(file))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "450 matching, 0 drift" in again.stderr


def test_a_pending_change_is_reported_as_changing_not_drift(env, sim, tmp_path):
    """No worker runs: the newer change waits in the buffer, so Braze is about to move."""
    file = write_rows(
        tmp_path / "rows.jsonl",
        [{"subscription_group_id": "news", "subscription_state": "subscribed", "email": "a@x.io"}],
    )
    set_in_braze(sim.url, "news", "unsubscribed", ["a@x.io"])
    enqueued = run_real("enqueue", "--group", "news", "--state", "subscribed", "--email", "a@x.io")
    assert enqueued.returncode == 0, enqueued.stderr
    result = run_real("verify", str(file), "--json", "--repair")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["drift"], report["changing"], report["repaired"]) == (0, 1, 0)


def test_verify_names_bad_rows_by_line_and_reads_nothing(env, sim, tmp_path, redis_client):
    file = tmp_path / "bad.csv"
    file.write_text(
        "subscription_group_id,subscription_state,email\n"
        "news,subscribed,a@x.io\n"
        "news,maybe,b@x.io\n"
        "news,subscribed,not-an-email\n"
    )
    result = run_real("verify", str(file))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "line 3: subscription_state" in result.stderr
    assert "line 4: email" in result.stderr
    assert "2 of 3 rows invalid; nothing checked" in result.stderr
    assert redis_client.keys("*limiter:read:*") == []  # not one turn of the read budget


def test_verify_with_braze_unreachable_exits_2_with_one_line(env, tmp_path, monkeypatch):
    file = write_rows(
        tmp_path / "rows.jsonl",
        [{"subscription_group_id": "news", "subscription_state": "subscribed", "email": "a@x.io"}],
    )
    monkeypatch.setenv("BRAZE_REST_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    result = run_real("verify", str(file))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("braze-subs:")]
    assert len(lines) == 1, result.stderr
    assert "Braze unreachable at http://127.0.0.1:9" in lines[0]
    assert "Traceback" not in result.stderr


def test_lookup_lists_the_groups_braze_holds(env, sim):
    set_in_braze(sim.url, "news", "subscribed", ["jane@x.io"])
    set_in_braze(sim.url, "promo", "unsubscribed", ["jane@x.io"])
    result = run_real("lookup", "--email", "Jane@X.io", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    states = {
        group["subscription_group_id"]: group["state"]
        for user in data["users"]
        for group in user["groups"]
    }
    assert states == {"news": "subscribed", "promo": "unsubscribed"}
