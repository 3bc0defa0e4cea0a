"""What an operator sees and runs per workspace (issue 23): `status`, the exporter, `dlq`,
`history`, `forget`, `lookup` and `verify` with two workspaces (`workspaces_env`: `us` on
the session's simulator, `eu` on a second simulator instance), real Redis, the commands run
as an operator runs them (in process through `run_cli`, or a real subprocess)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.changes import Lane, parse_change
from core.planning import plan_batches
from delivery.services import services
from stores.clock import server_time_ms
from stores.keys import FIELD_SEPARATOR
from tasks.producer import enqueue_changes
from tests.cli_runs import assert_one_line_error, run_cli, run_real
from tests.conftest import email, keyspace_traces
from tests.import_files import write_rows
from tests.metrics_scrape import metrics_exporter, scrape
from tests.sim_control import set_in_braze, sim_stats

US, EU = "us-email", "eu-email"  # a group of each workspace (`TwoWorkspaces.groups`)


def row(group: str, value: str, state: str = "subscribed", **extra: Any) -> dict[str, Any]:
    return {"subscription_group_id": group, "subscription_state": state, "email": value, **extra}


def dead_letter(workspace: str, group: str, values: list[str], lane: Lane = Lane.BULK) -> str:
    """A real dead-letter entry of `workspace`: enqueued, taken into a batch (of `lane`: its
    id says it), given up."""
    found = services(workspace)
    buffer = found.buffer
    buffer.enqueue([parse_change(row(group, value)) for value in values])
    now = server_time_ms(buffer.client)
    changes, _ = buffer.read_due(now, 1000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)
    [[(batch_id, _)]] = buffer.take([plan], 60_000, lane)
    found.batches.claim(batch_id, "t", 60_000)
    assert found.batches.dead_letter(batch_id, "t", "HTTP 400").members == len(values)
    return batch_id


def enqueue(workspace: str, rows: list[dict[str, Any]]) -> None:
    """Changes into `workspace`'s buffer (the routing of the ways in is tested with them)."""
    services(workspace).buffer.enqueue([parse_change(each) for each in rows])


def pending_values(workspace: str) -> set[str]:
    found = services(workspace)
    return {raw.decode().split(FIELD_SEPARATOR)[2] for raw in found.redis.hkeys(found.keys.pending)}


def json_of(*args: str) -> Any:
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------


def test_status_json_sums_the_workspaces_and_holds_each_with_its_budget(workspaces_env):
    dead_letter("eu", EU, [email(90)])
    enqueue("us", [row(US, email(n)) for n in range(2)])
    enqueue("eu", [row(EU, email(n)) for n in range(3)])
    shown = json_of("status")
    assert set(shown["workspaces"]) == {"us", "eu"}
    us, eu = shown["workspaces"]["us"], shown["workspaces"]["eu"]
    assert (us["pending"], eu["pending"], shown["pending"]) == (2, 3, 5)
    assert (us["dead_letter"], eu["dead_letter"], shown["dead_letter"]) == (0, 1, 1)
    assert shown["lanes"]["live"]["pending"] == 5
    for each in (us, eu):  # today's budget keys, each workspace's own
        assert each["budget_source"] == "BRAZE_API_KEY"
        assert isinstance(each["tokens_left"], int) and each["paused"] is False
        assert set(each["lanes"]) == {"live", "bulk"}
    assert us["budget_workspace"] != eu["budget_workspace"]  # two endpoints, two keys
    assert shown["tokens_left"] == us["tokens_left"] + eu["tokens_left"]
    # The table: the totals, then a section per workspace.
    table = run_cli("status")
    assert table.returncode == 0, table.stderr
    lines = [" ".join(line.split()) for line in table.stdout.splitlines()]
    assert "WORKSPACE US" in lines and "WORKSPACE EU" in lines
    assert "pending changes 5" in lines  # the buffer's total
    us_section = lines[lines.index("WORKSPACE US") :]
    assert "pending changes 2" in us_section[: us_section.index("")]
    # Without the keys (an operator's shell) each workspace's budget is still found: the
    # one its workers recorded.
    for name in ("us", "eu"):
        services(name).record_workspace()
    unset: dict[str, Any] = {"BRAZE_KEY_US": None, "BRAZE_KEY_EU": None}
    keyless = run_cli("status", "--json", extra_env=unset)
    assert keyless.returncode == 0, keyless.stderr
    recorded = json.loads(keyless.stdout)["workspaces"]
    assert recorded["us"]["budget_source"] == "recorded by a worker"
    assert recorded["us"]["budget_workspace"] == us["budget_workspace"]
    assert recorded["eu"]["budget_workspace"] == eu["budget_workspace"]


