"""braze-subs against the alternatives users ask about, side by side, in one run.

    .venv/bin/python -m bench.compare            # everything (about 8 minutes)
    .venv/bin/python -m bench.compare --quick    # a smoke run (about 2 minutes)

Drives the same workloads (bench/workloads.py) through braze-subs (v1; v2 where the
workload allows packing), a Celery task per change throttled by Celery's `rate_limit`, and
a celery-batches task. Every system gets, for every workload, a fresh private redis-server
and a fresh simulator enforcing the same fixed windows (100 requests per 2 s by default),
real `celery worker` processes (and braze-subs' beat), and the same producer. Writes a
Markdown and a JSON table (bench/results/compare.md, compare.json) and PNG plots, and
prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from tempfile import TemporaryDirectory

from bench import plots, recording, report
from bench.figures import RESULTS
from bench.recording import start_simulator
from bench.systems import FAST_RECOVERY, System, systems_for
from bench.workloads import FULL, QUICK, Key, Workload, Write, build
from devtools.processes import ProcessGroup, local_redis
from simulator import SimulatorState

API_KEY = "bench-key"
BASE = "braze-subs-v1"
IDLE_HOLD_SECONDS = 0.6  # nothing held and no request for this long: the system is done


@dataclass
class Observed:
    system: str
    label: str
    workload: Workload
    figures: dict[str, report.Figure]
    requests: list[tuple[float, int, int]]
    first_request: float
    cut: float
    done_times: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stream(
    system: System,
    writes: Sequence[Write],
    last_writes: dict[Key, tuple[str, float]],
    kill_at: float | None,
    kill: Callable[[], None],
) -> None:
    """Hand the writes to the system at their offsets; SIGKILL worker 0 at `kill_at`."""
    ordered = sorted(writes, key=lambda w: w.at)
    start = time.time()
    sent = 0
    while sent < len(ordered):
        elapsed = time.time() - start
        if kill_at is not None and elapsed >= kill_at:
            kill()
            kill_at = None
        due = sent
        while due < len(ordered) and ordered[due].at <= elapsed:
            due += 1
        if due == sent:
            time.sleep(min(0.01, max(0.0, ordered[sent].at - elapsed)))
            continue
        chunk = ordered[sent:due]
        enqueued = time.time()
        system.enqueue(chunk)
        for w in chunk:
            last_writes[w.key] = (w.state, enqueued)
        sent = due


def wait_until_idle(system: System, state: SimulatorState, deadline: float) -> None:
    idle_since: float | None = None
    while time.time() < deadline:
        requests = state.requests()
        quiet = not requests or time.time() - requests[-1].t >= IDLE_HOLD_SECONDS
        if system.idle() and quiet:
            idle_since = idle_since or time.time()
            if time.time() - idle_since >= IDLE_HOLD_SECONDS:
                return
        else:
            idle_since = None
        time.sleep(0.2)


def run_one(
    system: System, workload: Workload, limit: int, window: float, keep_logs: Path | None
) -> Observed:
    begun = time.time()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="braze-subs-compare-")))
        if keep_logs is not None:
            target = keep_logs / f"{workload.name}-{system.name}"
            stack.callback(lambda: shutil.copytree(workdir, target, dirs_exist_ok=True))
        redis_url = stack.enter_context(local_redis(workdir))
        sim, state = start_simulator(limit, window, API_KEY)
        stack.callback(sim.stop)
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BRAZE_REST_ENDPOINT": sim.url,
            "BRAZE_API_KEY": API_KEY,
            "BRAZE_RATE_LIMIT": str(limit),
            "BRAZE_RATE_LIMIT_WINDOW_SECONDS": str(window),
            **system.env(workload.workers, workload.kill_at is not None),
        }
        procs = stack.enter_context(ProcessGroup(workdir, env))
        system.connect(redis_url)
        last_writes: dict[Key, tuple[str, float]] = {}
        if workload.backlog:
            enqueued = time.time()
            system.enqueue(workload.writes)
            last_writes = {w.key: (w.state, enqueued) for w in workload.writes}
        launched = time.time()
        workers = system.start(procs, workload.workers)
        procs.wait_ready(workers)
        ready = time.time()
        at_kill: list[int] = []

        def kill() -> None:
            at_kill.append(system.in_workers())
            procs.kill(workers[0])

        if not workload.backlog:
            stream(system, workload.writes, last_writes, workload.kill_at, kill)
        elif workload.during:
            stream(system, workload.during, last_writes, None, kill)
        elif workload.kill_at is not None:
            time.sleep(max(0.0, ready + workload.kill_at - time.time()))
            kill()
        start_of_timebox = ready if workload.backlog else time.time()
        wait_until_idle(system, state, start_of_timebox + workload.timebox)
        cut = time.time()
        left = sum(system.leftovers().values())
        requests = [(r.t, r.status, r.identifiers) for r in state.requests()]
        arrivals = recording.arrivals(state)
        final = {(s["group"], s["kind"], s["value"]): s["state"] for s in state.subscriptions()}
        stopping = time.time()
    say(
        f"    setup {launched - begun:.1f} s, start {ready - launched:.1f} s, "
        f"run {cut - ready:.1f} s, stop {time.time() - stopping:.1f} s"
    )
    run = report.RunInput(
        limit=limit,
        window=window,
        backlog=workload.backlog,
        changes=len(workload.writes),
        last_writes=last_writes,
        arrivals=arrivals,
        final=final,
        requests=requests,
        ready=ready,
        cut=cut,
        left_over=left,
        in_workers_at_kill=at_kill[0] if at_kill else None,
        stream_keys=frozenset(w.key for w in workload.during),
    )
    done = report.satisfied_at(last_writes, arrivals)
    first = min((t for t, _s, _n in requests), default=ready)
    return Observed(
        system=system.name,
        label=system.label,
        workload=workload,
        figures=report.figures(run),
        requests=requests,
        first_request=first,
        cut=cut,
        done_times=sorted(done.values()),
        latencies=[done[key] - last_writes[key][1] for key in done],
    )


def caveats(limit: int, window: float, backlog_ids: int, loads: tuple[str, str]) -> list[str]:
    per_id_bound = backlog_ids / (limit / window)
    ideal = backlog_ids / 50 / limit * window
    recovery = ", ".join(f"{k}={v}" for k, v in FAST_RECOVERY.items())
    return [
        f"One run of each, on a 2-core machine where the simulator, the producer, Redis, the "
        f"workers and braze-subs' beat share the cores with other work (load average "
        f"{loads[0]} at the start, {loads[1]} at the end). Arrival times are the simulator's "
        f"clock; with several processes on 2 cores requests bunch, which shows in the "
        f"sliding-window maximum at a 2 s window much more than it would at Braze's 60 s.",
        f"The limit is scaled down to {limit} requests per {window:g} s (fixed windows at the "
        f"simulator, as Braze counts) so that the whole comparison takes minutes.",
        "braze-subs runs as shipped (defaults, `celery -A worker.app worker` and `beat`) but "
        "for the rate limit; in the two kill workloads its recovery timers are shortened "
        f"({recovery}, "
        "the values of the kill -9 test) so that recovery fits in the run: with the defaults "
        "the killed worker's batch is re-dispatched after about 2 minutes.",
        "braze-subs' linger follows the pressure on the budget (core/linger.py): at this "
        "scaled-down limit a 40/s stream is about 70 % of the budget, so partial batches "
        "wait a few hundred ms for company; a backlog waits the whole BATCH_LINGER_SECONDS "
        "for full requests. The mixed workload's drain figures count the stream's "
        "identifiers too, against an ideal for the backlog alone.",
        "Every Celery worker, of every system, runs with `--hostname wN@%h --without-gossip "
        "--without-mingle` (faster start on a small machine; no effect on posting).",
        "naive: Celery defaults (prefork pool with one process per core, prefetch multiplier "
        "4, early acknowledgement, no result backend), `rate_limit` = the budget divided by "
        "the number of workers, `autoretry_for=(httpx.HTTPError,)`, `retry_backoff=True`, "
        "`max_retries=5`. Early acknowledgement means a killed worker loses the tasks it was "
        "running; the messages it had prefetched stay unacknowledged in Redis and come back "
        "only after the transport's visibility timeout (1 hour by default): they are counted "
        "as 'still queued or held', not as lost.",
        "naive: once a worker's first prefetched burst is spent, Celery's rate limiter (a "
        "timer on the worker's event loop) let each worker fetch and run only about one task "
        "per second on the Redis broker here: with Celery 5.6.3 and 5.7.0, and (on 5.7.0) "
        "with the threads and solo pools and prefetch multipliers 0 and 100 too; without "
        "`rate_limit` the same worker runs hundreds a second (celery/celery#5927 reports "
        "this family of problem). It shows wherever work queues up: in the backlogs, and in "
        "the stream once a worker was killed (the survivor's share of the budget is below "
        "the stream's rate). Even a perfect rate limiter leaves one "
        "identifier per request: the backlog would need at "
        f"least {per_id_bound:,.0f} s ({backlog_ids:,} requests at {limit / window:g}/s) "
        f"against an ideal of {ideal:g} s with 50 per request.",
        "celery-batches: its `Batches` task replaces Celery's task strategy, so the task's "
        "`rate_limit` is never applied: nothing throttles it but Braze's 429s. "
        "`flush_every=50` counts messages, "
        "so a flush over several groups, states and identifier kinds becomes several small "
        "requests. `worker_prefetch_multiplier=0` (its documented requirement) lets the "
        "first worker take a whole backlog. A batch task cannot use `autoretry_for`, so the "
        "changes of a failed request are sent again as new messages with the same "
        "exponential backoff and full jitter, at most 5 times; within one flush only the last "
        "change per identifier is posted.",
        "'lost' counts identifiers whose last write neither arrived nor is still held "
        "anywhere at the cut (for the Celery systems, held = messages in the queue or "
        "unacknowledged); a run that was cut before it finished shows its remainder as "
        "'still queued or held'. A backlog run cut at its time box reports the drain time "
        "its observed pace would have needed (elapsed * identifiers / delivered).",
        "Utilisation: requests Braze counted (429s are not) during the drain, against what "
        "the limit allowed in that time (at least one window); a drain that starts and ends "
        "in partial fixed windows can exceed 1 by a little.",
        "v2 runs only where packing can help (the backlog: the same users in 4 groups). Its "
        "drain / ideal uses the v1 ideal (one request per 50 group + identifier pairs), so "
        "packing shows as a ratio below 1.",
    ]


def notes(workload: Workload, runs: dict[str, Observed]) -> list[str]:
    """What a reader needs to know about one workload's table."""
    cut = [o.label for o in runs.values() if o.figures.get("drained") is False]
    unfinished = [
        o.label for o in runs.values() if not o.workload.backlog and o.figures.get("left_in_system")
    ]
    out = []
    if workload.backlog:
        out.append(
            f"Everything was enqueued before the workers started; each run was watched until "
            f"nothing was left or for {workload.timebox:g} s after the workers were ready."
            + (f" Cut at that time box: {', '.join(cut)} (drain projected)." if cut else "")
        )
    else:
        out.append(
            f"Latency: from the moment the producer handed over an identifier's last change to "
            f"the first arrival of that state at the simulator after it; each run was watched "
            f"until nothing was left or for {workload.timebox:g} s after the last change."
            + (f" Still unfinished then: {', '.join(unfinished)}." if unfinished else "")
        )
    if workload.kill_at is not None:
        out.append(
            "The killed worker's whole process group got SIGKILL (as when a container dies); "
            "nothing restarted it."
        )
    return out


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write_plots(
    out: Path,
    observed: dict[str, dict[str, Observed]],
    workloads: list[Workload],
    limit: int,
    window: float,
) -> list[tuple[str, str]]:
    made: list[tuple[str, str]] = []
    drain_panels = []
    for workload in workloads:
        runs = observed.get(workload.name)
        if not runs:
            continue
        if workload.backlog:
            series = []
            for o in runs.values():
                end = o.cut
                times_ok = [t for t, s, _n in o.requests if s == 201]
                times_429 = [t for t, s, _n in o.requests if s == 429]
                times_other = [t for t, s, _n in o.requests if s not in (201, 429)]
                start = o.first_request
                series.append(
                    plots.RateSeries(
                        o.system,
                        o.label,
                        report.per_second(times_ok, start, end),
                        report.per_second(times_429, start, end),
                        report.per_second(times_other, start, end),
                    )
                )
            name = f"rps-{workload.name}.png"
            plots.requests_per_second(
                out / name,
                f"Requests per second against the limit — {workload.title}",
                series,
                limit / window,
            )
            made.append((f"requests per second, {workload.name}", name))
            drain = [
                plots.DrainSeries(
                    o.system,
                    o.label,
                    report.remaining_curve(workload.keys, o.done_times, o.first_request),
                    o.cut - o.first_request,
                )
                for o in runs.values()
            ]
            ideal = len(workload.writes) / 50 / limit * window
            panel = f"{workload.workers} workers"
            if workload.kill_at is not None:
                panel += f", one killed {workload.kill_at:g} s after they were ready"
            drain_panels.append((panel, drain, ideal, workload.keys))
        elif workload.name == "steady":
            name = "latency-steady.png"
            plots.latency_cdf(
                out / name,
                f"Latency, enqueue to arrival — {workload.title}",
                [(o.system, o.label, o.latencies, workload.keys) for o in runs.values()],
            )
            made.append(("latency, steady stream", name))
    if drain_panels:
        name = "backlog-drain.png"
        backlog = next(w for w in workloads if w.backlog)
        plots.backlog_draining(
            out / name,
            f"Backlog draining: {backlog.keys:,} unique changes",
            drain_panels,
        )
        made.append(("backlog draining", name))
    return made


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small workloads (~2 minutes)")
    parser.add_argument(
        "--workers",
        default=None,
        help="worker counts for the backlog, comma-separated; the first is used for the "
        "streams (default 2,4; 2 with --quick)",
    )
    parser.add_argument("--limit", type=int, default=100, help="requests per window")
    parser.add_argument("--window", type=float, default=2.0, help="window in seconds")
    parser.add_argument(
        "--only", default=None, help="comma-separated workload names (steady, backlog-2w, ...)"
    )
    parser.add_argument("--out", type=Path, default=None, help="where results go")
    parser.add_argument("--keep-logs", action="store_true", help="keep every process's log")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    counts = [int(n) for n in (args.workers or ("2" if args.quick else "2,4")).split(",")]
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs" if args.keep_logs else None
    workloads = build(sizes, counts)
    if args.only:
        wanted = set(args.only.split(","))
        workloads = [w for w in workloads if w.name in wanted]
    plan = [(w, s) for w in workloads for s in systems_for(w.allows_packing)]
    load_start = load_average()
    started = time.time()
    observed: dict[str, dict[str, Observed]] = {}
    for n, (workload, system) in enumerate(plan, start=1):
        say(f"[{n}/{len(plan)}] {workload.name}: {system.label} ({time.time() - started:.0f} s)")
        result = run_one(system, workload, args.limit, args.window, logs)
        observed.setdefault(workload.name, {})[system.name] = result
    elapsed = time.time() - started
    load_end = load_average()

    sections = [
        report.Section(
            name=w.name,
            title=w.title,
            runs={s: o.figures for s, o in observed[w.name].items()},
            labels={s: o.label for s, o in observed[w.name].items()},
            notes=notes(w, observed[w.name]),
        )
        for w in workloads
        if w.name in observed
    ]
    made = write_plots(out, observed, workloads, args.limit, args.window)
    backlog_ids = next((len(w.writes) for w in workloads if w.backlog), 0)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "wall_seconds": round(elapsed),
        "limit": args.limit,
        "window_seconds": args.window,
        "quick": args.quick,
        "cores": os.cpu_count(),
        "load_average": [load_start, load_end],
        "python": platform.python_version(),
        "celery": version("celery"),
        "kombu": version("kombu"),
        "celery_batches": version("celery-batches"),
    }
    preamble = [
        f"Measured {meta['date']} in one run of `python -m bench.compare"
        f"{' --quick' if args.quick else ''}` ({elapsed / 60:.1f} minutes) on {meta['cores']} "
        f"cores; Python {meta['python']}, Celery {meta['celery']}, kombu {meta['kombu']}, "
        f"celery-batches {meta['celery_batches']}. Every system, for every workload: a fresh "
        f"redis-server, a fresh simulator limiting to {args.limit} requests per "
        f"{args.window:g} s, the same changes from the same producer, real `celery worker` "
        "processes.",
        "",
        "Cells of the other systems carry their ratio to braze-subs v1 in parentheses "
        "(value ÷ braze-subs v1) where a ratio means something.",
    ]
    text = report.markdown(
        "braze-subs against the alternatives",
        preamble,
        sections,
        BASE,
        made,
        caveats(args.limit, args.window, backlog_ids, (load_start, load_end)),
    )
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(
        json.dumps(report.summary_json(sections, BASE, meta), indent=2) + "\n"
    )
    for section in sections:
        print(f"\n## {section.title}\n")
        print(report.markdown_table(section.runs, section.labels, BASE))
    print(
        f"\nwritten: {out / 'compare.md'}, {out / 'compare.json'}, "
        + ", ".join(str(out / path) for _alt, path in made)
    )


if __name__ == "__main__":
    main()
