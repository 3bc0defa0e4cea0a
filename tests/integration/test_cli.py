"""The `braze-subs` command against the session's real Redis and simulator.

Most tests run the CLI in this process through typer's `CliRunner` (`run_cli`, in
tests/cli_runs.py): the same
entry point (`admin.cli.main`, which turns user mistakes into one line and an exit code),
with stdout and stderr captured apart and the environment set for the call. A few run it
for real in a subprocess (`run_real`, `python -m worker ...`) where the process is what is
tested: its exit code, no traceback on stderr, the module entry point, a process pool.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from core.changes import parse_change
from core.planning import plan_batches
from delivery.services import services
from stores.clock import server_time_ms
from stores.dead_letters import DeadLetters
from stores.keys import buffer_field
from tests.cli_runs import assert_one_line_error, run_cli, run_real, stderr_lines
from tests.conftest import take_each

GROUP = "news"


def pending(redis_client: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    keys = services().keys
    result = {}
    for raw_field, raw in redis_client.hgetall(keys.pending).items():
        group, kind, value = raw_field.decode().split("\x1f")
        result[(group, kind, value)] = json.loads(raw)
    return result


def assert_nothing_enqueued(redis_client: Any) -> None:
    keys = services().keys
    assert redis_client.hlen(keys.pending) == 0
    assert redis_client.exists(keys.seq) == 0
    assert redis_client.zcard(keys.due) == redis_client.zcard(keys.due_live) == 0


def email(n: int) -> str:
    return f"user{n}@example.com"


def row(value: str, state: str = "subscribed", kind: str = "email", **extra: Any) -> dict:
    return {"subscription_group_id": GROUP, "subscription_state": state, kind: value, **extra}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


def dead_letter(values: list[str], state: str = "subscribed", error: str = "HTTP 400") -> str:
    """A real dead-letter entry: enqueue, take into a batch, dead-letter it."""
    found = services()
    buffer = found.buffer
    buffer.enqueue([parse_change(row(v, state)) for v in values])
    now = server_time_ms(buffer.client)
    changes, _ = buffer.read_due(now, 1000)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)
    [(batch_id, _)] = take_each(buffer, plan, 60_000)
    found.batches.claim(batch_id, "t", 60_000)
    assert found.batches.dead_letter(batch_id, "t", error).members == len(values)
    return batch_id


def status_json() -> dict[str, Any]:
    result = run_cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------------------
# enqueue
# --------------------------------------------------------------------------------------


def test_enqueue_a_valid_change(env, redis_client):
    result = run_real(
        "enqueue", "--group", GROUP, "--state", "unsubscribed", "--email", " Jane@Example.COM "
    )
    assert result.returncode == 0, result.stderr
    [(slot, change)] = pending(redis_client).items()
    assert slot == (GROUP, "email", "jane@example.com")
    assert (change["s"], change["o"]) == ("unsubscribed", 0)


def test_enqueue_phone_with_double_opt_in_and_delay(env, redis_client):
    before = server_time_ms(redis_client)
    result = run_cli(
        "enqueue",
        "--group",
        "sms-promos",
        "--state",
        "subscribed",
        "--phone",
        "+1 415 555 0142",
        "--double-opt-in",
        "--delay",
        "30",
    )
    assert result.returncode == 0, result.stderr
    change = pending(redis_client)[("sms-promos", "phone", "+14155550142")]
    assert (change["s"], change["o"]) == ("subscribed", 1)
    assert change["t"] >= before + 30_000
    # Not due yet.
    assert services().buffer.read_due(server_time_ms(redis_client), 10) == ([], False)


def test_enqueue_external_id(env, redis_client):
    result = run_cli("enqueue", "--group", GROUP, "--state", "subscribed", "--external-id", "u-1")
    assert result.returncode == 0, result.stderr
    assert set(pending(redis_client)) == {(GROUP, "external_id", "u-1")}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--state", "subscribed", "--email", "not-an-email"], "email"),
        (["--state", "subscribed"], "identifier"),
        (["--state", "subscribed", "--email", "a@example.com", "--phone", "+14155550100"], "email"),
        (["--state", "maybe", "--email", "a@example.com"], "subscription_state"),
        (
            ["--state", "unsubscribed", "--phone", "+14155550100", "--double-opt-in"],
            "use_double_opt_in_logic",
        ),
        (["--state", "subscribed", "--phone", "+1415"], "phone"),
        (["--state", "subscribed", "--email", "a@example.com", "--delay", "-5"], "delay_seconds"),
    ],
    ids=[
        "bad-email",
        "no-identifier",
        "email-and-phone",
        "bad-state",
        "doi-unsub",
        "bad-phone",
        "negative-delay",
    ],
)
def test_enqueue_invalid_is_one_line_naming_the_field(env, redis_client, args, field):
    result = run_cli("enqueue", "--group", GROUP, *args)
    assert_one_line_error(result, field)
    if field == "email" and "--phone" in args:
        assert "phone" in result.stderr
    assert_nothing_enqueued(redis_client)


# --------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------


def test_import_jsonl_later_rows_win(env, redis_client, tmp_path):
    path = write_jsonl(
        tmp_path / "changes.jsonl",
        [
            row(email(1), "subscribed"),
            row(email(2), "subscribed"),
            row("USER1@example.com", "unsubscribed"),  # same person as line 1
            row("u-7", "subscribed", kind="external_id"),
            row("+14155550111", "subscribed", kind="phone", use_double_opt_in_logic=True),
            row("u-7", "unsubscribed", kind="external_id"),
            row(email(2), "unsubscribed"),
            row(email(2), "subscribed"),
        ],
    )
    result = run_cli("import", str(path))
    assert result.returncode == 0, result.stderr
    assert "8 changes enqueued" in result.stderr
    got = {slot: (change["s"], change["o"]) for slot, change in pending(redis_client).items()}
    assert got == {
        (GROUP, "email", email(1)): ("unsubscribed", 0),
        (GROUP, "email", email(2)): ("subscribed", 0),
        (GROUP, "external_id", "u-7"): ("unsubscribed", 0),
        (GROUP, "phone", "+14155550111"): ("subscribed", 1),
    }
    assert int(redis_client.get(services().keys.seq)) == 8


def test_import_csv_later_rows_win(env, redis_client, tmp_path):
    path = tmp_path / "changes.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subscription_group_id", "subscription_state", "email", "external_id"])
        writer.writerow([GROUP, "subscribed", email(1), ""])
        writer.writerow([GROUP, "subscribed", "", "u-1"])
        writer.writerow(["promo", "subscribed", email(1), ""])
        writer.writerow([GROUP, "unsubscribed", email(1), ""])
        writer.writerow([GROUP, "unsubscribed", "", "u-1"])
        writer.writerow([GROUP, "subscribed", "", "u-1"])
    result = run_cli("import", str(path))
    assert result.returncode == 0, result.stderr
    got = {slot: change["s"] for slot, change in pending(redis_client).items()}
    assert got == {
        (GROUP, "email", email(1)): "unsubscribed",
        ("promo", "email", email(1)): "subscribed",
        (GROUP, "external_id", "u-1"): "subscribed",
    }


def hundred_rows_with_three_bad(tmp_path: Path) -> tuple[Path, list[int]]:
    lines: list[Any] = [row(email(n)) for n in range(100)]
    lines[9] = '{"subscription_group_id": "news", "subscription_state": '  # bad JSON
    lines[39] = row("not-an-email")
    lines[76] = {"subscription_group_id": GROUP, "subscription_state": "", "email": email(76)}
    return write_jsonl(tmp_path / "hundred.jsonl", lines), [10, 40, 77]


def test_import_with_bad_rows_enqueues_nothing_and_names_every_line(env, redis_client, tmp_path):
    path, bad_lines = hundred_rows_with_three_bad(tmp_path)
    result = run_real("import", str(path))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    for line in bad_lines:
        assert f"line {line}:" in result.stderr, result.stderr
    reported = {
        int(text.split()[1].rstrip(":"))
        for text in stderr_lines(result)
        if text.startswith("line ")
    }
    assert reported == set(bad_lines)
    assert "email" in result.stderr
    assert "subscription_state" in result.stderr
    assert_nothing_enqueued(redis_client)
    assert services().redis.hget(services().keys.stats, "enqueued") is None


def test_import_skip_invalid_writes_rejects(env, redis_client, tmp_path):
    path, bad_lines = hundred_rows_with_three_bad(tmp_path)
    rejects = tmp_path / "rejects.jsonl"
    result = run_cli("import", str(path), "--skip-invalid", "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr
    assert len(pending(redis_client)) == 97
    assert (GROUP, "email", email(39)) not in pending(redis_client)
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["line"] for r in records] == bad_lines
    assert all(r["error"] for r in records)
    assert [r["field"] for r in records][1:] == ["email", "subscription_state"]


def test_import_rejects_without_skip_invalid_is_a_usage_error(env, redis_client, tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [row(email(1))])
    rejects = tmp_path / "rejects.jsonl"
    result = run_cli("import", str(path), "--rejects", str(rejects))
    assert_one_line_error(result, "--skip-invalid")
    assert result.returncode == 2
    assert not rejects.exists()
    assert_nothing_enqueued(redis_client)


def test_import_unknown_suffix_is_one_line(env, redis_client, tmp_path):
    path = tmp_path / "changes.txt"
    path.write_text(json.dumps(row(email(1))) + "\n")
    result = run_cli("import", str(path))
    assert_one_line_error(result, "changes.txt", ".txt")
    assert_nothing_enqueued(redis_client)


def test_import_missing_file_is_one_line(env, tmp_path):
    result = run_cli("import", str(tmp_path / "nope.jsonl"))
    assert_one_line_error(result, "nope.jsonl")


# --------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------


def test_status_json_reflects_reality(env, redis_client):
    assert {k: status_json()[k] for k in ("pending", "in_flight", "dead_letter")} == {
        "pending": 0,
        "in_flight": 0,
        "dead_letter": 0,
    }
    dead_letter([email(100), email(101)])
    found = services()
    found.buffer.enqueue([parse_change(row(email(n))) for n in range(3)])
    now = server_time_ms(redis_client)
    changes, _ = found.buffer.read_due(now, 100)
    plan = plan_batches(changes, now_ms=now, max_identifiers=50)
    take_each(found.buffer, plan, 60_000)  # 3 in flight
    found.buffer.enqueue(
        [
            parse_change(row(email(0), "unsubscribed")),  # waits for its lock
            parse_change(row(email(50), delay_seconds=600)),  # waits for its delay
            parse_change(row(email(51))),
        ]
    )

    status = status_json()
    for name in ("pending", "in_flight", "dead_letter"):
        assert isinstance(status[name], int), name
    assert (status["pending"], status["in_flight"], status["dead_letter"]) == (3, 3, 2)


@pytest.mark.parametrize("command", [["status", "--json"], ["dlq", "list"]])
def test_unreachable_redis_is_one_line_without_the_password(env, command):
    result = run_real(*command, extra_env={"REDIS_URL": "redis://:secretpw@127.0.0.1:1/0"})
    assert_one_line_error(result, "Redis")
    assert "secretpw" not in result.stdout + result.stderr


def test_unreachable_redis_on_enqueue(env):
    result = run_cli(
        "enqueue",
        "--group",
        GROUP,
        "--state",
        "subscribed",
        "--email",
        "a@example.com",
        extra_env={"REDIS_URL": "redis://:secretpw@127.0.0.1:1/0"},
    )
    assert_one_line_error(result, "Redis")
    assert "secretpw" not in result.stdout + result.stderr


# --------------------------------------------------------------------------------------
# dlq
# --------------------------------------------------------------------------------------


def test_dlq_list_json_has_the_interface_shape(env, redis_client):
    entry_id = dead_letter([email(1), email(2)], "unsubscribed", error="HTTP 400: Invalid email")
    result = run_cli("dlq", "list", "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    assert isinstance(entries, list)
    [entry] = entries
    assert entry["id"] == entry_id
    assert entry["subscription_group_id"] == GROUP
    assert entry["subscription_state"] == "unsubscribed"
    assert entry["error"] == "HTTP 400: Invalid email"
    assert isinstance(entry["attempts"], int)
    assert sorted(entry["identifiers"], key=lambda i: i["value"]) == [
        {"kind": "email", "value": email(1)},
        {"kind": "email", "value": email(2)},
    ]


def test_dlq_list_json_empty(env):
    result = run_cli("dlq", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_dlq_replay_returns_identifiers_to_pending(env, redis_client):
    entry_id = dead_letter([email(1), email(2)], "unsubscribed")
    result = run_cli("dlq", "replay", entry_id)
    assert result.returncode == 0, result.stderr
    got = {slot: change["s"] for slot, change in pending(redis_client).items()}
    assert got == {
        (GROUP, "email", email(1)): "unsubscribed",
        (GROUP, "email", email(2)): "unsubscribed",
    }
    assert DeadLetters(redis_client, services().keys).list() == []
    assert status_json()["dead_letter"] == 0
    # They are due at once.
    changes, _ = services().buffer.read_due(server_time_ms(redis_client), 10)
    assert len(changes) == 2


def test_dlq_replay_skips_an_identifier_with_a_newer_change(env, redis_client):
    entry_id = dead_letter([email(1), email(2)], "subscribed")
    services().buffer.enqueue([parse_change(row(email(1), "unsubscribed"))])
    newer = pending(redis_client)[(GROUP, "email", email(1))]

    result = run_cli("dlq", "replay", entry_id)
    assert result.returncode == 0, result.stderr
    assert "1 skipped" in result.stderr
    got = pending(redis_client)
    assert got[(GROUP, "email", email(1))] == newer
    assert got[(GROUP, "email", email(2))]["s"] == "subscribed"
    assert status_json()["dead_letter"] == 0


def test_dlq_purge_all_empties_the_store(env, redis_client):
    dead_letter([email(1), email(2)])
    dead_letter([email(3)])
    assert status_json()["dead_letter"] == 3
    result = run_cli("dlq", "purge", "--all")
    assert result.returncode == 0, result.stderr
    assert "purged 2 entries (3 identifiers)" in result.stderr
    assert status_json()["dead_letter"] == 0
    assert json.loads(run_cli("dlq", "list", "--json").stdout) == []
    assert pending(redis_client) == {}


@pytest.mark.parametrize(
    "args", [["replay"], ["purge"], ["replay", "--all", "some-id"], ["purge", "--all", "some-id"]]
)
def test_dlq_without_ids_or_all_is_a_usage_error(env, redis_client, args):
    entry_id = dead_letter([email(1)])
    result = run_cli("dlq", *args)
    assert_one_line_error(result, "--all")
    assert result.returncode == 2
    assert [e.id for e in DeadLetters(redis_client, services().keys).list()] == [entry_id]


def test_dlq_purge_unknown_id_fails(env, redis_client):
    entry_id = dead_letter([email(1)])
    result = run_cli("dlq", "purge", "nosuchid")
    assert result.returncode != 0
    assert "nosuchid" in result.stderr
    assert "Traceback" not in result.stderr
    assert [e.id for e in DeadLetters(redis_client, services().keys).list()] == [entry_id]


def test_dlq_replay_unknown_id_fails_but_replays_the_known_one(env, redis_client):
    entry_id = dead_letter([email(1)])
    result = run_cli("dlq", "replay", "nosuchid", entry_id)
    assert result.returncode != 0
    assert "nosuchid" in result.stderr
    assert DeadLetters(redis_client, services().keys).list() == []
    assert set(pending(redis_client)) == {(GROUP, "email", email(1))}
    assert buffer_field(GROUP, "email", email(1)).encode() in redis_client.zrange(
        services().keys.due, 0, -1
    )


def test_dlq_list_shows_ids_whole_at_80_columns_and_purge_takes_what_it_showed(env, redis_client):
    """Issue 27: `dlq list` cut ids at 80 columns and `purge` refused what it showed."""
    entry_id = dead_letter([email(1)], error="HTTP 400: " + "a long message from Braze " * 4)
    listed = run_cli("dlq", "list", extra_env={"COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    assert entry_id in listed.stdout  # whole, on one line
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80
    result = run_cli("dlq", "purge", entry_id[:10])
    assert result.returncode == 0, result.stderr
    assert "purged 1 entries (1 identifiers)" in result.stderr
    assert DeadLetters(redis_client, services().keys).list() == []


def test_dlq_replay_takes_a_unique_prefix_and_refuses_an_ambiguous_one(env, redis_client):
    ids = [dead_letter([email(n)]) for n in range(1, 41)]
    # Forty uuid4 hex ids: some share a first character, none shares ten.
    shared = next(a[0] for i, a in enumerate(ids) for b in ids[i + 1 :] if a[0] == b[0])
    sharing = sorted(i for i in ids if i.startswith(shared))
    store = DeadLetters(redis_client, services().keys)

    refused = run_cli("dlq", "replay", ids[0][:12], shared)
    assert_one_line_error(refused, "more than one entry")
    assert refused.returncode == 1
    named = [whole for whole in sharing if whole in refused.stderr]  # so one can pick
    assert len(named) == min(3, len(sharing))
    assert ("…" in refused.stderr) == (len(sharing) > 3)
    assert len(store.list()) == 40  # nothing replayed, not even the unique one
    assert pending(redis_client) == {}

    done = run_cli("dlq", "replay", ids[0][:12], ids[1], ids[1][:8])  # ids[1] twice
    assert done.returncode == 0, done.stderr
    assert "replayed 2 entries" in done.stderr
    assert set(pending(redis_client)) == {(GROUP, "email", email(1)), (GROUP, "email", email(2))}
    assert {e.id for e in store.list()} == set(ids[2:])

    glob = run_cli("dlq", "purge", "*")  # a pattern character is a literal, not a wildcard
    assert glob.returncode == 1
    assert "no such entries: *" in glob.stderr
    assert len(store.list()) == 38


# --------------------------------------------------------------------------------------
# User data must not be read as console markup, and file errors are one line
# --------------------------------------------------------------------------------------


def test_enqueue_group_with_brackets_succeeds_cleanly(env, redis_client):
    result = run_cli(
        "enqueue", "--group", "promo[/x]", "--state", "subscribed", "--email", email(1)
    )
    assert set(pending(redis_client)) == {("promo[/x]", "email", email(1))}  # it was enqueued
    assert "Traceback" not in result.stderr
    assert result.returncode == 0


def test_import_from_a_path_with_brackets_succeeds_cleanly(env, redis_client, tmp_path):
    folder = tmp_path / "exports[/x]"  # "exports[" / "x]"
    folder.mkdir(parents=True)
    path = write_jsonl(folder / "changes.jsonl", [row(email(1))])
    result = run_cli("import", str(path))
    assert set(pending(redis_client)) == {(GROUP, "email", email(1))}  # it was enqueued
    assert "Traceback" not in result.stderr
    assert result.returncode == 0


def test_dlq_list_table_shows_an_error_with_brackets(env):
    dead_letter([email(1)], error="HTTP 400: Invalid external_id: [/x]")
    result = run_cli("dlq", "list")
    assert "Traceback" not in result.stderr
    assert result.returncode == 0
    assert "[/x]" in result.stdout


def test_import_rejects_to_an_unwritable_path_is_one_line(env, redis_client, tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [row(email(1))])
    rejects = tmp_path / "no-such-dir" / "rejects.jsonl"
    result = run_cli("import", str(path), "--skip-invalid", "--rejects", str(rejects))
    assert_nothing_enqueued(redis_client)
    assert_one_line_error(result, "rejects.jsonl")


def test_import_across_chunks_keeps_file_order(env, redis_client, tmp_path):
    lines = [row(email(n % 1200), "subscribed") for n in range(2500)]
    lines[0] = row(email(5000), "subscribed")
    lines[-1] = row(email(5000), "unsubscribed")  # 2,499 rows later, two chunks on
    lines[1] = row("u-1", "unsubscribed", kind="external_id")
    lines[1500] = row("u-1", "subscribed", kind="external_id")
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    result = run_cli("import", str(path))
    assert result.returncode == 0, result.stderr
    got = pending(redis_client)
    assert len(got) == 1202
    assert got[(GROUP, "email", email(5000))]["s"] == "unsubscribed"
    assert got[(GROUP, "external_id", "u-1")]["s"] == "subscribed"
    assert int(redis_client.get(services().keys.seq)) == 2500


# Rows of ~260 bytes: 4,500 of them pass the 1 MiB under which an import is validated
# in-process, and span three validation chunks of 2,000 lines.
PAD = "x" * 200
BIG_ROWS = 4500


def parallel_file(tmp_path: Path, bad: dict[int, Any] | None = None) -> Path:
    """Each external id comes back every 1,500 rows (so in another chunk): subscribed,
    subscribed, then unsubscribed. `bad` replaces rows, by 1-based line number."""
    states = ("subscribed", "subscribed", "unsubscribed")
    lines: list[Any] = [
        row(f"u-{n % 1500}-{PAD}", states[n // 1500], kind="external_id") for n in range(BIG_ROWS)
    ]
    for line, replacement in (bad or {}).items():
        lines[line - 1] = replacement
    path = write_jsonl(tmp_path / "parallel.jsonl", lines)
    assert path.stat().st_size > 1 << 20
    return path


def test_import_with_jobs_validates_in_parallel_and_later_rows_win(env, redis_client, tmp_path):
    path = parallel_file(tmp_path)
    result = run_real("import", str(path), "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert f"{BIG_ROWS} changes enqueued" in result.stderr
    got = pending(redis_client)
    assert len(got) == 1500
    assert {change["s"] for change in got.values()} == {"unsubscribed"}
    assert [change["q"] for _, change in sorted(got.items())][:2] == [3001, 3002]
    assert int(redis_client.get(services().keys.seq)) == BIG_ROWS


def test_import_with_jobs_names_bad_lines_across_chunks_in_order(env, redis_client, tmp_path):
    bad_lines = [1, 1999, 2000, 2001, 4001, BIG_ROWS]
    bad = {line: row(f"bad-{line}@", kind="email") for line in bad_lines}
    bad[2000] = "{not json"
    path = parallel_file(tmp_path, bad)
    result = run_cli("import", str(path), "--jobs", "2")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    reported = [text.split(":")[0] for text in stderr_lines(result) if text.startswith("line ")]
    assert reported == [f"line {line}" for line in bad_lines]
    assert f"{len(bad_lines)} of {BIG_ROWS} rows invalid; nothing enqueued" in result.stderr
    assert_nothing_enqueued(redis_client)


def test_import_with_jobs_skip_invalid_rejects_across_chunks(env, redis_client, tmp_path):
    bad_lines = [2000, 2001, 3999, 4000, 4001]
    path = parallel_file(tmp_path, {line: row("+1415", kind="phone") for line in bad_lines})
    rejects = tmp_path / "rejects.jsonl"
    result = run_cli(
        "import", str(path), "--jobs", "2", "--skip-invalid", "--rejects", str(rejects)
    )
    assert result.returncode == 0, result.stderr
    assert f"{BIG_ROWS - len(bad_lines)} changes enqueued, 5 rejected" in result.stderr
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in records] == [(n, "phone") for n in bad_lines]
    got = pending(redis_client)
    assert len(got) == 1500
    # Rows 3999-4001 were the last word for three ids; their second rows win instead.
    second = {f"u-{n % 1500}-{PAD}" for n in (3998, 3999, 4000)}
    assert {value for (_, _, value), c in got.items() if c["s"] == "subscribed"} == second


def test_import_jobs_must_be_at_least_one(env, redis_client, tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [row(email(1))])
    result = run_cli("import", str(path), "--jobs", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "--jobs" in result.stderr
    assert_nothing_enqueued(redis_client)
    result = run_cli("import", str(path), extra_env={"IMPORT_JOBS": "0"})
    assert_one_line_error(result, "IMPORT_JOBS")
    assert_nothing_enqueued(redis_client)
    result = run_cli("import", str(path), extra_env={"IMPORT_JOBS": "1"})
    assert result.returncode == 0, result.stderr
    assert set(pending(redis_client)) == {(GROUP, "email", email(1))}


def test_dlq_list_pages_with_a_cursor_and_streams_all(env, redis_client):
    made = [dead_letter([email(n)]) for n in range(250)]  # many share a millisecond
    # Oldest first; entries of one millisecond by id.
    ids = [raw.decode() for raw in redis_client.zrange(services().keys.dead_letter_index, 0, -1)]
    assert sorted(ids) == sorted(made)
    seen: list[str] = []
    args = ["dlq", "list", "--json", "--limit", "100"]
    pages = 0
    while True:
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        page = json.loads(result.stdout)
        assert len(page) <= 100
        seen += [entry["id"] for entry in page]
        pages += 1
        if pages == 1:  # an entry purged between pages shifts nothing
            DeadLetters(redis_client, services().keys).purge([ids[0]])
        if "--cursor" not in result.stderr:
            break
        cursor = result.stderr.split("--cursor ")[1].split()[0]
        args = ["dlq", "list", "--json", "--limit", "100", "--cursor", cursor]
    assert pages == 3
    assert seen == ids  # oldest first, each once
    result = run_cli("dlq", "list", "--json", "--all")
    assert result.returncode == 0, result.stderr
    assert [entry["id"] for entry in json.loads(result.stdout)] == ids[1:]
    bad = run_cli("dlq", "list", "--cursor", "nonsense")
    assert_one_line_error(bad, "--cursor")
