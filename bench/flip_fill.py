"""Fill under flips (issue 26): identifiers per request when waves flip the same identifiers
at Braze's full budget, this tree (a batch that loses members at its claim is topped up)
and a base commit side by side, in one run.

    .venv/bin/python -m bench.flip_fill                 # base: main before the top-up
    .venv/bin/python -m bench.flip_fill --base main     # today's main beside this tree
    .venv/bin/python -m bench.flip_fill --changes 6000 --skip-base   # quicker

For each tree (the base is checked out into a temporary git worktree and run from there,
as bench/lanes.py does): a private redis-server, the simulator at Braze's limit (5,000
requests a minute), one worker and beat at their default settings (real processes, as in
the Procfile); CHANGES changes of the demo's kind (`devtools.demo.sample_changes`: emails,
phones and external ids in 3 groups, a third of the population flipping) fed through
`tasks.producer.enqueue_changes` in WAVES waves, GAP seconds apart, in chunks of 500 (the
demo's feed). Reports, once the pipeline drained: requests accepted, identifiers posted,
the fill (identifiers per request / 50), the floor of that fill (the fewest requests the
identifiers posted need: per group, state and kind, ceil(n / 50)), identifiers cut into
batches, superseded before their post, taken in by a top-up, identifiers not in their
last-written state, order violations (the order oracle, `simulator.order_check`) and
429s; and where the requests beyond the floor went: the short requests, the requests
beyond the floor per key, and why each short batch was short (`short_batches`, from the
identifiers' histories). FLIP_FILL_DUMP=PREFIX also writes each request's key and size,
and each short batch's story (`batch_stories`: its key, cut, members lost at its claim and
taken in later, post).
Writes bench/results/flip-fill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from bench.figures import publish
from bench.lanes import spawn, stop
from bench.trees import add_base_tree, remove_base_tree
from devtools.demo import EMAIL_GROUPS, SMS_GROUPS, sample_changes
from devtools.processes import local_redis
from simulator import SimulatorConfig, SimulatorServer
from simulator.order_check import (
    applied_from_document,
    check_order,
    enqueued_from_rows,
    requests_by_key,
)
from stores.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
BASE = "f032e93"  # main just before the top-up landed (issue 26)
BATCH = 50  # BATCH_MAX_IDENTIFIERS' default

# The feed, run in the tree under test: each wave's rows through the producer API in
# chunks of 500, GAP seconds between waves (as `braze-subs demo` feeds).
FEEDER = """
import json, sys, time
from tasks.producer import enqueue_changes
waves, gap = json.load(open(sys.argv[1])), float(sys.argv[2])
for number, rows in enumerate(waves):
    for start in range(0, len(rows), 500):
        enqueue_changes(rows[start : start + 500])
    if number < len(waves) - 1:
        time.sleep(gap)
"""


def waves_of(changes: int, waves: int, seed: int) -> list[list[dict[str, Any]]]:
    rows = sample_changes(changes, random.Random(seed))
    size = -(-len(rows) // waves)
    return [rows[start : start + size] for start in range(0, len(rows), size)]


SHORT_KINDS = (
    "cut_short",  # a partial remainder at its cut, lost nothing
    "cut_short_lost",  # a partial remainder that also lost members at its claim
    "lost_none_taken",  # cut full, lost members, the top-up found nothing to take
    "lost_partly_taken",  # cut full, lost members, the top-up took fewer than were free
)


def batch_stories(client: Redis, keys: Keys, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each short posted batch's story, from the identifiers' histories (FLIP_FILL_DUMP):
    its key, lane, when it was cut and with how many, how many it lost at its claim and
    took in later (a top-up or an absorb), and when it was posted with how many."""
    kinds = {}
    for row in rows:
        kind = next(k for k in ("email", "phone", "external_id") if k in row)
        kinds[keys.history(kind, row[kind])] = kind
    batches: dict[str, dict[str, Any]] = {}
    for key, kind in kinds.items():
        states: dict[Any, str] = {}
        for raw in client.lrange(key, 0, -1):
            at, _, body = raw.decode().partition("\x1f")
            event = json.loads(body)
            if event.get("e") == "enqueued":
                states[event.get("q")] = event.get("s")
            if event.get("e") not in ("batched", "superseded", "posted") or not event.get("b"):
                continue
            slot = batches.setdefault(event["b"], {"events": []})
            slot["events"].append((int(float(at)), event["e"]))
            if event["e"] == "batched":
                slot["key"] = f"{event['g']}/{states.get(event.get('q'))}/{kind}"
    stories = []
    start = min((t for b in batches.values() for t, _ in b["events"]), default=0)
    for batch_id, slot in batches.items():
        events = slot["events"]
        posted = [t for t, e in events if e == "posted"]
        if not posted or len(posted) >= BATCH:
            continue
        batched = sorted(t for t, e in events if e == "batched")
        cut = sum(1 for t in batched if t == batched[0])
        lost = [t for t, e in events if e == "superseded"]
        stories.append(
            {
                "key": slot.get("key"),
                "live": batch_id.startswith("live-"),
                "cut_at": batched[0] - start,
                "cut": cut,
                "lost": len(lost),
                "lost_at": max(lost) - start if lost else None,
                "taken_later": [t - start for t in batched[cut:]],
                "posted_at": posted[0] - start,
                "posted": len(posted),
            }
        )
    return sorted(stories, key=lambda s: s["posted_at"])


