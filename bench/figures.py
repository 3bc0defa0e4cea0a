"""A benchmark's figures: printed one a line and saved as bench/results/<name>.json."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def publish(figures: Mapping[str, Any], filename: str, results: Path = RESULTS) -> None:
    """Print `figures` one a line, names aligned, and write them to `results/filename`."""
    width = max(map(len, figures), default=0)
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    results.mkdir(parents=True, exist_ok=True)
    (results / filename).write_text(json.dumps(figures, indent=2) + "\n")


def p50_p99(timings: Sequence[float]) -> tuple[float, float]:
    """The median and the 99th percentile (nearest rank below) of `timings`, rounded to
    hundredths: what the cost benchmarks report for N timed reads."""
    ordered = sorted(timings)
    return (
        round(statistics.median(ordered), 2),
        round(ordered[max(0, int(len(ordered) * 0.99) - 1)], 2),
    )
