"""Figures of one run, ratios, and the Markdown table: pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from simulator.ratelimit import sliding_window_max

Key = tuple[str, str, str]
Arrival = tuple[float, str]  # time, state
Figure = float | int | bool | None

# Statuses the simulator (like Braze) does not count in the window.
UNCOUNTED = (401, 429, 503)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def fixed_window_max(times: Sequence[float], window: float) -> int:
    """Most events in one window aligned to epoch multiples of `window` (Braze's count)."""
    counts: dict[int, int] = {}
    for t in times:
        index = math.floor(t / window)
        counts[index] = counts.get(index, 0) + 1
    return max(counts.values(), default=0)


def per_second(times: Sequence[float], start: float, end: float, width: float = 1.0) -> list[int]:
    """Events per bin of `width` seconds from `start` to `end`."""
    bins = [0] * max(1, math.ceil((end - start) / width))
    for t in times:
        index = math.floor((t - start) / width)
        if 0 <= index < len(bins):
            bins[index] += 1
    return bins


def satisfied_at(
    last_writes: Mapping[Key, tuple[str, float]], arrivals: Mapping[Key, Sequence[Arrival]]
) -> dict[Key, float]:
    """For each identifier whose last write arrived: when (the first arrival of that state
    after the last write was enqueued)."""
    done: dict[Key, float] = {}
    for key, (state, enqueued) in last_writes.items():
        times = [t for t, s in arrivals.get(key, ()) if s == state and t >= enqueued]
        if times:
            done[key] = min(times)
    return done


def final_state_errors(
    last_writes: Mapping[Key, tuple[str, float]], final: Mapping[Key, str]
) -> int:
    """Identifiers whose state at the end differs from the last write (never set included)."""
    return sum(1 for key, (state, _t) in last_writes.items() if final.get(key) != state)


def remaining_curve(
    total: int, done_times: Sequence[float], start: float
) -> list[tuple[float, int]]:
    """(seconds since start, identifiers still to arrive) after each arrival, from (0, total)."""
    curve = [(0.0, total)]
    for n, t in enumerate(sorted(done_times), start=1):
        curve.append((t - start, total - n))
    return curve


def ratio(value: Figure, base: Figure) -> float | None:
    """value / base; None where either is missing or not a number, or base is 0."""
    if isinstance(value, bool) or isinstance(base, bool) or value is None or base is None:
        return None
    if base == 0:
        return None
    return value / base


@dataclass(frozen=True)
class RunInput:
    """What a run observed, in plain values."""

    limit: int
    window: float
    backlog: bool
    changes: int
    last_writes: Mapping[Key, tuple[str, float]]  # last state written, and when
    arrivals: Mapping[Key, Sequence[Arrival]]
    final: Mapping[Key, str]
    requests: Sequence[tuple[float, int, int]]  # time, status, identifiers
    ready: float  # workers ready (a backlog: start of the clock if no request came)
    cut: float  # when the run stopped watching
    left_over: int  # changes the system still held (buffered, queued, unacknowledged)
    in_workers_at_kill: int | None = None  # changes handed to workers when one was killed
    # Keys of a stream written while a backlog drained: their latency is reported apart.
    stream_keys: frozenset[Key] = frozenset()


def figures(run: RunInput) -> dict[str, Figure]:
    """Every figure of one run."""
    times = [t for t, _s, _n in run.requests]
    counted = [t for t, s, _n in run.requests if s not in UNCOUNTED]
    accepted = [(t, n) for t, s, n in run.requests if s == 201]
    done = satisfied_at(run.last_writes, run.arrivals)
    keys = len(run.last_writes)
    out: dict[str, Figure] = {
        "changes": run.changes,
        "identifiers": keys,
        "requests": len(run.requests),
        "requests_201": len(accepted),
        "status_429": sum(1 for _t, s, _n in run.requests if s == 429),
        "other_errors": sum(1 for _t, s, _n in run.requests if s not in (201, 429)),
        "ids_per_request": (
            round(sum(n for _t, n in accepted) / len(accepted), 2) if accepted else None
        ),
        "sliding_window_max": sliding_window_max(counted, run.window),
        "fixed_window_max": fixed_window_max(counted, run.window),
        "delivered": len(done),
        "not_arrived": keys - len(done),
        "left_in_system": run.left_over,
        # Neither arrived nor still held anywhere (an approximation where the system
        # counts messages rather than identifiers: a flip stream has several per identifier).
        "lost": max(0, keys - len(done) - run.left_over),
        "final_state_errors": final_state_errors(run.last_writes, run.final),
    }
    if run.in_workers_at_kill is not None:
        out["in_workers_at_kill"] = run.in_workers_at_kill
    if run.stream_keys:
        latencies = [done[k] - run.last_writes[k][1] for k in run.stream_keys if k in done]
        for name, q in (("stream_p50", 50), ("stream_p99", 99)):
            value = percentile(latencies, q)
            out[name] = round(value, 3) if value is not None else None
    if run.backlog:
        first = min(times, default=run.ready)
        ideal = run.changes / 50 / run.limit * run.window
        drained = len(done) == keys
        span = (max(done.values()) - first) if drained and done else run.cut - first
        out["drained"] = drained
        out["drain_seconds"] = round(span, 2) if drained else None
        out["ideal_seconds"] = round(ideal, 2)
        out["drain_vs_ideal"] = round(span / ideal, 3) if drained else None
        # Not drained: the time the observed pace would have needed for everything.
        out["projected_drain_seconds"] = (
            round(span, 2) if drained else (round(span * keys / len(done), 1) if done else None)
        )
        out["projected_vs_ideal"] = (
            round(out["projected_drain_seconds"] / ideal, 2)  # type: ignore[operator]
            if out["projected_drain_seconds"] is not None
            else None
        )
        # Requests counted in the window, against what the limit allowed over the drain (at
        # least one window: a drain shorter than a window could still use all of one).
        windows = max(span, run.window) / run.window
        in_span = [t for t in counted if t <= first + span]
        out["utilisation"] = round(len(in_span) / (windows * run.limit), 3)
        out["first_request_seconds"] = round(first - run.ready, 2)
        out["ids_per_second"] = round(len(done) / span, 1) if span > 0 else None
    else:
        latencies = [done[key] - run.last_writes[key][1] for key in done]
        for name, q in (("latency_p50", 50), ("latency_p99", 99), ("latency_max", 100)):
            value = percentile(latencies, q)
            out[name] = round(value, 3) if value is not None else None
    return out


# (figure, label) in table order; labels carry the unit.
LABELS: tuple[tuple[str, str], ...] = (
    ("latency_p50", "latency p50, enqueue → Braze (s)"),
    ("latency_p99", "latency p99 (s)"),
    ("latency_max", "latency max (s)"),
    ("stream_p50", "stream during the backlog: latency p50 (s)"),
    ("stream_p99", "stream during the backlog: latency p99 (s)"),
    ("drained", "drained within the time box"),
    ("first_request_seconds", "first request, after all workers were ready (s)"),
    ("drain_seconds", "drain time (s)"),
    ("projected_drain_seconds", "drain time, projected if cut (s)"),
    ("ideal_seconds", "ideal drain (s)"),
    ("projected_vs_ideal", "drain / ideal (projected if cut)"),
    ("ids_per_second", "identifiers delivered per second"),
    ("utilisation", "utilisation of the limit"),
    ("changes", "changes enqueued"),
    ("identifiers", "distinct group + identifier pairs"),
    ("requests", "requests sent"),
    ("requests_201", "requests accepted (201)"),
    ("status_429", "429 answers"),
    ("other_errors", "other errors (4xx/5xx)"),
    ("ids_per_request", "identifiers per accepted request"),
    ("sliding_window_max", "sliding-window max (requests)"),
    ("fixed_window_max", "fixed-window max (requests)"),
    ("in_workers_at_kill", "changes handed to workers, unfinished, at the kill"),
    ("delivered", "identifiers whose last write arrived"),
    ("not_arrived", "last write not arrived by the cut"),
    ("left_in_system", "changes still queued or held at the cut"),
    ("lost", "lost: not arrived and no longer held"),
    ("final_state_errors", "final state ≠ last write"),
)
# Figures whose ratio to braze-subs says something (counts of errors are shown as is).
RATIO_FIGURES = {
    "stream_p50",
    "stream_p99",
    "latency_p50",
    "latency_p99",
    "latency_max",
    "projected_drain_seconds",
    "ids_per_second",
    "utilisation",
    "requests",
    "ids_per_request",
}


def ratios(runs: Mapping[str, Mapping[str, Figure]], base: str) -> dict[str, dict[str, float]]:
    """For every system but `base`: figure / the same figure of `base`, where defined."""
    base_figures = runs[base]
    table: dict[str, dict[str, float]] = {}
    for system, values in runs.items():
        if system == base:
            continue
        table[system] = {}
        for name in RATIO_FIGURES:
            r = ratio(values.get(name), base_figures.get(name))
            if r is not None:
                table[system][name] = round(r, 3)
    return table


def format_figure(value: Figure) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


TIMES = "\N{MULTIPLICATION SIGN}"


def format_ratio(value: float) -> str:
    if value >= 100:
        return f"{TIMES}{value:,.0f}"
    if value >= 10:
        return f"{TIMES}{value:.1f}"
    return f"{TIMES}{value:.2g}" if value < 1 else f"{TIMES}{value:.2f}"


def markdown_table(
    runs: Mapping[str, Mapping[str, Figure]],
    labels: Mapping[str, str],
    base: str,
) -> str:
    """Rows are figures, columns systems; other systems' cells carry the ratio to `base`."""
    systems = list(runs)
    shown = [(name, text) for name, text in LABELS if any(name in runs[s] for s in systems)]
    rel = ratios(runs, base)
    lines = [
        "| figure | " + " | ".join(labels.get(s, s) for s in systems) + " |",
        "|---|" + "---:|" * len(systems),
    ]
    for name, text in shown:
        cells = []
        for system in systems:
            cell = format_figure(runs[system].get(name))
            r = rel.get(system, {}).get(name)
            if r is not None:
                cell += f" ({format_ratio(r)})"
            cells.append(cell)
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    runs: Mapping[str, Mapping[str, Figure]]  # system name -> figures
    labels: Mapping[str, str]  # system name -> column heading
    notes: Sequence[str] = ()


def markdown(
    title: str,
    preamble: Sequence[str],
    sections: Sequence[Section],
    base: str,
    plots: Sequence[tuple[str, str]],
    caveats: Sequence[str],
) -> str:
    parts = [f"# {title}", "", *preamble, ""]
    for section in sections:
        parts += [f"## {section.title}", "", markdown_table(section.runs, section.labels, base), ""]
        for note in section.notes:
            parts += [note, ""]
    if plots:
        parts += ["## Plots", ""]
        for alt, path in plots:
            parts += [f"![{alt}]({path})", ""]
    if caveats:
        parts += ["## Caveats", ""]
        parts += [f"- {caveat}" for caveat in caveats]
        parts.append("")
    return "\n".join(parts)


def summary_json(sections: Sequence[Section], base: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "meta": dict(meta),
        "base": base,
        "workloads": [
            {
                "name": s.name,
                "title": s.title,
                "figures": {k: dict(v) for k, v in s.runs.items()},
                "ratios_to_base": ratios(s.runs, base),
            }
            for s in sections
        ],
    }