def short_batches(client: Redis) -> dict[str, Any]:
    """Why each posted batch was short, from the identifiers' histories (`batched` at the
    cut and at a top-up, `superseded` in the batch, `posted`): per kind, how many batches
    and how many requests' worth of empty places (sum of (50 - posted) / 50)."""
    per_batch: dict[str, dict[str, list[int]]] = {}
    for key in client.scan_iter(match="*history:*", count=1000):
        for raw in client.lrange(key, 0, -1):
            at, _, body = raw.decode().partition("\x1f")
            event = json.loads(body)
            if event.get("e") in ("batched", "superseded", "posted") and event.get("b"):
                slot = per_batch.setdefault(event["b"], {})
                slot.setdefault(event["e"], []).append(int(float(at)))
    counts: Counter[str] = Counter()
    empty: Counter[str] = Counter()
    for events in per_batch.values():
        posted = len(events.get("posted", []))
        if not posted or posted >= BATCH:
            continue
        batched = events.get("batched", [])
        cut = sum(1 for t in batched if t == min(batched))
        lost = len(events.get("superseded", []))
        if cut < BATCH:
            kind = "cut_short_lost" if lost else "cut_short"
        else:
            kind = "lost_partly_taken" if len(batched) > cut else "lost_none_taken"
        counts[kind] += 1
        empty[kind] += BATCH - posted
    return {
        **{f"short.{kind}": counts[kind] for kind in SHORT_KINDS},
        **{f"empty_requests.{kind}": round(empty[kind] / BATCH, 1) for kind in SHORT_KINDS},
    }


