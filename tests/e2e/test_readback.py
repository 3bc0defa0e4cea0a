"""Reading Braze back, the way an operator does: `braze-subs import`, real worker and beat,
then states changed "in Braze" behind braze-subs' back, `verify`, `verify --repair`,
`lookup`."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.cli_runs import run_real
from tests.conftest import drained, wait_for
from tests.import_files import write_rows
from tests.sim_control import set_in_braze, sim_states

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
        2,
        0,
    )
    assert report["groups"]["news"]["opted_out_in_braze"] == 3
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
    # The emails Braze holds as unsubscribed where the file says subscribed are opt-outs
    # made in Braze (a footer link): left alone by a repair; the ids are repaired.
    assert report["opted_out_in_braze"] == 3
    assert {m["outcome"] for m in report["mismatches"]} == {"drift", "opted_out_in_braze"}

    repaired = run_real("verify", str(file), "--repair")
    assert repaired.returncode == 1, repaired.stderr
    assert "2 repaired" in repaired.stderr
    assert "3 opted out in Braze (left alone; --resubscribe re-subscribes them)" in (
        repaired.stderr
    )
    wait_for(drained, timeout=60, what="the repairs to be delivered")
    again = run_real("verify", str(file))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "447 matching, 0 drift" in again.stderr
    assert sim_states(sim)[("news", "email", "u3@x.io")] == "unsubscribed"

    resubscribed = run_real("verify", str(file), "--repair", "--resubscribe")
    assert resubscribed.returncode == 0, resubscribed.stderr
    assert "re-subscribing 3 identifiers that Braze holds as unsubscribed" in resubscribed.stderr
    wait_for(drained, timeout=60, what="the re-subscriptions to be delivered")
    last = run_real("verify", str(file))
    assert last.returncode == 0, last.stdout + last.stderr
    assert "450 matching, 0 drift" in last.stderr


def test_a_repair_of_an_old_snapshot_never_re_subscribes_people_who_unsubscribed_since(
    env, sim, processes, tmp_path
):
    """Issue 21 item 1, as an operator meets it: a snapshot of 200 subscribers is written
    and imported; then 40 of them unsubscribe through braze-subs and 10 opt out in Braze
    itself, and 5 ids of another group drift; `verify --repair` of the old snapshot must
    repair the 5 and leave the 50 unsubscribed. Real worker and beat, the simulator."""
    subscribers = [f"s{n}@x.io" for n in range(200)]
    leavers, braze_opt_outs = subscribers[:40], subscribers[150:160]
    rows = [
        {"subscription_group_id": "news", "subscription_state": "subscribed", "email": value}
        for value in subscribers
    ] + [
        {"subscription_group_id": "sms", "subscription_state": "unsubscribed", "external_id": v}
        for v in (f"e{n}" for n in range(20))
    ]
    snapshot = write_rows(tmp_path / "snapshot.jsonl", rows)  # rows without occurred_at
    processes.worker("w1", concurrency=4)
    processes.beat()
    imported = run_real("import", str(snapshot))
    assert imported.returncode == 0, imported.stderr
    wait_for(drained, timeout=60, what="the snapshot to be delivered")

    unsubscribes = tmp_path / "unsubscribes.jsonl"
    write_rows(
        unsubscribes,
        [
            {"subscription_group_id": "news", "subscription_state": "unsubscribed", "email": v}
            for v in leavers
        ],
    )
    assert run_real("import", str(unsubscribes)).returncode == 0
    wait_for(drained, timeout=60, what="the unsubscribes to be delivered")
    set_in_braze(sim.url, "news", "unsubscribed", braze_opt_outs)  # footer links
    set_in_braze(
        sim.url, "sms", "subscribed", ["e3", "e7", "e11", "e12", "e19"], kind="external_id"
    )

    result = run_real("verify", str(snapshot), "--repair", "--json")
    assert result.returncode == 1, result.stderr  # the 5 ids drifted
    report = json.loads(result.stdout)
    assert (report["superseded"], report["opted_out_in_braze"], report["drift"]) == (40, 10, 5)
    assert report["repaired"] == 5
    outcome = {m["value"]: m["outcome"] for m in report["mismatches"]}
    assert {outcome[v] for v in leavers} == {"superseded"}
    assert {outcome[v] for v in braze_opt_outs} == {"opted_out_in_braze"}
    wait_for(drained, timeout=60, what="the repairs to be delivered")

    states = sim_states(sim)
    assert {states[("news", "email", v)] for v in leavers + braze_opt_outs} == {"unsubscribed"}
    assert {states[("sms", "external_id", f"e{n}")] for n in range(20)} == {"unsubscribed"}
    # Nothing was sent for the 50 after their unsubscribe: what the simulator applied to each
    # is the snapshot's import, then the unsubscribe (theirs, or Braze's own).
    applied = httpx.get(f"{sim.url}/_sim/applied", params={"group": "news"}, timeout=30).json()
    assert applied["complete"]
    story = {
        entry["value"]: [(s["state"], bool(s.get("external"))) for s in entry["states"]]
        for entry in applied["applied"]
    }
    for value in leavers:
        assert story[value] == [("subscribed", False), ("unsubscribed", False)], value
    for value in braze_opt_outs:
        assert story[value] == [("subscribed", False), ("unsubscribed", True)], value


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
