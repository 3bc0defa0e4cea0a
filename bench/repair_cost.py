"""What weighing rows against the changes accepted since costs `verify` and `verify --repair`
(issue 21 item 1), in process against a private redis-server.

    .venv/bin/python -m bench.repair_cost [--rows 20000] [--events 20]

Every row of the file differs from what a stub Braze reader answers (no HTTP: the read
budget and Braze's latency are `bench/verify_speed.py`'s subject), and every identifier
has a watermark and a history of `--events` events: half of them last accepted the row's
own state (repaired), half the other state (superseded). Three runs over the same file:
`check()` with the watermark read replaced by "nothing accepted" (the comparison and the
spool alone, as before the weighing existed), `check()` (plus `latest_accepted.lua`, one
call per 100 identifiers), and `check(repair=True)` (plus one enqueue call per repaired
row). Prints the time per 1,000 rows of each; at Braze's read budget `verify` reads about
6,800 identifiers a second (bench/results/verify.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from redis import Redis

from admin.verify import Verification
from bench.figures import publish
from delivery.braze_reads import ReadState
from devtools.processes import local_redis
from stores.buffer import Buffer
from stores.clock import server_time_ms
from stores.keys import FIELD_SEPARATOR, Keys

GROUP = "news"


class StubReader:
    """Braze holds the other state of every row ("unsubscribed" for all: rows say
    "subscribed" for even n, "unsubscribed" for odd n, so odd rows match)."""

    calls = 0

    def __init__(self, states: dict[str, ReadState]) -> None:
        self.states = states

    def statuses(self, group_id: str, kind: str, values: list[str]) -> dict[str, ReadState]:
        self.calls += 1
        return {value: self.states[value] for value in values}


def seed(client: Redis, keys: Keys, rows: int, events: int, now_ms: int) -> None:
    pipe = client.pipeline(transaction=False)
    for n in range(rows):
        value = f"user-{n}"
        row_state = "unsubscribed"
        accepted = row_state if n % 2 == 0 else "subscribed"  # even: repaired; odd: superseded
        mark = now_ms - 1000
        history = keys.history("external_id", value)
        for e in range(events - 1):
            payload = {"e": "posted", "g": GROUP, "b": f"batch-{e}", "h": 201, "l": 90}
            pipe.rpush(history, f"{mark - 10_000 + e}{FIELD_SEPARATOR}{json.dumps(payload)}")
        enqueued = {"e": "enqueued", "g": GROUP, "s": accepted, "q": n}
        pipe.rpush(history, f"{mark}{FIELD_SEPARATOR}{json.dumps(enqueued)}")
        pipe.hset(keys.subject("external_id", value), f"w{FIELD_SEPARATOR}{GROUP}", mark)
        if n % 1000 == 999:
            pipe.execute()
    pipe.execute()


class WithoutWeighing(Verification):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history.latest_accepted = lambda _g, _k, values: [(None, None)] * len(values)  # type: ignore[method-assign]


def run(
    kind: type[Verification],
    reader: StubReader,
    client: Redis,
    keys: Keys,
    path: Path,
    *,
    repair: bool,
) -> tuple[float, Verification]:
    buffer = Buffer(client, keys)
    with kind(reader, client, keys, buffer=buffer) as verification:  # type: ignore[arg-type]
        verification.load(path)
        started = time.perf_counter()
        verification.check(repair=repair)
        return time.perf_counter() - started, verification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    with TemporaryDirectory(prefix="braze-subs-repair-") as tmp, local_redis(Path(tmp)) as url:
        client = Redis.from_url(url)
        keys = Keys("bench")
        path = Path(tmp) / "snapshot.jsonl"
        with open(path, "w") as handle:
            for n in range(args.rows):
                row = {"subscription_group_id": GROUP, "subscription_state": "unsubscribed",
                       "external_id": f"user-{n}"}  # fmt: skip
                handle.write(json.dumps(row) + "\n")
        os.utime(path, (time.time() - 3600, time.time() - 3600))  # written an hour ago
        seed(client, keys, args.rows, args.events, server_time_ms(client))
        reader = StubReader({f"user-{n}": ReadState.SUBSCRIBED for n in range(args.rows)})
        per_k = 1000 / args.rows
        plain, _ = run(WithoutWeighing, reader, client, keys, path, repair=False)
        weighed, checked = run(Verification, reader, client, keys, path, repair=False)
        repaired, done = run(Verification, reader, client, keys, path, repair=True)
        figures = {
            "rows": args.rows,
            "history_events_per_identifier": args.events,
            "compare_only_ms_per_1000_rows": round(plain * 1000 * per_k, 1),
            "with_weighing_ms_per_1000_rows": round(weighed * 1000 * per_k, 1),
            "with_repair_ms_per_1000_rows": round(repaired * 1000 * per_k, 1),
            "superseded": checked.report.totals.superseded,
            "repaired": done.report.repaired,
        }
    publish(figures, "repair-cost.json")


if __name__ == "__main__":
    main()
