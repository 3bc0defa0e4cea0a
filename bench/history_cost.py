"""What event time and the consent history cost: Redis time per enqueued change, and memory
per identifier while a change waits and after it has been delivered.

    .venv/bin/python -m bench.history_cost --identifiers 100000

Fills a private redis-server through the real code paths (Buffer.enqueue, take, claim,
delivered) with one change per identifier (an email, a source label, an occurred_at), then:
- Redis CPU per change of the enqueue script (INFO commandstats), against the enqueue
  script as it was before watermarks and history (`bench/baseline_enqueue.lua`, same
  changes, same chunks), and the wall time of both;
- memory per identifier (INFO used_memory) while pending, and what outlives delivery: the
  subject key (watermarks) and the history key (MEMORY USAGE, averaged over a sample);
- the memory of one more history event (a second and third change per identifier).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory

from redis import Redis

from bench.figures import publish
from core.changes import Change, IdentifierKind, SubscriptionState
from core.planning import plan_batches
from devtools.processes import local_redis
from stores.batch_records import BatchStore
from stores.buffer import ENQUEUE_CHUNK, Buffer
from stores.clock import server_time_ms
from stores.keys import Keys, buffer_field

BASELINE = Path(__file__).resolve().parent / "baseline_enqueue.lua"
SOURCE = "checkout-form"


def changes(count: int, occurred_ms: int, state: SubscriptionState) -> list[Change]:
    return [
        Change(
            f"group-{n % 4}",
            state,
            IdentifierKind.EMAIL,
            f"user{n}@example{n % 50}.com",
            occurred_ms=occurred_ms,
            source=SOURCE,
        )
        for n in range(count)
    ]


def script_usec(client: Redis) -> float:
    stats = client.info("commandstats")
    return sum(float(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in ("eval", "evalsha"))


def timed_enqueue(buffer: Buffer, items: list[Change]) -> tuple[float, float]:
    """(Redis µs per change, wall µs per change) of enqueuing `items`."""
    client = buffer.client
    client.config_resetstat()
    started = time.perf_counter()
    buffer.enqueue(items)
    wall = time.perf_counter() - started
    return script_usec(client) / len(items), wall * 1e6 / len(items)


def baseline_enqueue(client: Redis, keys: Keys, items: list[Change]) -> tuple[float, float]:
    """The same changes through the pre-watermark script (4 arguments a change)."""
    prelude = (Path(__file__).resolve().parent.parent / "stores/lua/_prelude.lua").read_text()
    script = client.register_script(prelude + "\n" + BASELINE.read_text())
    names = [keys.seq, keys.pending, keys.due, keys.inflight, keys.stats, keys.dead_letter_fields]
    client.config_resetstat()
    started = time.perf_counter()
    for start in range(0, len(items), ENQUEUE_CHUNK):
        args: list[bytes | str] = []
        for c in items[start : start + ENQUEUE_CHUNK]:
            args += (buffer_field(c.group_id, c.kind, c.value), c.state.value, b"0", b"0")
        script(keys=names, args=args)
    wall = time.perf_counter() - started
    return script_usec(client) / len(items), wall * 1e6 / len(items)


def deliver_all(buffer: Buffer, store: BatchStore) -> None:
    while True:
        now = server_time_ms(buffer.client)
        due, _ = buffer.read_due(now, 20_000)
        if not due:
            return
        plan = plan_batches(due, now_ms=now, max_identifiers=50)
        for pack in buffer.take([[batch] for batch in plan], 600_000):
            for batch_id, _size in pack:
                store.claim(batch_id, "bench", 60_000)
                store.delivered(batch_id, "bench", http_status=201, latency_ms=40.0)


def sampled_usage(client: Redis, names: list[str]) -> float:
    return statistics.mean(int(client.memory_usage(name, samples=0) or 0) for name in names)


def run(args: argparse.Namespace) -> dict[str, float | int]:
    count = args.identifiers
    keys = Keys("braze-subs")
    figures: dict[str, float | int] = {"identifiers": count}
    with ExitStack() as stack:
        workdir = stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-"))
        url = stack.enter_context(local_redis(Path(workdir)))

        client = Redis.from_url(url)
        occurred = server_time_ms(client) - 60_000
        first = changes(count, occurred, SubscriptionState.SUBSCRIBED)

        base_redis, base_wall = baseline_enqueue(client, keys, first)
        baseline_memory = client.info("memory")["used_memory"]
        client.flushall()
        empty = client.info("memory")["used_memory"]

        buffer = Buffer(client, keys)
        ours_redis, ours_wall = timed_enqueue(buffer, first)
        pending_memory = client.info("memory")["used_memory"]
        figures |= {
            "baseline_redis_us_per_change": round(base_redis, 2),
            "redis_us_per_change": round(ours_redis, 2),
            "baseline_wall_us_per_change": round(base_wall, 2),
            "wall_us_per_change": round(ours_wall, 2),
            "pending_bytes_per_identifier_baseline": round((baseline_memory - empty) / count),
            "pending_bytes_per_identifier": round((pending_memory - empty) / count),
        }

        deliver_all(buffer, BatchStore(client, keys))
        after = client.info("memory")["used_memory"]
        sample = [c.value for c in first[: min(count, 2000)]]
        subjects = [keys.subject("email", v) for v in sample]
        histories = [keys.history("email", v) for v in sample]
        events = statistics.mean(client.llen(name) for name in histories)
        figures |= {
            "delivered_bytes_per_identifier": round((after - empty) / count),
            "subject_key_bytes": round(sampled_usage(client, subjects)),
            "history_key_bytes": round(sampled_usage(client, histories)),
            "history_events_per_identifier": round(events, 1),
        }

        # Two more changes per identifier: what one more event costs.
        before = client.info("memory")["used_memory"]
        buffer.enqueue(changes(count, occurred + 1, SubscriptionState.UNSUBSCRIBED))
        buffer.enqueue(changes(count, occurred, SubscriptionState.SUBSCRIBED))  # stale
        deliver_all(buffer, BatchStore(client, keys))
        grown = client.info("memory")["used_memory"]
        more = statistics.mean(client.llen(name) for name in histories) - events
        figures |= {
            "bytes_per_history_event": round((grown - before) / count / more),
            "stale_dropped": int(client.hget(keys.stats, "stale") or 0),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identifiers", type=int, default=100_000)
    publish(run(parser.parse_args()), "history-cost.json")


if __name__ == "__main__":
    main()
