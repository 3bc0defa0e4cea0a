"""`braze-subs status` as an operator reads it: the pure sections and warnings (the table
printed against a real Redis: tests/integration/test_status_view.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from admin.status import Status
from admin.status_view import duration, moment, sections, warnings

NOW = 1_800_000_000.0

QUIET = Status(
    pending=0,
    due_now=0,
    due_later=0,
    oldest_due_age_seconds=None,
    in_flight=0,
    batches_in_flight=0,
    dead_letter=0,
    dead_letter_entries=0,
    enqueued_total=0,
    batches_total=0,
    delivered_total=0,
    dead_lettered_total=0,
    dead_letters_expired=0,
    tokens_left=98,
    beat_last_seen_seconds=0.4,
    last_tick_seconds=0.2,
)


def as_dict(status: Status) -> dict[str, dict[str, str]]:
    return {section.title: dict(section.rows) for section in sections(status, NOW)}


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0, "0.0 s"),
        (12.34, "12.3 s"),
        (59.9, "59.9 s"),
        (60, "1 min 00 s"),
        (245, "4 min 05 s"),
        (3599, "59 min 59 s"),
        (3600, "1 h 00 min"),
        (7380, "2 h 03 min"),
    ],
)
def test_durations_read_naturally(seconds, shown):
    assert duration(seconds) == shown


def test_moments_say_when_and_how_far():
    assert moment(None, NOW) == "-"
    assert moment(NOW + 42, NOW) == "08:00:42 UTC (in 42.0 s)"
    assert moment(NOW - 125, NOW) == "07:57:55 UTC (2 min 05 s ago)"


def test_every_figure_the_issue_names_is_shown():
    busy = replace(
        QUIET,
        pending=12_345,
        due_now=12_000,
        due_later=345,
        oldest_due_age_seconds=3.5,
        in_flight=2_500,
        batches_in_flight=50,
        dead_letter=7,
        dead_letter_entries=2,
        tokens_left=40,
        requests_last_minute=4_850,
        identifiers_last_minute=242_000,
        throttled_last_minute=0,
        identifiers_per_request=49.9,
        batches_posting=12,
        waiting_batches=38,
        waiting_by_reason={**QUIET.waiting_by_reason, "ready": 30, "retry": 8},
        waiting_next_due_seconds=0.4,
        workers_alive=3,
        workers_seen_last_day=5,
    )
    shown = as_dict(busy)
    assert shown["buffer"] == {
        "pending changes": "12,345",
        "due now": "12,000",
        "oldest due waiting": "3.5 s",
        "due later (delay or behind a batch)": "345",
    }
    assert shown["in flight"] == {
        "identifiers": "2,500",
        "batches": "50",
        "batches being posted now": "12",
    }
    assert shown["waiting batches (schedule)"] == {
        "batches": "38",
        "ready: due, for the next worker": "30",
        "retry after a failed attempt": "8",
        "next due": "in 0.4 s",
    }
    assert shown["workers"] == {"alive (heartbeat)": "3", "seen in the last day": "5"}
    assert shown["dead letters"]["identifiers"] == "7"
    assert shown["dead letters"]["entries"] == "2"
    assert shown["rate budget"] == {"posting": "running", "tokens left": "40"}
    assert shown["last minute"] == {
        "requests": "4,850",
        "identifiers": "242,000",
        "identifiers per request": "49.9",
        "429 answers": "0",
    }


def test_a_pause_says_why_and_until_when():
    paused = replace(
        QUIET, paused=True, paused_until=NOW + 30, pause_reason="429 from Braze", tokens_left=0
    )
    budget = as_dict(paused)["rate budget"]
    assert budget["posting"] == "paused: 429 from Braze"
    assert budget["paused until"] == "08:00:30 UTC (in 30.0 s)"


def test_a_refused_key_wins_over_a_pause_and_is_explained():
    refused = replace(
        QUIET,
        paused=True,
        paused_until=NOW + 5,
        credentials_refused="401: Invalid API key",
        credentials_refused_since=NOW - 90,
    )
    budget = as_dict(refused)["rate budget"]
    assert budget["posting"] == "stopped: Braze refuses the API key"
    assert budget["refused since"] == "07:58:30 UTC (1 min 30 s ago)"
    assert budget["Braze said"] == "401: Invalid API key"


def test_a_redirect_is_shown_as_a_configuration_error_not_a_refused_key():
    redirect = "HTTP 301: redirect to https://elsewhere.example/x not followed"
    stopped = replace(QUIET, credentials_refused=redirect, credentials_refused_since=NOW - 5)
    budget = as_dict(stopped)["rate budget"]
    assert budget["posting"] == "stopped: the Braze endpoint redirects (a configuration error)"
    assert budget["Braze said"] == redirect
    [warning] = warnings(stopped)
    assert "runbook: the Braze endpoint redirects" in warning


def test_a_quiet_system_has_no_warnings():
    assert warnings(QUIET) == []
    assert as_dict(QUIET)["last minute"]["identifiers per request"] == "-"


def test_warnings_point_at_the_runbook():
    troubled = replace(
        QUIET,
        credentials_refused="401",
        throttled_last_minute=3,
        dead_letter_entries=1_200,
        oldest_due_age_seconds=301,
    )
    found = warnings(troubled)
    assert len(found) == 4
    assert "the key was revoked" in found[0]
    assert found[1].startswith("3 429 answers")
    assert found[2].startswith("1,200 dead-letter entries")
    assert "5 min 01 s" in found[3] and "backlog is growing" in found[3]
    assert warnings(replace(QUIET, oldest_due_age_seconds=300)) == []


def test_the_schedule_lists_every_reason_that_holds_batches_and_when_the_next_is_due():
    assert as_dict(QUIET)["waiting batches (schedule)"] == {"batches": "0", "next due": "-"}
    every = replace(
        QUIET,
        waiting_batches=36,
        waiting_by_reason={reason: n + 1 for n, reason in enumerate(QUIET.waiting_by_reason)},
        waiting_next_due_seconds=-125.0,
    )
    shown = as_dict(every)["waiting batches (schedule)"]
    assert list(shown.values()) == ["36", *(str(n) for n in range(1, 9)), "overdue by 2 min 05 s"]
    assert "key refused: next probe" in shown
    assert "recovered from a dead worker" in shown


def test_no_worker_alive_while_work_waits_is_a_warning():
    stranded = replace(QUIET, waiting_batches=4, workers_seen_last_day=2)
    (found,) = warnings(stranded)
    assert found.startswith("no worker is alive") and "runbook: no worker is alive" in found
    assert "ticks run on the workers" in found
    assert warnings(replace(stranded, workers_alive=1)) == []
    # due changes wait for a batch too (the coalescer cuts them, no worker posts them)
    assert len(warnings(replace(QUIET, due_now=10))) == 1
    # nothing waits: no worker is no problem
    assert warnings(replace(QUIET, workers_seen_last_day=2)) == []


def test_a_waiting_batch_overdue_for_five_minutes_is_a_warning():
    late = replace(QUIET, waiting_batches=1, workers_alive=2, waiting_next_due_seconds=-301.0)
    (found,) = warnings(late)
    assert found.startswith("the soonest waiting batch is overdue by 5 min 01 s")
    assert warnings(replace(late, waiting_next_due_seconds=-300.0)) == []
    assert warnings(replace(late, waiting_next_due_seconds=600.0)) == []


def test_beat_and_the_last_tick_are_shown_and_a_silent_beat_is_named():
    """Issue 27: with beat stopped, status showed no warning for 5 minutes and no tick line;
    with every worker stopped, the tick stops too (it runs on the workers): each warning
    names the component that is missing."""
    shown = as_dict(QUIET)["beat and coalescer"]
    assert shown == {
        "beat: last heartbeat": "0.4 s ago",
        "last coalescer tick (run by workers)": "0.2 s ago",
    }
    no_beat = replace(QUIET, workers_alive=2, beat_last_seen_seconds=16.0, last_tick_seconds=16.0)
    (found,) = warnings(no_beat)
    assert found.startswith("beat is not running (last heartbeat: 16.0 s ago)")
    assert found.endswith("(runbook: beat is not running)")
    assert warnings(replace(no_beat, beat_last_seen_seconds=15.0, last_tick_seconds=1.0)) == []
    # Never seen: a warning once work waits for it.
    never = replace(QUIET, workers_alive=1, beat_last_seen_seconds=None, last_tick_seconds=None)
    assert warnings(never) == []
    assert warnings(replace(never, due_now=5))[0].startswith("beat is not running (last")
    assert as_dict(never)["beat and coalescer"]["beat: last heartbeat"] == "never seen"
    # Every worker gone: the tick is late too, but the warning names the workers only.
    no_workers = replace(QUIET, due_now=5, last_tick_seconds=120.0)
    (found,) = warnings(no_workers)
    assert found.startswith("no worker is alive")
    # Beat and workers run, yet no tick: named as such.
    stuck = replace(QUIET, workers_alive=2, last_tick_seconds=31.0)
    (found,) = warnings(stuck)
    assert found.startswith("no coalescer tick for 31.0 s though beat and workers run")


def test_live_changes_waiting_are_shown_per_lane_and_warned_after_a_minute():
    lanes = {
        "live": {"pending": 4, "oldest_seconds": 75.0},
        "bulk": {"pending": 120_000, "oldest_seconds": 900.0},
    }
    status = replace(QUIET, lanes=lanes)
    rows = dict(row for section in sections(status, NOW) for row in section.rows)
    assert rows["live: pending, oldest due"] == "4, 1 min 15 s"
    assert rows["bulk: pending, oldest due"] == "120,000, 15 min 00 s"
    assert warnings(status) == [
        "a live change has waited 1 min 15 s to be cut (runbook: live changes wait)"
    ]
    # A backfill's old bulk changes alone are no reason to warn about live.
    calm = {**lanes, "live": {"pending": 0, "oldest_seconds": 0.0}}
    assert warnings(replace(QUIET, lanes=calm)) == []


# --- several workspaces (issue 23) ------------------------------------------------------


def test_one_workspace_is_shown_exactly_as_before_workspaces():
    from admin.status import combine
    from admin.status_view import overview_sections, overview_warnings

    busy = replace(QUIET, pending=5, throttled_last_minute=2)
    assert combine({"default": busy}) is busy
    assert overview_sections(busy, {"default": busy}, NOW) == sections(busy, NOW)
    assert overview_warnings(busy, {"default": busy}) == warnings(busy)


def test_totals_of_two_workspaces_add_up_and_name_each_pause():
    from admin.status import combine

    us = replace(
        QUIET,
        pending=3,
        in_flight=50,
        dead_letter=2,
        tokens_left=40,
        oldest_due_age_seconds=1.5,
        requests_last_minute=10,
        identifiers_last_minute=400,
        waiting_by_reason={**QUIET.waiting_by_reason, "retry": 2},
        lanes={
            "live": {"pending": 1, "oldest_seconds": 0.5},
            "bulk": {"pending": 2, "oldest_seconds": 9.0},
        },
        workers_alive=2,
    )
    eu = replace(
        QUIET,
        pending=4,
        in_flight=0,
        dead_letter=5,
        tokens_left=0,
        paused=True,
        pause_reason="HTTP 401: refused",
        credentials_refused="HTTP 401: refused",
        credentials_refused_since=NOW - 5,
        oldest_due_age_seconds=30.0,
        requests_last_minute=10,
        identifiers_last_minute=100,
        waiting_by_reason={**QUIET.waiting_by_reason, "credentials": 3},
        lanes={
            "live": {"pending": 4, "oldest_seconds": 2.0},
            "bulk": {"pending": 0, "oldest_seconds": 0.0},
        },
        workers_alive=2,
        refused_groups=[
            {
                "group": "g",
                "state": "subscribed",
                "kind": "email",
                "detail": "x",
                "since": 1.0,
                "until": 2.0,
            }
        ],
    )
    total = combine({"us": us, "eu": eu})
    assert (total.pending, total.in_flight, total.dead_letter) == (7, 50, 7)
    assert total.tokens_left == 40
    assert total.paused is True
    assert total.pause_reason == "eu: HTTP 401: refused"
    assert total.credentials_refused == "eu: HTTP 401: refused"
    assert total.oldest_due_age_seconds == 30.0
    assert total.identifiers_per_request == 25.0
    assert total.waiting_by_reason["retry"] == 2 and total.waiting_by_reason["credentials"] == 3
    assert total.lanes == {
        "live": {"pending": 5, "oldest_seconds": 2.0},
        "bulk": {"pending": 2, "oldest_seconds": 9.0},
    }
    assert total.workers_alive == 2  # the same processes serve both
    assert total.refused_groups == [{**eu.refused_groups[0], "workspace": "eu"}]
    # a workspace whose budget is unknown makes the sum unknown, not smaller
    assert combine({"us": us, "eu": replace(eu, tokens_left=None)}).tokens_left is None


def test_several_workspaces_get_a_section_each_and_their_warnings_name_them():
    from admin.status import combine
    from admin.status_view import overview_sections, overview_warnings

    evicts = ["maxmemory-policy allkeys-lru evicts keys"]  # one Redis: every read finds it
    us = replace(QUIET, pending=3, tokens_left=40, redis_findings=evicts)
    eu = replace(
        QUIET,
        pending=4,
        tokens_left=0,
        paused=True,
        credentials_refused="HTTP 401: refused",
        credentials_refused_since=NOW - 5,
        redis_findings=evicts,
    )
    per = {"us": us, "eu": eu}
    total = combine(per)
    shown = {section.title: dict(section.rows) for section in overview_sections(total, per, NOW)}
    assert "rate budget" not in shown  # each workspace has its own
    assert shown["buffer"]["pending changes"] == "7"
    assert shown["workspace us"]["posting"] == "running"
    assert shown["workspace us"]["tokens left"] == "40"
    assert shown["workspace us"]["pending changes"] == "3"
    assert shown["workspace eu"]["posting"] == "stopped: Braze refuses the API key"
    assert shown["workspace eu"]["pending changes"] == "4"
    notes = overview_warnings(total, per)
    assert notes == [
        "redis: maxmemory-policy allkeys-lru evicts keys (README: Redis settings that keep "
        "every change)",
        "workspace eu: Braze refuses the API key: posting is stopped (runbook: the key was "
        "revoked)",
    ]
