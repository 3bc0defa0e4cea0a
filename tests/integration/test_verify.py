"""`Verification` in-process against the simulator and a real Redis: last row wins, reads of
100 per group and kind, a change arriving during the read, the read budget's key."""

from __future__ import annotations

import json

from admin.verify import Verification
from delivery.braze_reads import BrazeReader, ReadState
from delivery.services import services
from tasks.producer import enqueue_changes
from tests.cli_runs import run_real
from tests.import_files import write_rows
from tests.sim_control import set_in_braze


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


def test_a_change_arriving_during_the_read_is_changing_and_not_repaired(env, sim, tmp_path):
    set_in_braze(sim.url, "news", "unsubscribed", ["a", "b"], kind="external_id")
    file = write_rows(tmp_path / "f.jsonl", [row("a"), row("b")])
    found = services()
    reader = ChangeDuringRead(found.reader(max_wait_seconds=None), "a")
    repaired: list[str] = []

    def enqueue(changes):
        repaired.extend(change.value for change in changes)
        return len(changes)

    with Verification(reader, found.redis, found.keys, enqueue=enqueue) as run:
        run.load(file)
        run.check(repair=True)
        totals = run.report.totals
    assert (totals.drift, totals.changing) == (1, 1)
    assert repaired == ["b"]
    pending = found.buffer.pending_count()
    assert pending == 1  # only the producer's change; the repair went to `enqueue`


def test_repairs_are_ordinary_changes_in_the_buffer(env, sim, tmp_path):
    set_in_braze(sim.url, "news", "unsubscribed", ["a"], kind="external_id")
    file = write_rows(tmp_path / "f.jsonl", [row("a"), row("b", "unsubscribed")])
    found = services()
    with Verification(
        found.reader(max_wait_seconds=None), found.redis, found.keys, enqueue=enqueue_changes
    ) as run:
        run.load(file)
        run.check(repair=True)
        assert run.report.repaired == 2  # a drifted, b unknown
    states = {
        f.decode().split("\x1f")[2]: json.loads(v)["s"]
        for f, v in found.redis.hgetall(found.keys.pending).items()
    }
    assert states == {"a": "subscribed", "b": "unsubscribed"}


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
