"""What routing each import row to its workspace (issue 23) costs the import's validation.

    .venv/bin/python -m bench.routing_cost [--rows 40000] [--repeat 5] [--before REV]

Validates the same chunks of JSON Lines rows (external ids: the cheapest rows to validate,
so any added cost shows most) with `tasks.rows.check_chunk` as it is, with one workspace and
with two (rows spread over both groups of the file), and with `check_chunk` of revision
REV (default 038db7a, before workspaces), loaded from git into this process: before and
after in one run, the variants taking turns, the best of `--repeat` runs each (the machine
may be busy). Prints rows/s of each and the ratio to the one before.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.figures import publish
from core.routing import Routes
from tasks.rows import CHUNK_LINES, check_chunk, read_chunks

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path, rows: int) -> None:
    with open(path, "w") as handle:
        for n in range(rows):
            row = {
                "subscription_group_id": ("us-news", "eu-news")[n % 2],
                "subscription_state": "subscribed",
                "external_id": f"user-{n}",
            }
            handle.write(json.dumps(row) + "\n")


def rows_before(revision: str) -> Any:
    """`tasks/rows.py` of `revision` (from git, over this tree's other modules)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:tasks/rows.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    folder = Path(tempfile.mkdtemp())
    path = folder / "rows_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("rows_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rows_before"] = module
    spec.loader.exec_module(module)
    return module


def rates(
    variants: dict[str, tuple[Callable[[Any], Any], list[Any]]], rows: int, repeat: int
) -> dict[str, float]:
    """Rows/s of each variant, the best of `repeat` runs, the variants taking turns run by
    run so a change in the machine's load falls on all of them alike."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeat):
        for name, (check, chunks) in variants.items():
            started = time.perf_counter()
            for chunk in chunks:
                check(chunk)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: rows / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--before", default="038db7a")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        write_rows(path, args.rows)
        chunks = list(read_chunks(path, CHUNK_LINES))
        before = rows_before(args.before)
        old_chunks = list(before.read_chunks(path, CHUNK_LINES))
    two = Routes(("us", "eu"), {"us-news": "us", "eu-news": "eu"})
    one = Routes(("default",))
    found = rates(
        {
            "before": (before.check_chunk, old_chunks),
            "one workspace": (lambda c: check_chunk(c, routes=one), chunks),
            "two workspaces": (lambda c: check_chunk(c, routes=two), chunks),
        },
        args.rows,
        args.repeat,
    )
    figures: dict[str, Any] = {"rows": args.rows, "before_revision": args.before}
    for name, value in found.items():
        figures[f"{name} rows/s"] = round(value)
    for name in ("one workspace", "two workspaces"):
        figures[f"{name} / before"] = round(found[name] / found["before"], 3)
    publish(figures, "routing_cost.json")


if __name__ == "__main__":
    main()
