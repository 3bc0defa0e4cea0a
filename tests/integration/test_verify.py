"""`Verification` in-process against the simulator and a real Redis: last row wins, reads of
100 per group and kind, a change arriving during the read, the read budget's key; what a
repair leaves alone (issue 21 item 1): rows superseded by a change accepted since, rows
older than the watermark retention, opt-outs made in Braze (unless --resubscribe)."""

from __future__ import annotations

import json
import os
import time

from admin.verify import Verification
from core.planning import plan_batches
from delivery.braze_reads import BrazeReader, ReadState
from delivery.services import services
from stores.clock import server_time_ms
from tasks.producer import enqueue_changes
from tests.cli_runs import run_cli, run_real
from tests.conftest import take_each
from tests.import_files import write_rows
from tests.sim_control import set_in_braze, sim_states


def row(value: str, state: str = "subscribed", group: str = "news") -> dict[str, str]:
    return {"subscription_group_id": group, "subscription_state": state, "external_id": value}


def test_a_later_row_for_the_same_identifier_is_the_expected_one(env, sim, tmp_path):
    set_in_braze(sim.url, "news", "unsubscribed", ["a"], kind="external_id")
    file = write_rows(tmp_path / "f.jsonl", [row("a"), row("b"), row("a", "unsubscribed")])
    found = services()
    with Verification(found.reader(max_wait_seconds=None), found.redis, found.keys) as run:
        assert run.load(file) == 2
        run.check()
        totals = run.report.totals
        assert (totals.checked, totals.matching, totals.unknown) == (2, 1, 1)
        (mismatch,) = run.mismatches()
        assert (mismatch.value, mismatch.line, mismatch.braze) == ("b", 2, "unknown")


def test_reads_go_100_per_group_and_kind_through_the_read_budget(env, sim, tmp_path, redis_client):
    rows = [row(f"u{n}") for n in range(230)] + [row(f"u{n}", group="other") for n in range(30)]
    file = write_rows(tmp_path / "f.jsonl", rows)
    found = services()
    reader = found.reader(max_wait_seconds=None)
    with Verification(reader, found.redis, found.keys) as run:
        run.load(file)
        run.check()
    assert reader.calls == 4  # 100 + 100 + 30 in news, 30 in other
    assert redis_client.exists(found.keys.read_limiter(found.settings.workspace_id))
    assert not redis_client.exists(found.keys.limiter(found.settings.workspace_id))


class ChangeDuringRead(BrazeReader):
    """A producer enqueues a newer change for `value` while Braze is being read."""

    def __init__(self, inner: BrazeReader, value: str) -> None:
        super().__init__(inner.braze, inner.limiter, max_wait_seconds=None)
        self.value = value

    def statuses(self, group_id, kind, values):
        states = super().statuses(group_id, kind, values)
        enqueue_changes([row(self.value, "unsubscribed")])
        return states


def pending_states(found) -> dict[str, str]:
    return {
        f.decode().split("\x1f")[2]: json.loads(v)["s"]
        for f, v in found.redis.hgetall(found.keys.pending).items()
    }


def test_a_change_arriving_during_the_read_is_changing_and_not_repaired(env, sim, tmp_path):
    set_in_braze(sim.url, "news", "subscribed", ["a", "b"], kind="external_id")
    file = write_rows(tmp_path / "f.jsonl", [row("a", "unsubscribed"), row("b", "unsubscribed")])
    found = services()
    reader = ChangeDuringRead(found.reader(max_wait_seconds=None), "a")
    with Verification(reader, found.redis, found.keys, buffer=found.buffer) as run:
        run.load(file)
        run.check(repair=True)
        totals = run.report.totals
        assert (totals.drift, totals.changing, run.report.repaired) == (1, 1, 1)
    # a: the producer's change, left alone; b: the repair.
    assert pending_states(found) == {"a": "unsubscribed", "b": "unsubscribed"}


def test_repairs_are_ordinary_changes_in_the_buffer(env, sim, tmp_path):
    set_in_braze(sim.url, "news", "subscribed", ["a"], kind="external_id")
    file = write_rows(tmp_path / "f.jsonl", [row("a", "unsubscribed"), row("b")])
    found = services()
    with Verification(
        found.reader(max_wait_seconds=None), found.redis, found.keys, buffer=found.buffer
    ) as run:
        run.load(file)
        run.check(repair=True)
        assert run.report.repaired == 2  # a drifted, b unknown
    assert pending_states(found) == {"a": "unsubscribed", "b": "subscribed"}
    # In the bulk lane (issue 22): a repair uses what live changes leave of the budget.
    changes = [json.loads(raw) for raw in found.redis.hvals(found.keys.pending)]
    assert [change.get("l") for change in changes] == [None, None]
    assert found.redis.zcard(found.keys.due) == 2
    assert found.redis.zcard(found.keys.due_live) == 0


# --------------------------------------------------------------------------------------
# Issue 21 item 1: a repair never undoes a change accepted after the row, nor re-subscribes
# an opt-out made in Braze without --resubscribe
# --------------------------------------------------------------------------------------


