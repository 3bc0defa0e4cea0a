"""PNG plots of a comparison (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {
    "braze-subs-v1": "#1f77b4",
    "braze-subs-v2": "#17becf",
    "naive": "#9467bd",
    "celery-batches": "#ff7f0e",
}


@dataclass(frozen=True)
class RateSeries:
    name: str
    label: str
    accepted: Sequence[int]  # 201 answers per second
    throttled: Sequence[int]  # 429 answers per second
    other: Sequence[int]  # other answers per second


def requests_per_second(
    path: Path, title: str, series: Sequence[RateSeries], limit_per_second: float
) -> None:
    """One panel per system: answers per second, stacked by kind, against the limit."""
    fig, axes = plt.subplots(
        len(series), 1, figsize=(10, 2.1 * len(series) + 0.8), sharex=True, squeeze=False
    )
    top = max(
        [limit_per_second * 1.5]
        + [
            max(a, default=0) + max(t, default=0)
            for a, t in ((s.accepted, s.throttled) for s in series)
        ]
    )
    for ax, s in zip(axes[:, 0], series, strict=True):
        x = list(range(len(s.accepted)))
        ax.bar(
            x, s.accepted, width=1.0, align="edge", color=COLOURS.get(s.name, "grey"), label="201"
        )
        ax.bar(
            x, s.throttled, width=1.0, align="edge", bottom=s.accepted, color="#b00000", label="429"
        )
        stacked = [a + t for a, t in zip(s.accepted, s.throttled, strict=True)]
        ax.bar(x, s.other, width=1.0, align="edge", bottom=stacked, color="#7f7f7f", label="other")
        ax.axhline(
            limit_per_second,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"limit ({limit_per_second:g}/s)",
        )
        ax.set_ylim(0, top)
        ax.set_ylabel("requests/s")
        ax.set_title(s.label, loc="left", fontsize=10)
        ax.legend(loc="upper right", fontsize=8, ncol=4)
    axes[-1, 0].set_xlabel("seconds since the first request")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class DrainSeries:
    name: str
    label: str
    curve: Sequence[tuple[float, int]]  # (seconds since first request, remaining)
    cut: float  # seconds since the first request when the run stopped watching


def backlog_draining(
    path: Path,
    title: str,
    panels: Sequence[tuple[str, Sequence[DrainSeries], float, int]],
) -> None:
    """Remaining identifiers over time, a line per system; a panel per worker count.
    `panels`: (panel title, series, ideal drain seconds, identifiers)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (panel_title, series, ideal, total) in zip(axes[0], panels, strict=True):
        for s in series:
            xs = [t for t, _r in s.curve] + [s.cut]
            ys = [r for _t, r in s.curve] + [s.curve[-1][1]]
            ax.step(xs, ys, where="post", color=COLOURS.get(s.name, "grey"), label=s.label)
        ax.plot([0, ideal], [total, 0], color="black", linestyle=":", label=f"ideal ({ideal:g} s)")
        ax.set_xlabel("seconds since the first request")
        ax.set_ylabel("identifiers still to arrive")
        ax.set_ylim(0, total * 1.05)
        ax.set_title(panel_title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdf(
    path: Path, title: str, series: Sequence[tuple[str, str, Sequence[float], int]]
) -> None:
    """Share of all changes arrived within x seconds of being enqueued, a line per system
    (changes that never arrived keep a line below 1)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, label, values, total in series:
        ordered = sorted(values)
        if not ordered:
            continue
        ys = [(n + 1) / total for n in range(len(ordered))]
        ax.step(ordered, ys, where="post", color=COLOURS.get(name, "grey"), label=label)
    ax.set_xscale("log")
    ax.set_xlabel("seconds from enqueue to arrival at the simulator (log)")
    ax.set_ylabel("share of changes")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
