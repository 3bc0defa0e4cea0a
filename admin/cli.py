"""The `braze-subs` command (also `python -m worker`).

User mistakes (bad flags, bad rows, bad settings, an unreachable Redis) end with one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import heapq
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from admin.status import Overview, Target, find_budget, read_overview
from admin.status_view import overview_sections, overview_warnings
from admin.verify import Mismatch, VerifyReport
from config.settings import get_settings
from config.workspaces import get_workspaces
from core.changes import Change, InvalidChange, Lane, parse_lane, parse_workspace_name
from core.errors import EXIT_ENVIRONMENT, EXIT_REFUSED, BrazeSubsError
from core.redaction import redact_url
from delivery.braze_reads import BrazeReader
from delivery.services import Services, services, workspace_names
from stores.dead_letters import DeadLetter, DeadLetters
from tasks.bulk_import import count_lines, enqueue_file
from tasks.producer import change_from_fields, workspace_of

app = typer.Typer(
    name="braze-subs",
    help="Keep Braze subscription groups in step with your applications.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
dlq_app = typer.Typer(help="The dead-letter store: list, replay, purge.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
probe_app = typer.Typer(
    help="Health probes for Kubernetes exec probes: exit 0 healthy, 1 not.", no_args_is_help=True
)
app.add_typer(probe_app, name="probe")

# markup=False: user data (group ids, file names, Braze messages) is printed as it is.
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)


# Parameters several commands take: one definition each, so their flags and help agree.
# The identifier (one of the three; `_identifier_option` checks that exactly one is given):
ExternalIdOption = Annotated[str | None, typer.Option("--external-id")]
EmailOption = Annotated[str | None, typer.Option("--email")]
PhoneOption = Annotated[str | None, typer.Option("--phone", help="E.164, e.g. +14155550100")]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object.")]
# Dead-letter entries: ids, or --all.
EntryIds = Annotated[
    list[str] | None, typer.Argument(help="Entry ids, whole or any unique prefix.")
]
AllEntries = Annotated[bool, typer.Option("--all", help="Every entry.")]
# Which workspace of BRAZE_WORKSPACES_FILE (issue 23) an admin command covers: one, or all.
WorkspaceOption = Annotated[
    str | None,
    typer.Option(
        "--workspace",
        help="Only this workspace (a name in BRAZE_WORKSPACES_FILE; default: every one).",
    ),
]
LaneOption = Annotated[
    str | None,
    typer.Option(
        "--lane",
        help="live (goes first; the default of enqueue) or bulk (uses what live leaves; "
        "the default of import). For import: the lane of rows that name none.",
    ),
]

# The workspace of a change (BRAZE_WORKSPACES_FILE): enqueue and import.
EnqueueWorkspaceOption = Annotated[
    str | None,
    typer.Option(
        "--workspace",
        help="The Braze workspace (a table of BRAZE_WORKSPACES_FILE). Default: the group's "
        "workspace in the file, else the only one. For import: the workspace of rows that "
        "name none and whose group the file gives to none.",
    ),
]


# The key `braze-subs simulate` accepts unless told others (README: Running it locally).
SIMULATOR_KEY = "sim-key"


class CliError(BrazeSubsError):
    """A usage or environment problem found by a command; `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_ENVIRONMENT) -> None:
        super().__init__(message)
        self.exit_code = code


def _fail(message: str, code: int = EXIT_ENVIRONMENT) -> NoReturn:
    raise CliError(message, code)


def _workspaces(given: str | None) -> list[str]:
    """The workspaces a command covers: every one of the deployment, or the one named
    (a name it does not serve: one line naming the choices, exit 2)."""
    names = list(workspace_names())
    if given is None:
        return names
    if given not in names:
        _fail(f"--workspace: no workspace {given!r}; choose from: {', '.join(names)}")
    return [given]


def _several_workspaces() -> bool:
    """Whether the deployment serves more than one workspace (then listings name each)."""
    return len(workspace_names()) > 1


def _lane_or_fail(given: str | None, default: Lane) -> Lane:
    if given is None:
        return default
    try:
        return parse_lane(given)
    except InvalidChange as exc:
        _fail(f"--{exc}", EXIT_REFUSED)


@app.command()
def enqueue(
    group: Annotated[str, typer.Option("--group", help="Subscription group id.")],
    state: Annotated[str, typer.Option("--state", help="subscribed or unsubscribed.")],
    external_id: ExternalIdOption = None,
    email: EmailOption = None,
    phone: PhoneOption = None,
    double_opt_in: Annotated[
        bool, typer.Option("--double-opt-in", help="Enter the SMS double opt-in workflow.")
    ] = False,
    delay: Annotated[
        float | None, typer.Option("--delay", help="Seconds before the change is due.")
    ] = None,
    occurred_at: Annotated[
        str | None,
        typer.Option(
            "--occurred-at",
            help="When the change happened: RFC 3339 with an offset, or epoch seconds. "
            "The change that occurred last wins.",
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option("--source", help="Who or what made the change (kept in the history)."),
    ] = None,
    respect_opt_out: Annotated[
        bool,
        typer.Option(
            "--respect-opt-out",
            help="Do not send 'subscribed' if Braze holds the identifier as unsubscribed.",
        ),
    ] = False,
    lane: LaneOption = None,
    workspace: EnqueueWorkspaceOption = None,
) -> None:
    """Enqueue one change."""
    # Validated and routed before anything is written: a change that fits no workspace
    # is refused naming its group, as from every other way in.
    change = change_from_fields(
        subscription_group_id=group,
        subscription_state=state,
        external_id=external_id,
        email=email,
        phone=phone,
        use_double_opt_in_logic=double_opt_in or None,
        delay_seconds=delay,
        occurred_at=occurred_at,
        source=source,
        respect_opt_out=respect_opt_out or None,
        lane=lane,
        workspace=workspace,
    )
    target = workspace_of(change)
    buffer = services(target).new_buffer()  # its `stale`: this change's
    buffer.enqueue([change], lane=Lane.LIVE)
    # With several workspaces, say which one took it.
    where = f" (workspace {target})" if len(workspace_names()) > 1 else ""
    if buffer.stale:
        err.print(
            f"dropped as stale: {change.group_id} {change.state.value} ({change.kind.value})"
            f"{where} occurred before the change already accepted for it "
            "(see braze-subs history)"
        )
        return
    err.print(f"enqueued: {change.group_id} {change.state.value} ({change.kind.value}){where}")


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="A .jsonl or .csv file of changes.")],
    skip_invalid: Annotated[
        bool,
        typer.Option("--skip-invalid", help="Enqueue the valid rows even if some are bad."),
    ] = False,
    rejects: Annotated[
        Path | None,
        typer.Option("--rejects", help="With --skip-invalid: write bad rows here (JSONL)."),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            min=1,
            help="Processes that validate rows (default: IMPORT_JOBS, else one per CPU). "
            "With 1, or for a file under 1 MiB, this process validates alone.",
        ),
    ] = None,
    respect_opt_outs: Annotated[
        bool,
        typer.Option(
            "--respect-opt-outs",
            help="Set respect_opt_out on every row: no 'subscribed' is sent for an "
            "identifier Braze holds as unsubscribed.",
        ),
    ] = False,
    from_line: Annotated[
        int,
        typer.Option(
            "--from-line",
            min=1,
            help="Leave out the rows before this line: resume an import that Redis "
            "interrupted (its error says from which line).",
        ),
    ] = 1,
    lane: LaneOption = None,
    workspace: EnqueueWorkspaceOption = None,
) -> None:
    """Enqueue many changes from JSON Lines or CSV; by default all-or-nothing."""
    if rejects is not None and not skip_invalid:
        _fail("--rejects needs --skip-invalid")
    if not file.is_file():
        _fail(f"{file}: no such file")
    if jobs is None:
        jobs = get_settings().import_jobs
    import_lane = _lane_or_fail(lane, Lane.BULK)
    routes = get_workspaces().routes
    if workspace is not None:
        try:
            workspace = routes.route("", fallback=parse_workspace_name(workspace))
        except InvalidChange as exc:
            _fail(f"--workspace: {exc.message}", EXIT_REFUSED)
    total = count_lines(file)
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("lines"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, line: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, rate="")
            task = bar.tasks[tasks[phase]]
            speed = task.speed
            bar.update(tasks[phase], completed=line, rate=f"{speed:,.0f}/s" if speed else "")

        try:
            result = enqueue_file(
                file,
                lambda name: services(name).buffer,
                routes=routes,
                workspace=workspace,
                skip_invalid=skip_invalid,
                rejects=rejects,
                progress=progress,
                jobs=jobs,
                respect_opt_outs=respect_opt_outs,
                from_line=from_line,
                lane=import_lane,
            )
        except BrokenProcessPool:
            done = "some rows may be enqueued" if skip_invalid else "nothing enqueued"
            _fail(f"{file}: a validating process died (out of memory?); {done}; try --jobs 1")
        for task_id in tasks.values():
            bar.update(task_id, completed=total)

    if not result.ok and not skip_invalid:
        for error in result.errors:
            err.print(str(error), markup=False, highlight=False)
        if result.rejected > len(result.errors):
            err.print(f"... and {result.rejected - len(result.errors)} more")
        _fail(
            f"{file}: {result.rejected} of {result.rows} rows invalid; nothing enqueued",
            EXIT_REFUSED,
        )
    note = f", {result.rejected} rejected" if result.rejected else ""
    if result.stale:
        note += f", {result.stale} dropped as stale (a change that occurred later is accepted)"
    where = f" (see {rejects})" if result.rejected and rejects else ""
    if len(routes.names) > 1 and result.by_workspace:
        each = ", ".join(f"{name} {count}" for name, count in result.by_workspace.items())
        note = f" ({each}){note}"
    err.print(f"{file}: {result.enqueued} changes enqueued{note}{where}")


@app.command()
def status(
    as_json: JsonOption = False,
    watch: Annotated[
        float | None,
        typer.Option(
            "--watch", min=0.5, help="Redraw every SECONDS until Ctrl-C.", metavar="SECONDS"
        ),
    ] = None,
) -> None:
    """Where the work stands: buffer, batches in flight, dead letters, the rate budget;
    with several workspaces, the totals and a section per workspace."""
    targets: list[Target] = []
    for name in workspace_names():
        found = services(name)
        # Without the key (an operator's shell) the budget is the one the workers
        # recorded; if none did, status says it cannot tell rather than show a fresh one.
        source = find_budget(found.redis, found.keys, found.settings)
        limiter = found.limiter_for(source.workspace) if source.workspace else None
        targets.append(Target(name, found.keys, limiter, source))
    client, deployment = found.redis, found.keys.deployment

    def snapshot() -> Overview:
        return read_overview(client, targets, deployment)

    if as_json:
        out.print_json(json.dumps(snapshot().as_dict()))
        return
    if watch is None:
        out.print(_status_table(snapshot()))
        return
    with Live(_status_table(snapshot()), console=out, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(watch)
                live.update(_status_table(snapshot()), refresh=True)
        except KeyboardInterrupt:
            pass


def _status_table(snapshot: Overview) -> Table:
    table = Table(title="braze-subs status", show_header=False, title_justify="left", box=None)
    table.add_column(style="bold")
    table.add_column(justify="right")
    shown = overview_sections(snapshot.total, snapshot.workspaces, time.time())
    for number, section in enumerate(shown):
        if number:
            table.add_row("", "")
        table.add_row(Text(section.title.upper(), style="cyan"), "")
        for label, value in section.rows:
            table.add_row(f"  {label}", value)
    notes = overview_warnings(snapshot.total, snapshot.workspaces)
    if notes:
        table.add_row("", "")
        for note in notes:
            table.add_row(Text(f"! {note}", style="yellow"), "")
    return table


@dlq_app.command("list")
def dlq_list(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=10_000, help="Entries per page.")
    ] = 100,
    cursor: Annotated[
        str | None,
        typer.Option("--cursor", help="Where the previous page ended (printed with it)."),
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Every entry, read page by page (streamed).")
    ] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """List dead-letter entries, oldest first, a page at a time (each names its workspace)."""
    if cursor is not None and not _is_cursor(cursor):
        _fail(f"--cursor: not a cursor printed by dlq list: {cursor!r}")
    stores = {name: services(name).dead_letters for name in _workspaces(workspace)}
    if all_:
        _dlq_list_all(stores, as_json, cursor)
        return
    entries, next_cursor = _dlq_page(stores, cursor, limit)
    if as_json:
        out.print_json(json.dumps([_dlq_entry(name, entry) for name, entry in entries]))
    else:
        out.print(_dlq_table(entries))
    total = sum(int(store.client.hlen(store.keys.dead_letters)) for store in stores.values())
    if next_cursor is not None:
        narrowed = f" --workspace {workspace}" if workspace else ""
        err.print(
            f"{len(entries)} of {total:,} entries; next page: "
            f"braze-subs dlq list --limit {limit} --cursor {next_cursor}{narrowed}",
            highlight=False,
        )


def _is_cursor(cursor: str) -> bool:
    score, sep, entry_id = cursor.partition(":")
    return bool(sep) and score.isdigit() and bool(entry_id)


def _dlq_entry(workspace: str, entry: DeadLetter) -> dict[str, object]:
    return {**entry.as_dict(), "workspace": workspace}


Named = list[tuple[str, DeadLetter]]


def _dlq_page(
    stores: dict[str, DeadLetters], cursor: str | None, limit: int
) -> tuple[Named, str | None]:
    """Up to `limit` entries after `cursor` over the workspaces' stores, oldest first, each
    with its workspace, and the next page's cursor. A cursor is a position (dead-lettered
    ms, id) that orders entries of every workspace alike, so one cursor pages them all:
    each store gives its next `limit`, the merge keeps the first `limit`."""
    merged: Named = []
    more = False
    for name, store in stores.items():
        entries, after = store.page(cursor, limit)
        merged += [(name, entry) for entry in entries]
        more = more or after is not None
    if len(stores) == 1:
        return merged, after
    merged.sort(key=lambda pair: (pair[1].dead_lettered_at, pair[1].id))
    shown = merged[:limit]
    if not shown or not (more or len(merged) > limit):
        return shown, None
    last = shown[-1][1]
    return shown, f"{last.dead_lettered_at}:{last.id}"


def _dlq_list_all(stores: dict[str, DeadLetters], as_json: bool, cursor: str | None) -> None:
    """Stream every entry in pages, so memory stays bounded by one page."""
    first = True
    if as_json:
        sys.stdout.write("[")
    while True:
        entries, cursor = _dlq_page(stores, cursor, 1000)
        if as_json:
            for name, entry in entries:
                sys.stdout.write(("\n" if first else ",\n") + json.dumps(_dlq_entry(name, entry)))
                first = False
        elif entries:
            out.print(_dlq_table(entries))
        if cursor is None:
            break
    if as_json:
        sys.stdout.write("\n]\n")
        sys.stdout.flush()


def _dlq_table(entries: Named) -> Table:
    # The id whole, whatever the width (the error column wraps instead): it is what
    # `dlq replay/purge` take.
    widest = max((len(entry.id) for _, entry in entries), default=2)
    several = _several_workspaces()
    table = Table(
        Column("id", no_wrap=True, min_width=widest),
        *(["workspace"] if several else []),
        "group",
        "state",
        "identifiers",
        "attempts",
        "error",
    )
    for name, entry in entries:
        table.add_row(
            entry.id,
            *([name] if several else []),
            entry.subscription_group_id,
            entry.subscription_state,
            str(len(entry.identifiers)),
            str(entry.attempts),
            entry.error,
        )
    return table


def _ids_or_all(ids: list[str] | None, all_: bool) -> list[str] | None:
    if all_ and ids:
        _fail("give entry ids or --all, not both")
    if not all_ and not ids:
        _fail("give entry ids or --all")
    return None if all_ else list(ids or [])


def _resolve(
    stores: dict[str, DeadLetters], ids: list[str] | None
) -> tuple[dict[str, list[str] | None], list[str]]:
    """Entry ids as typed, whole or a unique prefix (`dlq list` may cut them), each found in
    whichever workspace holds it: the ids per workspace (None: all of its entries) and
    those that matched nothing. A prefix matching more than one entry, in one workspace or
    across them, refuses the whole command before any entry is touched, naming what it
    matched."""
    if ids is None:
        return dict.fromkeys(stores), []
    chosen: dict[str, list[str] | None] = {name: [] for name in stores}
    missing: list[str] = []
    for text in ids:
        found: list[tuple[str, str]] = []
        for name, store in stores.items():
            resolved = store.resolve([text])
            if resolved.ambiguous:
                _ambiguous(text, resolved.ambiguous[text])
            found += [(name, entry_id) for entry_id in resolved.ids]
        whole = [pair for pair in found if pair[1] == text]
        found = whole or found
        if len(found) > 1:
            _ambiguous(text, [f"{entry_id} ({name})" for name, entry_id in found])
        if not found:
            missing.append(text)
            continue
        name, entry_id = found[0]
        listed = chosen[name]
        assert listed is not None
        if entry_id not in listed:
            listed.append(entry_id)
    return chosen, missing


def _ambiguous(prefix: str, matches: list[str]) -> NoReturn:
    named = ", ".join(sorted(matches)[:3]) + (", …" if len(matches) > 3 else "")
    _fail(
        f"entry id {prefix!r} matches more than one entry ({named}): give more of it; "
        "nothing was replayed or purged",
        EXIT_REFUSED,
    )


def _refuse_missing(missing: list[str]) -> None:
    """Exit 1 naming the entry ids that were not found, after the rest were handled."""
    if missing:
        _fail(f"no such entries: {', '.join(missing)}", EXIT_REFUSED)


@dlq_app.command("replay")
def dlq_replay(
    ids: EntryIds = None,
    all_: AllEntries = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Return dead-lettered identifiers to the buffer (a newer change for one wins)."""
    stores = {name: services(name).dead_letters for name in _workspaces(workspace)}
    chosen, missing = _resolve(stores, _ids_or_all(ids, all_))
    entries = requeued = superseded = 0
    for name, entry_ids in chosen.items():
        if entry_ids == []:
            continue
        report = stores[name].replay(entry_ids)
        entries, requeued = entries + report.entries, requeued + report.requeued
        superseded += report.superseded
        missing += report.missing
    err.print(
        f"replayed {entries} entries: {requeued} identifiers back in the buffer, "
        f"{superseded} skipped (a newer change exists)"
    )
    _refuse_missing(missing)


@dlq_app.command("purge")
def dlq_purge(
    ids: EntryIds = None,
    all_: AllEntries = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Delete dead-letter entries for good."""
    stores = {name: services(name).dead_letters for name in _workspaces(workspace)}
    chosen, missing = _resolve(stores, _ids_or_all(ids, all_))
    entries = identifiers = 0
    for name, entry_ids in chosen.items():
        if entry_ids == []:
            continue
        report = stores[name].purge(entry_ids)
        entries, identifiers = entries + report.entries, identifiers + report.identifiers
        missing += report.missing
    err.print(f"purged {entries} entries ({identifiers} identifiers)")
    _refuse_missing(missing)


def _identifier_option(
    external_id: str | None, email: str | None, phone: str | None
) -> tuple[str, str]:
    """The one identifier given, normalised as producers normalise it."""
    from core.changes import normalise_email, normalise_external_id, normalise_phone

    given = [
        (kind, value)
        for kind, value in (("external_id", external_id), ("email", email), ("phone", phone))
        if value is not None
    ]
    if len(given) != 1:
        _fail("give exactly one of --external-id, --email, --phone")
    kind, value = given[0]
    normalise = {
        "external_id": normalise_external_id,
        "email": normalise_email,
        "phone": normalise_phone,
    }[kind]
    return kind, normalise(value)


@app.command()
def verify(
    file: Annotated[Path, typer.Argument(help="A .jsonl or .csv file in import format.")],
    as_json: JsonOption = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Enqueue every drifted row again as a change (never over a change accepted "
            "since the row's occurred_at, or since the file was written for rows without one).",
        ),
    ] = False,
    resubscribe: Annotated[
        bool,
        typer.Option(
            "--resubscribe",
            help="With --repair: also re-subscribe rows that Braze holds as unsubscribed "
            "(opted out in Braze); says how many first.",
        ),
    ] = False,
    workspace: Annotated[
        str | None,
        typer.Option(
            "--workspace",
            help="The workspace of rows that name none and whose group BRAZE_WORKSPACES_FILE "
            "gives to none (default: the only workspace).",
        ),
    ] = None,
) -> None:
    """Read Braze back for every row of FILE and report drift (exit 0 none, 1 drift, 2
    bad input or Braze unreachable). Each row is read from its workspace's Braze: the
    row's `workspace`, else its group's, else --workspace, else the only one."""
    from admin.verify import Side, Verification, write_json

    if resubscribe and not repair:
        _fail("--resubscribe goes with --repair")
    names = _workspaces(None)
    if workspace is not None:
        _workspaces(workspace)  # a name the deployment serves, or one line and exit 2
    if not file.is_file():
        _fail(f"{file}: no such file")
    routes = get_workspaces().routes

    def route(change: Change) -> str:
        return routes.route(change.group_id, change.workspace, fallback=workspace)

    sides: dict[str, Side] = {}
    for name in names:
        found = services(name)
        sides[name] = Side(
            found.redis,
            found.keys,
            found.buffer,
            make_reader=_reader_of(found),
        )
    concurrency = services(names[0]).settings.verify_concurrency
    total_lines = count_lines(file)
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Verification.across(sides, route) as run:
        with Progress(*columns, console=err, transient=False) as bar:
            tasks: dict[str, int] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    unit = "lines" if phase == "validating" else "identifiers"
                    tasks[phase] = bar.add_task(phase, total=total, rate="", unit=unit)
                task = bar.tasks[tasks[phase]]
                speed = task.speed
                bar.update(tasks[phase], completed=done, rate=f"{speed:,.0f}/s" if speed else "")

            distinct = run.load(file, progress, total_lines)
            report = run.report
            if report.ok:
                for name in run.workspaces():  # each workspace read needs its key
                    services(name).settings.require_braze()
                run.check(
                    repair=repair,
                    progress=progress,
                    total=distinct,
                    concurrency=concurrency,
                )
        opted_out = report.totals.opted_out_in_braze
        if report.ok and resubscribe and opted_out:
            err.print(
                f"re-subscribing {opted_out:,} identifiers that Braze holds as unsubscribed "
                "(opted out in Braze; --resubscribe)"
            )
            run.resubscribe()
        if not report.ok:
            for error in report.errors:
                err.print(str(error), markup=False, highlight=False)
            if report.invalid > len(report.errors):
                err.print(f"... and {report.invalid - len(report.errors)} more")
            _fail(f"{file}: {report.invalid} of {report.rows} rows invalid; nothing checked")
        if as_json:
            write_json(report, run.mismatches(), sys.stdout)
        else:
            _print_verify(report, run.mismatches())
    if report.drifted:
        raise typer.Exit(EXIT_REFUSED)


MISMATCHES_SHOWN = 50


def _reader_of(found: Services) -> Callable[[], BrazeReader]:
    """A workspace's reader, made when its first row is read (as long as it takes)."""
    return lambda: found.reader(max_wait_seconds=None)


def _print_verify(report: VerifyReport, mismatches: Iterator[Mismatch]) -> None:
    table = Table(
        "group",
        "checked",
        "matching",
        "drift",
        "unknown",
        "changing",
        "superseded",
        "opted out in Braze",
        "beyond retention",
    )
    for group, counts in sorted(report.groups.items()):
        table.add_row(
            group,
            *(
                f"{value:,}"
                for value in (
                    counts.checked,
                    counts.matching,
                    counts.drift,
                    counts.unknown,
                    counts.changing,
                    counts.superseded,
                    counts.opted_out_in_braze,
                    counts.beyond_retention,
                )
            ),
        )
    out.print(table)
    totals = report.totals
    listed = (
        totals.drift
        + totals.unknown
        + totals.superseded
        + totals.opted_out_in_braze
        + totals.beyond_retention
    )
    for shown, mismatch in enumerate(mismatches):
        if shown == 0:
            out.print("mismatches (line, group, identifier, expected -> Braze, outcome):")
        if shown == MISMATCHES_SHOWN:
            out.print(f"  ... more: --json lists all {listed}")
            break
        out.print(
            f"  line {mismatch.line}: {mismatch.subscription_group_id} "
            f"{mismatch.kind}={mismatch.value} {mismatch.expected} -> {mismatch.braze}"
            f" ({mismatch.outcome.replace('_', ' ')})"
        )
    notes = ""
    if totals.superseded:
        notes += f", {totals.superseded:,} superseded (a newer change was accepted here)"
    if totals.opted_out_in_braze:
        notes += f", {totals.opted_out_in_braze:,} opted out in Braze"
        if not report.resubscribed:
            notes += " (left alone; --resubscribe re-subscribes them)"
    if totals.beyond_retention:
        notes += f", {totals.beyond_retention:,} older than the watermark retention (left alone)"
    if report.repaired:
        notes += f", {report.repaired:,} repaired (enqueued again)"
    if report.resubscribed:
        notes += f", {report.resubscribed:,} of them re-subscribed"
    err.print(
        f"checked {totals.checked:,}: {totals.matching:,} matching, {totals.drift:,} drift, "
        f"{totals.unknown:,} unknown, {totals.changing:,} changing{notes}; "
        f"{report.read_calls:,} read calls"
    )


@app.command()
def lookup(
    external_id: ExternalIdOption = None,
    email: EmailOption = None,
    phone: PhoneOption = None,
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """The identifier's subscription groups and states in Braze (each workspace's Braze,
    a section each, unless --workspace names one)."""
    kind, value = _identifier_option(external_id, email, phone)
    names = _workspaces(workspace)
    readers = {}
    for name in names:  # every workspace's key and endpoint, before the first read
        found = services(name)
        found.settings.require_braze()
        readers[name] = found.reader(max_wait_seconds=None)
    held = {name: reader.user_groups(kind, value) for name, reader in readers.items()}
    if as_json:
        users = [{**u.as_dict(), "workspace": name} for name, found in held.items() for u in found]
        workspaces = {name: {"users": [u.as_dict() for u in found]} for name, found in held.items()}
        out.print_json(
            json.dumps({"kind": kind, "value": value, "users": users, "workspaces": workspaces})
        )
        return
    several = _several_workspaces()
    for name, users in held.items():
        if several:
            out.print(f"workspace {name}")
        if not users:
            out.print(f"Braze holds no user for {kind} {value}")
            continue
        table = Table("user", "group", "name", "channel", "state")
        for user in users:
            who = user.external_id or user.email or user.phone or "-"
            for group in user.groups or ():
                table.add_row(who, group.group_id, group.name, group.channel, group.state.value)
            if not user.groups:
                table.add_row(who, "-", "", "", "no groups")
        out.print(table)


@app.command()
def history(
    external_id: ExternalIdOption = None,
    email: EmailOption = None,
    phone: PhoneOption = None,
    group: Annotated[str | None, typer.Option("--group", help="Only this group.")] = None,
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """What happened here to the identifier's changes, oldest first (consent history), in
    every workspace unless --workspace names one; each event says its workspace."""
    from core.changes import format_ms
    from stores.history import ConsentHistory, HistoryEvent

    kind, value = _identifier_option(external_id, email, phone)
    per_workspace: list[list[tuple[str, HistoryEvent]]] = []
    marks: dict[str, dict[str, int]] = {}
    for name in _workspaces(workspace):
        found = services(name)
        reader = ConsentHistory(found.redis, found.keys)
        per_workspace.append([(name, event) for event in reader.events(kind, value, group)])
        marks[name] = {
            g: ms for g, ms in reader.watermarks(kind, value).items() if group in (None, g)
        }
    # Each workspace's events are in order; merged by time, each keeps its own order.
    events = list(heapq.merge(*per_workspace, key=lambda pair: pair[1].at_ms))
    latest: dict[str, int] = {}
    for held in marks.values():
        for g, ms in held.items():
            latest[g] = max(ms, latest.get(g, ms))
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "kind": kind,
                    "value": value,
                    "events": [{**e.as_dict(), "workspace": name} for name, e in events],
                    "watermarks": {g: format_ms(ms) for g, ms in sorted(latest.items())},
                    "watermarks_by_workspace": {
                        name: {g: format_ms(ms) for g, ms in sorted(held.items())}
                        for name, held in marks.items()
                    },
                }
            )
        )
        return
    if not events:
        days = services(next(iter(marks))).settings.history_retention_days
        out.print(f"no history for {kind} {value} (kept {days:g} days after the last event)")
        return
    several = _several_workspaces()
    table = Table("at (UTC)", *(["workspace"] if several else []), "group", "what")
    for name, event in events:
        table.add_row(
            format_ms(event.at_ms),
            *([name] if several else []),
            event.group_id or "-",
            event.describe(),
        )
    out.print(table)


@app.command()
def forget(
    external_id: ExternalIdOption = None,
    email: EmailOption = None,
    phone: PhoneOption = None,
) -> None:
    """Erase everything braze-subs holds about the identifier, in every workspace (not
    Braze's copy)."""
    from stores.erasure import forget as erase

    kind, value = _identifier_option(external_id, email, phone)
    names = list(workspace_names())
    totals: dict[str, int] = {}
    for name in names:
        found = services(name)
        report = erase(
            found.redis,
            found.keys,
            kind,
            value,
            scripts=found.scripts,
            retention=found.retention,
            grace_ms=found.settings.redispatch_grace_ms,
        )
        for what, removed in report.as_dict().items():
            totals[what] = totals.get(what, 0) + removed
    where = f" (every workspace: {', '.join(names)})" if len(names) > 1 else ""
    out.print(
        f"erased {kind} {value} from braze-subs{where}: {totals['pending']} pending changes, "
        f"{totals['in_flight']} batches in flight (they finish without it), "
        f"{totals['dead_letters']} dead-letter entries, {totals['history_events']} history "
        f"events, {totals['watermarks']} watermarks"
    )
    out.print(
        "Braze is not changed: delete the user there with Braze's user deletion "
        "(POST /users/delete, or the dashboard's user search) to erase Braze's copy."
    )


@app.command()
def simulate(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8700,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="A key it accepts (repeatable): the workers' BRAZE_API_KEY.",
            show_default=SIMULATOR_KEY,
        ),
    ] = None,
    email_group: Annotated[
        list[str] | None, typer.Option("--email-group", help="An email group id (repeatable).")
    ] = None,
    sms_group: Annotated[
        list[str] | None, typer.Option("--sms-group", help="An SMS group id (repeatable).")
    ] = None,
    auto_groups: Annotated[
        bool, typer.Option(help="Accept unknown group ids, typed by first use.")
    ] = True,
    rate_limit: Annotated[int, typer.Option(help="Requests per window.")] = 5000,
    window_seconds: Annotated[float, typer.Option(help="Rate-limit window.")] = 60.0,
    latency_ms: Annotated[float, typer.Option(help="Added latency per request.")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Fraction of requests answering 500.")] = 0.0,
    read_rate_limit: Annotated[
        int, typer.Option(help="Read requests per read window (status/get, user/status).")
    ] = 250_000,
    read_window_seconds: Annotated[float, typer.Option(help="Read rate-limit window.")] = 3600.0,
    legacy_read_values: Annotated[
        bool, typer.Option(help="status/get answers 0/1/null instead of the state names.")
    ] = False,
    applied_log_limit: Annotated[
        int, typer.Option(help="Applied states kept for /_sim/applied (0: none).")
    ] = 1_000_000,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A TOML file of [workspaces.NAME] tables (api_keys and any option above): "
            "several workspaces, told apart by key; unset fields take the options' values.",
        ),
    ] = None,
) -> None:
    """Run a local Braze stand-in (v1 and v2, rate limits, faults) for development and demos.

    It accepts the key sim-key unless --api-key says otherwise (README: Running it locally).

    Workers: BRAZE_API_KEY=sim-key BRAZE_REST_ENDPOINT=http://127.0.0.1:8700

    Faults: POST /_sim/faults; undo them: POST /_sim/reset (?workspace=NAME with --config)."""
    _require_dev_tooling("simulate", "simulator")
    from simulator import SimulatorConfig
    from simulator.config_file import ConfigFileError, load_config_file
    from simulator.server import serve

    if config_file is not None and api_key:
        _fail("simulate: --api-key does not apply with --config", EXIT_REFUSED)

    try:
        config = SimulatorConfig(
            api_keys=set(api_key or [SIMULATOR_KEY]),
            email_groups=set(email_group or []),
            sms_groups=set(sms_group or []),
            auto_groups=auto_groups,
            rate_limit=rate_limit,
            window_seconds=window_seconds,
            latency_ms=latency_ms,
            error_rate=error_rate,
            read_rate_limit=read_rate_limit,
            read_window_seconds=read_window_seconds,
            legacy_read_values=legacy_read_values,
            applied_log_limit=applied_log_limit,
        )
    except ValueError as error:  # one line naming the option, no traceback
        _fail(f"simulate: {error}", EXIT_REFUSED)
    if config_file is None:
        keys = ", ".join(sorted(config.api_keys))
        err.print(
            f"Braze simulator on http://{host}:{port}, accepting the key {keys} "
            "(control API under /_sim/: state, stats, faults, reset)"
        )
        serve(config, host=host, port=port)
        return
    try:
        workspaces = load_config_file(config_file, config)
    except ConfigFileError as error:  # one line naming the table and field
        _fail(f"simulate: {error}", EXIT_REFUSED)
    listed = "; ".join(
        f"{name} (key {', '.join(sorted(ws.api_keys))})"
        for name, ws in workspaces.workspaces.items()
    )
    err.print(
        f"Braze simulator on http://{host}:{port}, workspaces {listed} "
        "(control API under /_sim/, ?workspace=NAME: state, stats, faults, reset)"
    )
    serve(workspaces, host=host, port=port)


@app.command()
def metrics(
    port: Annotated[
        int | None, typer.Option(help="Port of /metrics (default: METRICS_PORT).", min=1, max=65535)
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: METRICS_ADDRESS).")
    ] = None,
) -> None:
    """The Prometheus exporter: serves /metrics, reading Redis on every scrape (every
    workspace's pipeline, each series labelled with its workspace)."""
    from admin.exporter import registry_for, serve
    from stores.connection import redis_client
    from stores.limiter import RateLimiter

    names = list(workspace_names())
    found = services(names[0])
    # Its own client with timeouts: a scrape against an unreachable Redis answers
    # braze_subs_redis_up 0 within seconds instead of hanging until Prometheus gives up.
    client = redis_client(found.settings, socket_timeout=5, socket_connect_timeout=5)
    client.ping()  # an unreachable Redis stops the exporter at start, in one line
    targets = []
    for name in names:
        found = services(name)
        source = find_budget(client, found.keys, found.settings)
        shared = found.limiter_for(source.workspace or found.settings.workspace_id)
        limiter = RateLimiter(client, shared.key, shared.budget, max_wait_seconds=0)
        targets.append(Target(name, found.keys, limiter, source))
    port = port or found.settings.metrics_port
    host = host or found.settings.metrics_address
    err.print(f"braze-subs metrics on http://{host}:{port}/metrics", highlight=False)
    serve(port, host, registry_for(client, found.keys.deployment, None, targets=targets))


@app.command("api")
def api_command(
    port: Annotated[
        int | None, typer.Option(help="Port (default: PORT).", min=1, max=65535)
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address (default: API_ADDRESS).")] = None,
) -> None:
    """The HTTP ingest API: POST /v1/changes, GET /healthz (bearer tokens: API_TOKENS)."""
    from api.server import serve  # starlette and uvicorn: loaded only to serve

    serve(get_settings(), host=host, port=port)


@probe_app.command("live")
def probe_live(
    role: Annotated[str, typer.Option("--role", help="worker or beat.")],
) -> None:
    """Liveness: the process of ROLE in this container wrote its heartbeat recently."""
    _probe(["live", "--role", role])


@probe_app.command("ready")
def probe_ready(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for Redis.", min=0.1)] = 2.0,
) -> None:
    """Readiness: the settings are valid and Redis answers."""
    _probe(["ready", "--timeout", str(timeout)])


def _probe(argv: list[str]) -> None:
    # `braze-subs probe` itself is routed to admin.probe before this module is imported
    # (admin/launcher.py); these commands list the probes in --help and serve `python -m`.
    from admin import probe

    raise typer.Exit(probe.main(argv))


@app.command()
def demo(
    changes: Annotated[int, typer.Option(help="How many changes to feed.")] = 20_000,
    keep_running: Annotated[
        bool,
        typer.Option("--keep-running", help="Then add Flower and keep everything up until Ctrl-C."),
    ] = False,
) -> None:
    """Run the whole pipeline locally: Redis, the simulator, a worker and beat; feed changes."""
    _require_dev_tooling("demo", "devtools")
    from devtools.demo import run_demo  # dev tooling: imported only when the demo runs

    run_demo(changes=changes, console=err, out=out, keep_running=keep_running)


def _require_dev_tooling(command: str, package: str) -> None:
    """Stop in one line when `package` (dev tooling) is not installed: the runtime wheel
    leaves out the simulator and the demo; a clone's dev install (`./dev install`, an
    editable install of the repository) has them."""
    if importlib.util.find_spec(package) is None:
        _fail(
            f"{command}: dev tooling, not part of this install ({package}/ is left out of "
            "the runtime wheel); run it from a clone of the repository after ./dev install"
        )


def main() -> None:
    """Entry point: run the CLI, turning user mistakes into one line and an exit code."""
    try:
        get_settings()
        app()
    except (RedisConnectionError, RedisTimeoutError) as exc:
        url = redact_url(get_settings().redis_url)
        err.print(f"braze-subs: cannot reach Redis at {url}: {exc}", markup=False, highlight=False)
        sys.exit(EXIT_ENVIRONMENT)
    except BrazeSubsError as exc:  # every user-facing error: one line, its exit code
        err.print(f"braze-subs: {exc}", markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a file that cannot be read or written
        err.print(f"braze-subs: {exc.strerror or exc}: {exc.filename or ''}", highlight=False)
        sys.exit(EXIT_ENVIRONMENT)
