"""The pure parts of bench/compare: percentiles, windows, per-identifier outcomes, ratios,
the Markdown table, and the workloads themselves (no processes, no Redis)."""

from __future__ import annotations

import pytest

from bench import report
from bench.alternatives.common import per_worker_rate_limit
from bench.workloads import FULL, QUICK, backlog_across_groups, build, flipping_stream

A = ("g", "email", "a@example.com")
B = ("g", "email", "b@example.com")


def test_percentile_interpolates_between_ranks():
    assert report.percentile([], 50) is None
    assert report.percentile([3.0], 99) == 3.0
    assert report.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert report.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert report.percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_sliding_window_max_finds_the_busiest_window_at_any_start():
    # The fixed windows hold 4 and 3, but [1.5, 3.5) holds 5.
    times = [0.1, 1.5, 1.6, 1.7, 2.1, 2.2, 3.9]
    assert report.fixed_window_max(times, 2.0) == 4
    assert report.sliding_window_max(times, 2.0) == 5
    assert report.sliding_window_max([], 2.0) == 0
    # Half-open: an event exactly one window later starts a new window.
    assert report.sliding_window_max([0.0, 2.0], 2.0) == 1


def test_per_second_bins_and_drops_what_is_outside():
    assert report.per_second([0.0, 0.5, 1.2, 2.9, 3.5, -1.0], 0.0, 3.0) == [2, 1, 1]


def test_satisfied_needs_the_last_state_after_the_last_write():
    last = {A: ("subscribed", 10.0), B: ("unsubscribed", 10.0)}
    arrivals = {
        A: [(5.0, "subscribed"), (11.0, "unsubscribed"), (12.0, "subscribed")],
        # B's only arrival of its last state predates its last write: not satisfied.
        B: [(9.0, "unsubscribed"), (11.0, "subscribed")],
    }
    assert report.satisfied_at(last, arrivals) == {A: 12.0}
    final = {A: "subscribed", B: "subscribed"}
    assert report.final_state_errors(last, final) == 1
    assert report.final_state_errors(last, {}) == 2


def test_remaining_curve_steps_down_from_the_total():
    assert report.remaining_curve(3, [12.0, 11.0], 10.0) == [(0.0, 3), (1.0, 2), (2.0, 1)]


def test_ratio_is_undefined_for_zero_missing_or_boolean():
    assert report.ratio(5, 2) == 2.5
    assert report.ratio(5, 0) is None
    assert report.ratio(None, 2) is None
    assert report.ratio(True, 1) is None


def run_input(**overrides):
    values = dict(
        limit=100,
        window=2.0,
        backlog=False,
        changes=2,
        last_writes={A: ("subscribed", 100.0), B: ("subscribed", 100.5)},
        arrivals={A: [(101.0, "subscribed")]},
        final={A: "subscribed"},
        requests=[(101.0, 201, 1), (101.1, 429, 1), (101.2, 201, 1)],
        ready=99.0,
        cut=110.0,
        left_over=0,
    )
    values.update(overrides)
    return report.RunInput(**values)


def test_figures_of_a_stream():
    figures = report.figures(run_input())
    assert figures["latency_p50"] == 1.0
    assert figures["requests"] == 3
    assert figures["status_429"] == 1
    assert figures["ids_per_request"] == 1.0
    # 429s are not counted in the window.
    assert figures["fixed_window_max"] == 2
    assert figures["delivered"] == 1
    assert figures["not_arrived"] == 1
    assert figures["lost"] == 1
    assert figures["final_state_errors"] == 1
    assert "drain_seconds" not in figures


def test_a_change_still_held_is_not_counted_lost():
    figures = report.figures(run_input(left_over=1))
    assert figures["not_arrived"] == 1
    assert figures["lost"] == 0