def run_tree(tree: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    waves = waves_of(args.changes, args.waves, args.seed)
    rows = [row for wave in waves for row in wave]
    feed = workdir / "waves.json"
    feed.write_text(json.dumps(waves))
    with ExitStack() as stack:
        redis_url = stack.enter_context(local_redis(workdir))
        sim = SimulatorServer(
            SimulatorConfig(
                api_keys={"bench-key"},
                email_groups=set(EMAIL_GROUPS),
                sms_groups=set(SMS_GROUPS),
                rate_limit=args.limit,
                window_seconds=args.window,
            )
        )
        sim.start()
        stack.callback(sim.stop)
        client = Redis.from_url(redis_url)
        keys = Keys("braze-subs")
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BRAZE_REST_ENDPOINT": sim.url,
            "BRAZE_API_KEY": "bench-key",
            "BRAZE_RATE_LIMIT": str(args.limit),
            "BRAZE_RATE_LIMIT_WINDOW_SECONDS": str(args.window),
            "LOG_LEVEL": "WARNING",
            "HEALTH_DIR": str(workdir / "health"),
        }
        celery = ["-m", "celery", "-A", "worker.app"]
        name = ["--hostname", "w0@%h", "--without-gossip", "--without-mingle"]
        worker = spawn(tree, [*celery, "worker", *name], env, workdir / "w0.log")
        stack.callback(stop, worker)
        beat = spawn(tree, [*celery, "beat"], env, workdir / "beat.log")
        stack.callback(stop, beat)
        deadline = time.time() + 60
        while not client.zcard(keys.workers):  # the worker's first heartbeat
            if time.time() > deadline:
                raise SystemExit(f"{tree}: no worker heartbeat within 60 s")
            time.sleep(0.2)

        fed = subprocess.run(
            [sys.executable, "-c", FEEDER, str(feed), str(args.gap)],
            cwd=tree,
            env={**env, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            check=False,
        )
        if fed.returncode != 0:
            raise SystemExit(f"the feed failed in {tree}: {fed.stderr[-2000:]}")
        deadline = time.time() + args.timeout
        while client.hlen(keys.pending) or client.hlen(keys.inflight):
            if time.time() > deadline:
                raise SystemExit(f"{tree}: did not drain within {args.timeout} s")
            time.sleep(0.2)
        stats = httpx.get(f"{sim.url}/_sim/stats", timeout=60).json()
        document = httpx.get(f"{sim.url}/_sim/applied", timeout=60).json()
        state = httpx.get(f"{sim.url}/_sim/state", params={"log": "0"}, timeout=60).json()
        counted = {k.decode(): int(v) for k, v in client.hgetall(keys.stats).items()}
        short = short_batches(client)
        stories = batch_stories(client, keys, rows) if os.environ.get("FLIP_FILL_DUMP") else []

    accepted = [r for r in stats["requests"] if r["status"] == 201]
    posted = sum(r["identifiers"] for r in accepted)
    applied = applied_from_document(document)
    # The fewest requests the identifiers posted need: per (group, state, kind), ceil(n/50);
    # and where the requests beyond it went (keys sent in more requests than they need).
    by_key = requests_by_key(applied, BATCH)
    floor_requests = sum(need for _sent, need, _n in by_key.values())
    extra = {"/".join(key): counts for key, counts in by_key.items() if counts[0] > counts[1]}
    sent: dict[float, Counter[tuple[str, str, str]]] = {}
    for (group, kind, _value), states in applied.items():
        for entry in states:
            sent.setdefault(entry["t"], Counter())[(group, entry["state"], kind)] += 1
    if os.environ.get("FLIP_FILL_DUMP"):
        dump = [
            {"t": t - min(sent), "keys": {"/".join(k): n for k, n in c.items()}}
            for t, c in sorted(sent.items())
        ]
        Path(os.environ["FLIP_FILL_DUMP"] + f"-{tree.name}.json").write_text(
            json.dumps({"requests": dump, "extra": extra, "short": stories}, indent=1)
        )
    expected = {}
    for row in rows:
        kind = next(k for k in ("email", "phone", "external_id") if k in row)
        expected[(row["subscription_group_id"], kind, row[kind])] = row["subscription_state"]
    received = {(s["group"], s["kind"], s["value"]): s["state"] for s in state["subscriptions"]}
    first, last = min(r["t"] for r in accepted), max(r["t"] for r in accepted)
    return {
        "requests": len(accepted),
        "identifiers_posted": posted,
        "identifiers_per_request": round(posted / len(accepted), 1),
        "fill": round(posted / len(accepted) / BATCH, 3),
        "floor_requests": floor_requests,
        "floor_fill": round(posted / floor_requests / BATCH, 3),
        "short_requests": sum(1 for r in accepted if r["identifiers"] < BATCH),
        "requests_beyond_floor_per_key": sum(sent_n - need for sent_n, need, _ in extra.values()),
        "cut_into_batches": counted.get("batched", 0),
        "superseded_before_post": max(0, counted.get("batched", 0) - posted),
        "topped_up": counted.get("topped_up", 0),
        "wrong_final_states": sum(1 for k, v in expected.items() if received.get(k) != v),
        "order_violations": len(check_order(enqueued_from_rows(rows), applied)),
        **short,
        "status_429": stats["rate_limited_429"],
        "posting_seconds": round(last - first, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the commit to compare with")
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between waves")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--skip-base", action="store_true")
    args = parser.parse_args()

    figures: dict[str, Any] = {
        "changes": args.changes,
        "waves": f"{args.waves}, {args.gap:g} s apart",
        "limit": f"{args.limit} per {args.window:g} s",
    }
    with tempfile.TemporaryDirectory(prefix="braze-subs-flip-fill-") as tmp:
        work = Path(tmp)
        runs = [("top_up", ROOT)]
        base_tree = work / "base"
        if not args.skip_base:
            add_base_tree(base_tree, args.base)
            runs.append(("base", base_tree))
        try:
            for name, tree in runs:
                (work / f"{name}-run").mkdir()
                for figure, value in run_tree(tree, args, work / f"{name}-run").items():
                    figures[f"{name}.{figure}"] = value
                print(name, {k: v for k, v in figures.items() if k.startswith(name)}, flush=True)
        finally:
            if not args.skip_base:
                remove_base_tree(base_tree)
    figures["base"] = args.base
    publish(figures, "flip-fill.json")


if __name__ == "__main__":
    main()