def accept_and_deliver(*changes: dict[str, object]) -> None:
    """Changes accepted here and delivered to the simulator (their watermarks set)."""
    found = services()
    enqueue_changes(changes)
    poster = found.poster()
    now = server_time_ms(found.redis)
    due, _ = found.buffer.read_due(now, 10_000)
    plan = plan_batches(due, now_ms=now, max_identifiers=50, linger_ms=0)
    for batch_id, _ in take_each(found.buffer, plan, 60_000):
        assert poster.post(batch_id).status == "delivered"
    assert found.buffer.pending_count() == 0


def verification(buffer: bool = True) -> Verification:
    found = services()
    return Verification(
        found.reader(max_wait_seconds=None),
        found.redis,
        found.keys,
        buffer=found.buffer if buffer else None,
    )


def outcomes(run: Verification) -> dict[str, str]:
    return {m.value: m.outcome for m in run.mismatches()}


def test_a_repair_never_undoes_a_change_accepted_after_the_rows_occurred_at(env, sim, tmp_path):
    snapshot = time.time() - 3600  # the snapshot was taken an hour ago
    rows = [
        row("a", "subscribed"),  # a unsubscribed since: superseded
        row("b", "unsubscribed"),  # b subscribed since: superseded
        row("c", "unsubscribed"),  # Braze flipped c: drift, repaired
        row("d", "subscribed"),  # d subscribed again since, then opted out in Braze
        row("e", "unsubscribed"),  # e unsubscribed again since, then flipped in Braze
    ]
    file = write_rows(tmp_path / "snapshot.jsonl", [{**r, "occurred_at": snapshot} for r in rows])
    later = snapshot + 600
    accept_and_deliver(
        {**row("a", "unsubscribed"), "occurred_at": later},
        {**row("b", "subscribed"), "occurred_at": later},
        {**row("d", "subscribed"), "occurred_at": later},
        {**row("e", "unsubscribed"), "occurred_at": later},
    )
    set_in_braze(sim.url, "news", "subscribed", ["c", "e"], kind="external_id")
    set_in_braze(sim.url, "news", "unsubscribed", ["d"], kind="external_id")
    found = services()
    with verification() as run:
        run.load(file)
        run.check(repair=True)
        report = run.report
        assert outcomes(run) == {
            "a": "superseded",
            "b": "superseded",
            "c": "drift",
            "d": "opted_out_in_braze",
            "e": "drift",
        }
        assert (report.totals.superseded, report.totals.opted_out_in_braze) == (2, 1)
        assert report.repaired == 2
    # c and e go back to the row's state; e carries the accepted change's time (it re-applies
    # it), c the row's; a, b and d are left alone.
    assert pending_states(found) == {"c": "unsubscribed", "e": "unsubscribed"}
    pending = {
        f.decode().split("\x1f")[2]: json.loads(v)
        for f, v in found.redis.hgetall(found.keys.pending).items()
    }
    assert pending["c"]["w"] == round(snapshot * 1000)
    assert pending["e"]["w"] == round(later * 1000)
    assert pending["c"]["c"] == "braze-subs verify --repair"


def test_rows_without_occurred_at_stand_for_the_time_the_file_was_written(env, sim, tmp_path):
    file = write_rows(tmp_path / "snapshot.jsonl", [row("a", "unsubscribed"), row("b")])
    written = time.time() - 600
    os.utime(file, (written, written))  # written ten minutes ago
    accept_and_deliver(row("a", "subscribed"))  # arrives now, without a time
    set_in_braze(sim.url, "news", "unsubscribed", ["b"], kind="external_id")
    with verification() as run:
        run.load(file)
        run.check(repair=True)
        assert outcomes(run) == {"a": "superseded", "b": "opted_out_in_braze"}
        assert run.report.repaired == 0
        assert not run.report.drifted  # nothing a repair should fix: exit 0
    # The same file written after that change: its row is the newer one, and is repaired.
    os.utime(file)
    with verification() as run:
        run.load(file)
        run.check(repair=True)
        assert outcomes(run) == {"a": "drift", "b": "opted_out_in_braze"}
        assert run.report.repaired == 1
    assert pending_states(services()) == {"a": "unsubscribed"}


def test_a_file_imported_then_drifted_in_braze_is_repaired(env, sim, tmp_path):
    """The import of the file itself is accepted after the file was written, with the
    rows' own states: it does not supersede them."""
    file = write_rows(tmp_path / "f.jsonl", [row("a", "unsubscribed"), row("b")])
    accept_and_deliver(row("a", "unsubscribed"), row("b"))
    set_in_braze(sim.url, "news", "subscribed", ["a"], kind="external_id")
    with verification() as run:
        run.load(file)
        run.check(repair=True)
        assert outcomes(run) == {"a": "drift"}
        assert run.report.repaired == 1