def test_figures_of_a_drained_backlog():
    figures = report.figures(
        run_input(
            backlog=True,
            changes=100,
            arrivals={A: [(104.0, "subscribed")], B: [(105.0, "subscribed")]},
            final={A: "subscribed", B: "subscribed"},
            requests=[(101.0, 201, 50), (105.0, 201, 50)],
            ready=100.0,
        )
    )
    assert figures["drained"] is True
    assert figures["drain_seconds"] == 4.0
    assert figures["ideal_seconds"] == 0.04  # 100 changes / 50 / 100 per window * 2 s
    assert figures["drain_vs_ideal"] == 100.0
    assert figures["first_request_seconds"] == 1.0
    assert figures["utilisation"] == pytest.approx(2 / 200)  # 2 requests in 2 windows


def test_a_cut_backlog_projects_its_drain_from_its_pace():
    figures = report.figures(
        run_input(
            backlog=True,
            requests=[(100.0, 201, 1)],
            arrivals={A: [(100.0, "subscribed")]},
            cut=110.0,
        )
    )
    assert figures["drained"] is False
    assert figures["drain_seconds"] is None
    assert figures["projected_drain_seconds"] == 20.0  # 1 of 2 in 10 s


def test_markdown_table_gives_ratios_to_the_base_where_they_mean_something():
    runs = {
        "base": {"latency_p50": 2.0, "status_429": 0, "requests": 10},
        "other": {"latency_p50": 0.5, "status_429": 7, "requests": 40},
    }
    table = report.markdown_table(runs, {"base": "Base", "other": "Other"}, "base")
    lines = table.splitlines()
    assert lines[0] == "| figure | Base | Other |"
    assert f"| latency p50, enqueue → Braze (s) | 2.00 | 0.5 ({report.TIMES}0.25) |" in lines
    assert "| 429 answers | 0 | 7 |" in lines  # no ratio against a zero
    assert f"| requests sent | 10 | 40 ({report.TIMES}4.00) |" in lines
    assert not any("drain" in line for line in lines)  # figures nobody has are left out


def test_markdown_document_and_json_summary():
    section = report.Section("steady", "Steady", {"base": {"requests": 1}}, {"base": "Base"})
    text = report.markdown("Title", ["intro"], [section], "base", [("plot", "p.png")], ["c1"])
    assert text.startswith("# Title\n\nintro\n")
    assert "## Steady" in text
    assert "![plot](p.png)" in text
    assert "- c1" in text
    summary = report.summary_json([section], "base", {"limit": 100})
    assert summary["workloads"][0]["figures"] == {"base": {"requests": 1}}
    assert summary["meta"] == {"limit": 100}


def test_format_figure():
    assert report.format_figure(None) == "—"
    assert report.format_figure(True) == "yes"
    assert report.format_figure(12345) == "12,345"
    assert report.format_figure(1234.5) == "1,234"
    assert report.format_figure(12.34) == "12.3"
    assert report.format_figure(0.01234) == "0.0123"


def test_per_worker_rate_limit_splits_the_budget():
    assert per_worker_rate_limit(100, 2.0, 2) == "25/s"
    assert per_worker_rate_limit(100, 2.0, 4) == "12.5/s"
    assert per_worker_rate_limit(5000, 60, 1) == "83.3333/s"


def test_workloads_are_deterministic_and_the_same_for_everyone():
    assert build(QUICK, [2]) == build(QUICK, [2])
    names = [w.name for w in build(FULL, [2, 4])]
    assert names == [
        "steady",
        "backlog-2w",
        "backlog-4w",
        "flips",
        "kill-stream",
        "mixed",
        "kill-backlog",
    ]
    assert [w.name for w in build(QUICK, [2])][-1] == "kill-stream"


def test_backlog_is_unique_changes_of_each_user_in_every_group():
    writes = backlog_across_groups(users=30, groups=4, seed=1)
    assert len(writes) == len({w.key for w in writes}) == 120
    by_user: dict[str, set[str]] = {}
    for w in writes:
        by_user.setdefault(w.value, set()).add(w.state)
    assert all(len(states) == 1 for states in by_user.values())


def test_flips_alternate_each_identifiers_state():
    writes = flipping_stream(rate=40, duration=5, population=10, groups=4, seed=1)
    assert len(writes) == 200
    previous: dict[tuple[str, str, str], str] = {}
    for w in sorted(writes, key=lambda w: w.at):
        assert previous.get(w.key) != w.state
        previous[w.key] = w.state
