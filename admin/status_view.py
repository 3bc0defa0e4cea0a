"""How a `Status` reads to an operator: sections of labelled values and the warnings worth a
look. Pure (no I/O, the clock is an argument) so every wording is tested."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from admin.status import Status
from core.outcome import redirected

Rows = list[tuple[str, str]]

# What each schedule reason (core/waiting.py `WaitReason`) reads as in the table.
REASON_LABELS = {
    "ready": "ready: due, for the next worker",
    "retry": "retry after a failed attempt",
    "paused": "paused after a 429",
    "credentials": "key refused: next probe",
    "budget": "turn in the rate budget",
    "held": "held for its split sibling",
    "recovered": "recovered from a dead worker",
    "handed_back": "handed back by a stopping worker",
}
# An overdue schedule entry or a backlog older than this is worth a warning.
WARN_AFTER_SECONDS = 300
# Beat writes its heartbeat every second: silent this long, it is not running.
BEAT_SILENT_SECONDS = 15
# The coalescer ticks every second: no tick this long, with beat and workers running, is
# worth a look.
TICK_LATE_SECONDS = 30
# A live change waits for no backfill: one due this long is worth a warning (the alert
# BrazeSubsLiveLaneWaiting fires after five minutes of it).
LIVE_WARN_AFTER_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Section:
    title: str
    rows: Rows


def count(value: int) -> str:
    return f"{value:,}"


def duration(seconds: float | None) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def moment(epoch: float | None, now: float) -> str:
    """An instant as UTC time of day and its distance from now."""
    if epoch is None:
        return "-"
    clock = datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S UTC")
    delta = epoch - now
    relative = f"in {duration(delta)}" if delta >= 0 else f"{duration(-delta)} ago"
    return f"{clock} ({relative})"


def next_due(seconds: float | None) -> str:
    """When the soonest waiting batch is due: "in 3.0 s", "overdue by 2.0 s", "-"."""
    if seconds is None:
        return "-"
    return f"in {duration(seconds)}" if seconds >= 0 else f"overdue by {duration(-seconds)}"


def ago(seconds: float | None) -> str:
    return "never seen" if seconds is None else f"{duration(seconds)} ago"


def waiting_rows(status: Status) -> Rows:
    """The schedule's total, each reason that has batches, and the soonest due time."""
    rows: Rows = [("batches", count(status.waiting_batches))]
    rows += [
        (REASON_LABELS.get(reason, reason), count(waiting))
        for reason, waiting in status.waiting_by_reason.items()
        if waiting
    ]
    rows.append(("next due", next_due(status.waiting_next_due_seconds)))
    return rows


def lane_rows(status: Status) -> Rows:
    """Per lane: changes waiting to be cut and how long the oldest due one has waited."""
    return [
        (
            f"{lane}: pending, oldest due",
            f"{count(int(figures['pending']))}, {duration(float(figures['oldest_seconds']))}",
        )
        for lane, figures in status.lanes.items()
    ]


def budget_rows(status: Status, now: float) -> Rows:
    """Whether posting runs (or why not) and the shared budget's tokens."""
    posting = "running"
    if status.budget_source == "unknown" and status.tokens_left is None:
        posting = (
            "unknown: no API key here (BRAZE_API_KEY, or the workspace's api_key_env or "
            "api_key_file) and no worker recorded its workspace"
        )
    elif status.credentials_refused and redirected(status.credentials_refused):
        posting = "stopped: the Braze endpoint redirects (a configuration error)"
    elif status.credentials_refused:
        posting = "stopped: Braze refuses the API key"
    elif status.paused:
        posting = f"paused: {status.pause_reason or 'rate limited'}"
    budget: Rows = [
        ("posting", posting),
        ("tokens left", "-" if status.tokens_left is None else count(status.tokens_left)),
    ]
    if status.budget_source == "recorded by a worker":
        budget.append(("workspace (recorded by a worker)", status.budget_workspace or "-"))
    if status.paused:
        budget.append(("paused until", moment(status.paused_until, now)))
    if status.credentials_refused:
        budget.append(("refused since", moment(status.credentials_refused_since, now)))
        budget.append(("Braze said", status.credentials_refused))
    return budget


