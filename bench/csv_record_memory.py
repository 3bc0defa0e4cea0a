"""Peak memory while validating a CSV file with a quote left open (issue 21 item 7).

    .venv/bin/python -m bench.csv_record_memory [--megabytes 120] [--before DIR]

Writes two CSV files of the same size: ordinary rows, and one whose second record opens a
quote that never closes, followed by short lines (`x","y`: each line closes and reopens a
field, so the parser's field size limit never trips and the record grows by a field a
line). Each is read the two ways the product reads files — `import`'s chunks
(`checked_chunks`, in process) and `verify`'s rows (`iter_changes`) — each in a fresh
process, and the process's peak resident memory (ru_maxrss) is printed. `--before DIR`
runs the same in another checkout (e.g. `git archive main | tar -x -C DIR`) with this
Python, so the figures before and after a change come from one run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.figures import publish

HEADER = "subscription_group_id,subscription_state,external_id\n"

MEASURE = """
import resource, sys, time
from pathlib import Path
path, how = Path(sys.argv[1]), sys.argv[2]
started = time.perf_counter()
if how == "import":
    from tasks.bulk_import import checked_chunks
    bad = sum(len(result.errors) for result in checked_chunks(path, jobs=1))
else:
    from tasks.rows import RowError, iter_changes
    bad = sum(isinstance(item, RowError) for _, item in iter_changes(path))
elapsed = time.perf_counter() - started
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, bad, round(elapsed, 1))
"""


def write_files(folder: Path, megabytes: int) -> dict[str, Path]:
    size = megabytes << 20
    ordinary = folder / "ordinary.csv"
    with open(ordinary, "w") as handle:
        handle.write(HEADER)
        written, n = 0, 0
        while written < size:
            block = "".join(f"news,subscribed,user-{n + i:09d}\n" for i in range(10_000))
            handle.write(block)
            written += len(block)
            n += 10_000
    open_quote = folder / "open-quote.csv"
    with open(open_quote, "w") as handle:
        handle.write(HEADER + "news,subscribed,user-1\n" + 'news,subscribed,"user-2\n')
        block = 'x","y\n' * 100_000
        for _ in range(size // len(block)):
            handle.write(block)
    return {"ordinary": ordinary, "open quote": open_quote}


def measure(code: Path, path: Path, how: str) -> tuple[int, int, float]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), how],
        cwd=code,
        capture_output=True,
        text=True,
        check=True,
    )
    peak, bad, seconds = done.stdout.split()
    return int(peak), int(bad), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=120)
    parser.add_argument("--before", type=Path, help="another checkout to measure too")
    args = parser.parse_args()
    codes = {"after": Path(__file__).resolve().parent.parent}
    if args.before is not None:
        codes = {"before": args.before.resolve(), **codes}
    figures: dict[str, object] = {"file_megabytes": args.megabytes}
    with TemporaryDirectory(prefix="csv-record-memory-") as folder:
        files = write_files(Path(folder), args.megabytes)
        for label, code in codes.items():
            for name, path in files.items():
                for how in ("import", "verify"):
                    started = time.perf_counter()
                    peak, bad, seconds = measure(code, path, how)
                    key = f"{label}: {how} {name}"
                    figures[f"{key}: peak MiB"] = peak
                    figures[f"{key}: bad rows"] = bad
                    figures[f"{key}: seconds"] = seconds
                    print(
                        f"  {key}: {peak} MiB, {bad} bad rows, "
                        f"{time.perf_counter() - started:.1f} s",
                        file=sys.stderr,
                    )
    publish(figures, "csv-record-memory.json")


if __name__ == "__main__":
    main()