def test_one_workspace_status_json_is_as_before_and_names_it_default(env):
    enqueue_changes([row("news", email(n)) for n in range(4)])
    shown = json_of("status")
    each = shown.pop("workspaces")
    assert list(each) == ["default"]
    assert each["default"] == shown  # today's keys, unchanged, and the same figures
    assert shown["pending"] == 4


# --------------------------------------------------------------------------------------
# the exporter
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def exporter(tmp_path: Path) -> Iterator[str]:
    """`braze-subs metrics` as the Procfile runs it, on a free port; yields its URL."""
    with metrics_exporter(tmp_path / "exporter.log") as target:
        yield f"http://{target}/metrics"


def test_the_exporter_labels_each_workspaces_series(workspaces_env, tmp_path):
    dead_letter("eu", EU, [email(90), email(91)])
    enqueue("us", [row(US, email(n)) for n in range(2)])
    enqueue("eu", [row(EU, email(n)) for n in range(3)])
    with exporter(tmp_path) as url:
        found = scrape(url)
    assert found["braze_subs_buffer_pending"] == {
        (("workspace", "us"),): 2,
        (("workspace", "eu"),): 3,
    }
    assert found["braze_subs_dead_letter_identifiers"] == {
        (("workspace", "us"),): 0,
        (("workspace", "eu"),): 2,
    }
    tokens = found["braze_subs_budget_tokens"]
    assert set(tokens) == {(("workspace", "us"),), (("workspace", "eu"),)}
    live = found["braze_subs_lane_pending"][(("lane", "live"), ("workspace", "eu"))]
    assert live == 3
    # The deployment's own series carry no workspace.
    assert set(found["braze_subs_beat_last_seen_timestamp_seconds"]) == {()}
    assert set(found["braze_subs_redis_up"]) == {()}
    for name, samples in found.items():
        for labels in samples:
            if dict(labels).get("workspace") is None:
                assert not name.startswith(("braze_subs_buffer", "braze_subs_dead_letter")), name


# --------------------------------------------------------------------------------------
# dlq
# --------------------------------------------------------------------------------------


def test_dlq_lists_each_entrys_workspace_and_finds_ids_wherever_they_are(workspaces_env):
    in_us = dead_letter("us", US, [email(1)])
    in_eu = dead_letter("eu", EU, [email(2), email(3)])
    listed = json_of("dlq", "list")
    assert {(e["id"], e["workspace"]) for e in listed} == {(in_us, "us"), (in_eu, "eu")}
    assert [e["id"] for e in json_of("dlq", "list", "--workspace", "eu")] == [in_eu]
    table = run_cli("dlq", "list")
    assert "│ us " in table.stdout and "│ eu " in table.stdout  # a workspace column
    # One page at a time across both: each entry once, oldest first.
    first = run_cli("dlq", "list", "--json", "--limit", "1")
    assert first.returncode == 0, first.stderr
    cursor = first.stderr.split("--cursor ")[1].split()[0]
    second = json_of("dlq", "list", "--limit", "1", "--cursor", cursor)
    assert [e["id"] for e in json.loads(first.stdout) + second] == [in_us, in_eu]
    # An id given without --workspace is found in whichever workspace holds it.
    replayed = run_cli("dlq", "replay", in_eu)
    assert replayed.returncode == 0, replayed.stderr
    assert "2 identifiers back in the buffer" in replayed.stderr
    assert pending_values("eu") == {email(2), email(3)}
    assert pending_values("us") == set()
    # Narrowed to a workspace, another workspace's entry is not there.
    refused = run_cli("dlq", "purge", "--workspace", "eu", in_us)
    assert refused.returncode == 1 and f"no such entries: {in_us}" in refused.stderr
    assert [e["id"] for e in json_of("dlq", "list")] == [in_us]
    purged = run_cli("dlq", "purge", "--all", "--workspace", "us")
    assert purged.returncode == 0 and "purged 1 entries (1 identifiers)" in purged.stderr
    assert json_of("dlq", "list") == []