def workspace_section(name: str, status: Status, now: float) -> Section:
    """One workspace of several (issue 23): its budget and circuit, what waits, what is out
    and what failed in it; the deployment's sections show the totals."""
    rows = budget_rows(status, now)
    rows += [
        ("pending changes", count(status.pending)),
        ("due now", count(status.due_now)),
        ("oldest due waiting", duration(status.oldest_due_age_seconds)),
        *lane_rows(status),
        ("in flight: identifiers", count(status.in_flight)),
        ("in flight: batches", count(status.batches_in_flight)),
        ("waiting batches (schedule)", count(status.waiting_batches)),
        ("dead letters: identifiers", count(status.dead_letter)),
        ("dead letters: entries", count(status.dead_letter_entries)),
        ("requests in the last minute", count(status.requests_last_minute)),
        ("429 answers in the last minute", count(status.throttled_last_minute)),
    ]
    rows += [
        (
            f"refused: {r['group']} {r['state']} {r['kind']}",
            f"until {moment(r['until'], now)}: {r['detail']}",
        )
        for r in status.refused_groups
    ]
    return Section(f"workspace {name}", rows)


def overview_sections(total: Status, per: dict[str, Status], now: float) -> list[Section]:
    """The whole table: with one workspace exactly `sections` (as before workspaces); with
    several, the deployment's totals (without a rate budget: each workspace has its own)
    and then a section per workspace."""
    if len(per) <= 1:
        return sections(total, now)
    shown = [section for section in sections(total, now) if section.title != "rate budget"]
    return shown + [workspace_section(name, status, now) for name, status in per.items()]


def overview_warnings(total: Status, per: dict[str, Status]) -> list[str]:
    """`warnings` for the deployment (with one workspace, exactly as before); with several,
    each workspace's own warnings name it."""
    if len(per) <= 1:
        return warnings(total)
    found = warnings(total, workspace_level=False)
    for name, status in per.items():
        found += [f"workspace {name}: {note}" for note in warnings(status, deployment_level=False)]
    return found


def sections(status: Status, now: float) -> list[Section]:
    """The status table, top to bottom: what waits, what is out, what failed, the budget."""
    budget = budget_rows(status, now)
    per_request = status.identifiers_per_request
    return [
        Section(
            "buffer",
            [
                ("pending changes", count(status.pending)),
                ("due now", count(status.due_now)),
                ("oldest due waiting", duration(status.oldest_due_age_seconds)),
                ("due later (delay or behind a batch)", count(status.due_later)),
            ],
        ),
        Section("lanes (waiting to be cut)", lane_rows(status)),
        Section(
            "in flight",
            [
                ("identifiers", count(status.in_flight)),
                ("batches", count(status.batches_in_flight)),
                ("batches being posted now", count(status.batches_posting)),
            ],
        ),
        Section("waiting batches (schedule)", waiting_rows(status)),
        Section(
            "workers",
            [
                ("alive (heartbeat)", count(status.workers_alive)),
                ("seen in the last day", count(status.workers_seen_last_day)),
            ],
        ),
        Section(
            "beat and coalescer",
            [
                ("beat: last heartbeat", ago(status.beat_last_seen_seconds)),
                ("last coalescer tick (run by workers)", ago(status.last_tick_seconds)),
            ],
        ),
        Section(
            "dead letters",
            [
                ("identifiers", count(status.dead_letter)),
                ("entries", count(status.dead_letter_entries)),
                ("expired after retention", count(status.dead_letters_expired)),
            ],
        ),
        *(
            [
                Section(
                    "refused by Braze (batches dead-lettered unsent)",
                    [
                        (
                            (f"{r['workspace']}: " if "workspace" in r else "")
                            + f"{r['group']} {r['state']} {r['kind']}",
                            f"until {moment(r['until'], now)}: {r['detail']}",
                        )
                        for r in status.refused_groups
                    ],
                )
            ]
            if status.refused_groups
            else []
        ),
        Section("rate budget", budget),
        Section(
            "last minute",
            [
                ("requests", count(status.requests_last_minute)),
                ("identifiers", count(status.identifiers_last_minute)),
                ("identifiers per request", "-" if per_request is None else f"{per_request:.1f}"),
                ("429 answers", count(status.throttled_last_minute)),
            ],
        ),
        Section(
            "since the start",
            [
                ("changes enqueued", count(status.enqueued_total)),
                ("dropped as stale (occurred earlier)", count(status.stale)),
                ("batches cut", count(status.batches_total)),
                ("identifiers delivered", count(status.delivered_total)),
                ("identifiers dead-lettered", count(status.dead_lettered_total)),
                ("left out: opted out in Braze", count(status.opt_out_skipped)),
                ("errors in Braze's 2xx answers", count(status.delivery_errors_total)),
                ("identifiers erased", count(status.erased)),
            ],
        ),
    ]