class NewerChangeBeforeTheRepair(Verification):
    """A producer's newer change is accepted and delivered after the read, before the
    repair is enqueued: neither pending nor in flight by then, so only the enqueue's own
    atomic check of the watermark can stop the repair."""

    def _repair(self, workspace, group_id, kind, wrong):
        if wrong:
            accept_and_deliver({**row(wrong[0][3], "subscribed"), "occurred_at": time.time() - 1})
        super()._repair(workspace, group_id, kind, wrong)


def test_a_change_accepted_between_the_read_and_the_repair_wins(env, sim, tmp_path):
    snapshot = time.time() - 60
    file = write_rows(
        tmp_path / "f.jsonl",
        [{**row(v, "unsubscribed"), "occurred_at": snapshot} for v in ("a", "b")],
    )
    set_in_braze(sim.url, "news", "subscribed", ["a", "b"], kind="external_id")
    found = services()
    with NewerChangeBeforeTheRepair(
        found.reader(max_wait_seconds=None), found.redis, found.keys, buffer=found.buffer
    ) as run:
        run.load(file)
        run.check(repair=True)
        assert outcomes(run) == {"a": "superseded", "b": "drift"}
        assert (run.report.totals.superseded, run.report.totals.drift) == (1, 1)
        assert run.report.repaired == 1
    assert pending_states(found) == {"b": "unsubscribed"}
    assert sim_states(sim)[("news", "external_id", "a")] == "subscribed"


def test_opted_out_in_braze_is_re_subscribed_only_when_asked(env, sim, tmp_path):
    file = write_rows(tmp_path / "f.jsonl", [row("a"), row("b"), row("c", "unsubscribed")])
    set_in_braze(sim.url, "news", "unsubscribed", ["a", "b"], kind="external_id")
    set_in_braze(sim.url, "news", "subscribed", ["c"], kind="external_id")
    found = services()
    with verification() as run:
        run.load(file)
        run.check(repair=True)
        assert run.report.totals.opted_out_in_braze == 2
        assert run.report.repaired == 1
        assert pending_states(found) == {"c": "unsubscribed"}
        assert run.resubscribe() == 2
        assert (run.report.repaired, run.report.resubscribed) == (3, 2)
    assert pending_states(found) == {"a": "subscribed", "b": "subscribed", "c": "unsubscribed"}


def test_a_row_older_than_the_watermark_retention_is_not_repaired(env, sim, tmp_path):
    old = time.time() - 31 * 86_400  # WATERMARK_RETENTION_DAYS is 30
    file = write_rows(tmp_path / "f.jsonl", [{**row("a", "unsubscribed"), "occurred_at": old}])
    set_in_braze(sim.url, "news", "subscribed", ["a"], kind="external_id")
    with verification() as run:
        run.load(file)
        run.check(repair=True)
        assert outcomes(run) == {"a": "beyond_retention"}
        assert run.report.repaired == 0 and run.report.drifted
    assert services().buffer.pending_count() == 0


def test_resubscribe_goes_with_repair_and_says_how_many_first(env, sim, tmp_path):
    file = write_rows(tmp_path / "f.jsonl", [row("a"), row("b")])
    set_in_braze(sim.url, "news", "unsubscribed", ["a"], kind="external_id")
    set_in_braze(sim.url, "news", "subscribed", ["b"], kind="external_id")
    alone = run_cli("verify", str(file), "--resubscribe")
    assert alone.returncode == 2 and "--resubscribe goes with --repair" in alone.stderr
    left = run_real("verify", str(file), "--repair", "--json")
    assert left.returncode == 0, left.stderr  # an opt-out in Braze is not drift
    report = json.loads(left.stdout)
    assert (report["opted_out_in_braze"], report["repaired"], report["matching"]) == (1, 0, 1)
    assert report["mismatches"][0]["outcome"] == "opted_out_in_braze"
    done = run_cli("verify", str(file), "--repair", "--resubscribe")
    assert "re-subscribing 1 identifiers that Braze holds as unsubscribed" in done.stderr
    assert "1 of them re-subscribed" in done.stderr
    assert done.stderr.index("re-subscribing 1") < done.stderr.index("of them re-subscribed")
    assert pending_states(services())["a"] == "subscribed"


def test_the_reader_reads_both_forms_from_the_simulator(env, sim):
    set_in_braze(sim.url, "news", "unsubscribed", ["a"], kind="external_id")
    reader = services().reader(max_wait_seconds=None)
    assert reader.statuses("news", "external_id", ["a", "z"]) == {
        "a": ReadState.UNSUBSCRIBED,
        "z": ReadState.UNKNOWN,
    }


def test_a_refused_key_is_one_line_and_exit_2(env, sim, tmp_path, monkeypatch):
    file = write_rows(tmp_path / "f.jsonl", [row("a")])
    monkeypatch.setenv("BRAZE_API_KEY", "revoked-key")
    result = run_real("verify", str(file))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("braze-subs:")]
    assert len(lines) == 1 and "Braze refused the API key" in lines[0], result.stderr
    assert "revoked-key" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