def test_an_id_prefix_matching_entries_of_two_workspaces_touches_nothing(workspaces_env):
    in_us = dead_letter("us", US, [email(1)], Lane.LIVE)
    in_eu = dead_letter("eu", EU, [email(2)], Lane.LIVE)
    shared = "live-"  # a live batch's id says so (core/planning.py): one entry in each
    assert in_us.startswith(shared) and in_eu.startswith(shared)
    result = run_cli("dlq", "purge", shared)
    assert_one_line_error(result, "matches more than one entry", "nothing was replayed or purged")
    assert result.returncode == 1
    assert len(json_of("dlq", "list")) == 2


# --------------------------------------------------------------------------------------
# history and forget
# --------------------------------------------------------------------------------------


def test_history_covers_every_workspace_and_each_event_says_its_own(workspaces_env):
    jane = "jane@example.com"
    enqueue("us", [row(US, jane)])
    enqueue("eu", [row(EU, jane, "unsubscribed")])
    shown = json_of("history", "--email", jane)
    assert {(e["workspace"], e["subscription_group_id"]) for e in shown["events"]} == {
        ("us", US),
        ("eu", EU),
    }
    narrowed = json_of("history", "--email", jane, "--workspace", "eu")
    assert [(e["workspace"], e["subscription_state"]) for e in narrowed["events"]] == [
        ("eu", "unsubscribed")
    ]
    table = run_cli("history", "--email", jane)
    assert table.returncode == 0, table.stderr
    assert "workspace" in table.stdout


def test_forget_erases_the_identifier_in_every_workspace(workspaces_env, redis_client):
    jane = "jane.doe@example.com"
    dead_letter("eu", EU, [jane])
    enqueue("us", [row(US, jane), row("us-sms", jane, "unsubscribed")])
    enqueue("eu", [row(EU, jane)])
    assert keyspace_traces(redis_client, jane)
    result = run_real("forget", "--email", jane)
    assert result.returncode == 0, result.stderr
    assert "every workspace: us, eu" in result.stdout
    assert "1 dead-letter entries" in result.stdout
    # Every key and value of Redis scanned: no trace of her; her SHA-1 only in the name of
    # each workspace's history, which holds the erasure.
    assert keyspace_traces(redis_client, jane) == []
    digest = hashlib.sha1(f"email{FIELD_SEPARATOR}{jane}".encode()).hexdigest()
    histories = {f"{services(n).keys.history('email', jane)} (list)" for n in ("us", "eu")}
    assert set(keyspace_traces(redis_client, digest)) == histories
    for name in ("us", "eu"):
        assert pending_values(name) == set()


# --------------------------------------------------------------------------------------
# lookup and verify: each workspace's Braze
# --------------------------------------------------------------------------------------


def test_lookup_reads_each_workspaces_braze(workspaces_env):
    us, eu = workspaces_env.sims["us"], workspaces_env.sims["eu"]
    set_in_braze(us.url, US, "subscribed", ["jane@example.com"])
    set_in_braze(eu.url, EU, "unsubscribed", ["jane@example.com"])
    shown = json_of("lookup", "--email", "jane@example.com")
    held = {
        (user["workspace"], group["subscription_group_id"], group["state"])
        for user in shown["users"]
        for group in user["groups"]
    }
    assert held == {("us", US, "subscribed"), ("eu", EU, "unsubscribed")}
    only = json_of("lookup", "--email", "jane@example.com", "--workspace", "eu")
    assert list(only["workspaces"]) == ["eu"]
    assert {u["workspace"] for u in only["users"]} == {"eu"}
    table = run_cli("lookup", "--email", "jane@example.com")
    assert table.returncode == 0, table.stderr
    assert "workspace us" in table.stdout and "workspace eu" in table.stdout