def warnings(
    status: Status, *, workspace_level: bool = True, deployment_level: bool = True
) -> list[str]:
    """What an operator should look at, each with where the runbook answers it. With
    several workspaces, a workspace's own (`workspace_level`: its key, budget, dead
    letters, refusals, backlog, ticks) and the deployment's (Redis, beat, workers) are
    asked for apart (`overview_warnings`)."""
    found: list[str] = []
    mine, ours = workspace_level, deployment_level
    if mine and status.credentials_refused and redirected(status.credentials_refused):
        found.append(
            "the Braze endpoint redirects: posting is stopped "
            "(runbook: the Braze endpoint redirects)"
        )
    elif mine and status.credentials_refused:
        found.append("Braze refuses the API key: posting is stopped (runbook: the key was revoked)")
    if mine and status.throttled_last_minute:
        found.append(
            f"{status.throttled_last_minute} 429 answers in the last minute "
            "(runbook: Braze answers 429)"
        )
    if mine and status.dead_letter_entries:
        found.append(
            f"{status.dead_letter_entries:,} dead-letter entries "
            "(runbook: the dead-letter store is filling)"
        )
    for refused in status.refused_groups if mine else []:
        found.append(
            f"Braze refuses group {refused['group']} ({refused['state']}, {refused['kind']}) "
            "as a whole: its batches are dead-lettered unsent "
            "(runbook: the dead-letter store is filling)"
        )
    for finding in (status.redis_findings or []) if ours else []:
        found.append(f"redis: {finding} (README: Redis settings that keep every change)")
    work = status.waiting_batches + status.batches_in_flight + status.due_now
    beat = status.beat_last_seen_seconds
    beat_down = (beat is None and bool(work)) or (beat is not None and beat > BEAT_SILENT_SECONDS)
    if ours and beat_down:
        found.append(
            f"beat is not running (last heartbeat: {ago(beat)}): no coalescer tick is "
            "scheduled, nothing is cut into batches or sent from the schedule "
            "(runbook: beat is not running)"
        )
    if ours and not status.workers_alive and work:
        found.append(
            "no worker is alive (no heartbeat) while work waits: nothing is posted, and the "
            "coalescer, whose ticks run on the workers, does not tick "
            "(runbook: no worker is alive)"
        )
    tick = status.last_tick_seconds
    late = tick is not None and tick > TICK_LATE_SECONDS
    if mine and not beat_down and status.workers_alive and late:
        found.append(
            f"no coalescer tick for {duration(tick)} though beat and workers run "
            "(runbook: nothing is being sent)"
        )
    next_due_seconds = status.waiting_next_due_seconds
    if mine and next_due_seconds is not None and -next_due_seconds > WARN_AFTER_SECONDS:
        found.append(
            f"the soonest waiting batch is overdue by {duration(-next_due_seconds)} "
            "(runbook: nothing is being sent)"
        )
    if mine and (status.oldest_due_age_seconds or 0) > WARN_AFTER_SECONDS:
        found.append(
            f"the oldest due change has waited {duration(status.oldest_due_age_seconds)} "
            "(runbook: a backlog is growing)"
        )
    live_oldest = float(status.lanes.get("live", {}).get("oldest_seconds", 0.0))
    if mine and live_oldest > LIVE_WARN_AFTER_SECONDS:
        found.append(
            f"a live change has waited {duration(live_oldest)} to be cut "
            "(runbook: live changes wait)"
        )
    return found