def reads(sim: Any) -> int:
    """Read requests the simulator has answered."""
    return int(sim_stats(sim)["reads"]["requests_total"])


def test_verify_reads_each_row_from_its_workspaces_braze_and_repairs_into_it(
    workspaces_env, tmp_path
):
    us, eu = workspaces_env.sims["us"], workspaces_env.sims["eu"]
    set_in_braze(us.url, US, "subscribed", [email(1), email(2)])
    set_in_braze(eu.url, EU, "subscribed", [email(3)])
    set_in_braze(eu.url, "free", "subscribed", [email(5)])
    rows = [
        row(US, email(1)),  # matching in us
        row(US, email(2), "unsubscribed"),  # drift in us
        row(EU, email(3)),  # matching in eu
        row(EU, email(4)),  # unknown in eu
        row("free", email(5), workspace="eu"),  # no owner in the file: the row names eu
        row("free", email(6)),  # no owner, no name: --workspace us
    ]
    file = write_rows(tmp_path / "rows.jsonl", rows)
    before = {
        name: sim_stats(sim)["reads"]["requests_total"] for name, sim in (("us", us), ("eu", eu))
    }
    result = run_real("verify", str(file), "--json", "--repair", "--workspace", "us")
    assert result.returncode == 1, (result.stdout, result.stderr)  # drift found
    report = json.loads(result.stdout)
    assert (report["checked"], report["matching"], report["drift"], report["unknown"]) == (
        6,
        3,
        1,
        2,
    )
    assert report["workspaces"]["us"]["checked"] == 3
    assert report["workspaces"]["eu"]["checked"] == 3
    assert {(m["workspace"], m["value"], m["outcome"]) for m in report["mismatches"]} == {
        ("us", email(2), "drift"),
        ("eu", email(4), "unknown"),
        ("us", email(6), "unknown"),
    }
    # Each workspace's Braze was read (two groups in us, two in eu).
    after = {
        name: sim_stats(sim)["reads"]["requests_total"] for name, sim in (("us", us), ("eu", eu))
    }
    assert after["us"] - before["us"] == 2 and after["eu"] - before["eu"] == 2
    # ... each through its own read budget (its key space, its workspace id), none through
    # the write budget.
    for name in ("us", "eu"):
        found = services(name)
        workspace_id = found.settings.workspace_id
        assert found.redis.exists(found.keys.read_limiter(workspace_id))
        assert not found.redis.exists(found.keys.limiter(workspace_id))
    # Each repair waits in its own workspace's buffer.
    assert pending_values("us") == {email(2), email(6)}
    assert pending_values("eu") == {email(4)}


def test_verify_refuses_a_row_that_fits_no_workspace_naming_its_line(workspaces_env, tmp_path):
    file = write_rows(tmp_path / "rows.jsonl", [row(US, email(1)), row("free", email(2))])
    result = run_cli("verify", str(file))
    assert result.returncode == 2
    assert "line 2: subscription_group_id: group 'free' belongs to no workspace" in result.stderr
    assert "1 of 2 rows invalid; nothing checked" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# --------------------------------------------------------------------------------------
# a bad --workspace
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("dlq", "list"),
        ("dlq", "replay", "--all"),
        ("dlq", "purge", "--all"),
        ("history", "--email", "jane@example.com"),
        ("lookup", "--email", "jane@example.com"),
        ("verify", "rows.jsonl"),
    ],
)
def test_a_workspace_the_deployment_does_not_serve_is_one_line_naming_the_choices(
    workspaces_env, tmp_path, args
):
    write_rows(tmp_path / "rows.jsonl", [row(US, email(1))])
    args = tuple(str(tmp_path / a) if a == "rows.jsonl" else a for a in args)
    result = run_cli(*args, "--workspace", "asia")
    assert_one_line_error(result, "--workspace", "'asia'", "us, eu")
    assert result.returncode == 2
