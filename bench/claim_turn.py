"""The claim, the turn and the fence of a v1 post, in three calls, two or one (issue 26),
side by side.

    .venv/bin/python -m bench.claim_turn --identifiers 20000 --rounds 5

bench.post_cpu compares whole posts of two trees, whose other steps (the HTTP exchange,
the fence, the finish) swing by a tenth from round to round on a shared machine; this
measures only the steps that changed, every way in one process on one redis-server, the
ways alternating in blocks of --block batches so the machine's load falls on all alike:
`BatchStore.claim` then `RateLimiter.acquire` ("two calls", as the seventh step's base and
a v2 request still do) against `BatchStore.claim(turn=...)` ("one call": claim_batch.lua
takes the turn); and, the eighth step, that claim then `BatchStore.fence` ("claim+turn,
fence": a v1 post before it) against `BatchStore.claim(turn=..., fence_ms=...)`
("claim+turn+fence": the claim fences too). A backlog of --identifiers (bench.drain's mix)
is cut by the coalescer's tick into batches, each claimed once, at an unlimited budget.
Reports, medians over the rounds, the claiming thread's CPU (`time.thread_time`) a batch
and redis-server's (INFO cpu, the whole server) a batch. Writes
bench/results/claim-turn.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import bench.drain as drain
from bench.figures import publish
from config.settings import load_settings
from core.planning import batch_lane
from delivery.services import Services
from devtools.processes import local_redis


def server_cpu(services: Services) -> float:
    cpu = services.redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def one_round(identifiers: int, block: int, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir, local_redis(Path(workdir)) as url:
        services = Services(
            load_settings(
                redis_url=url,
                braze_rest_endpoint="http://127.0.0.1:9",
                braze_api_key="bench-key",
                braze_rate_limit=10**9,
                braze_rate_limit_window_seconds=2,
            )
        )
        services.buffer.enqueue(drain.backlog(identifiers, 4, random.Random(seed)))
        batches: list[str] = []
        coalescer = services.coalescer(batches.append, batches.extend)
        while True:
            cut = len(batches)
            coalescer._tick()
            if len(batches) == cut:
                break
        store, limiter = services.batches, services.limiter
        lease = services.settings.claim_lease_ms
        need = services.settings.http_timeout_ms
        ways = ["two calls", "one call", "claim+turn, fence", "claim+turn+fence"]
        spent = {way: [0.0, 0.0, 0] for way in ways}
        for start in range(0, len(batches), block):
            way = ways[(start // block + seed) % len(ways)]
            chunk = batches[start : start + block]
            redis_before = server_cpu(services)
            began = time.thread_time()
            for batch_id in chunk:
                token = f"bench/{uuid.uuid4().hex}"
                if way == "two calls":
                    store.claim(batch_id, token, lease, top_up_to=50)
                    limiter.acquire(batch_lane(batch_id))
                elif way == "one call":
                    ask = limiter.turn_ask(batch_lane(batch_id))
                    assert store.claim(batch_id, token, lease, top_up_to=50, turn=ask).grant
                elif way == "claim+turn, fence":
                    ask = limiter.turn_ask(batch_lane(batch_id))
                    assert store.claim(batch_id, token, lease, top_up_to=50, turn=ask).grant
                    assert store.fence([batch_id], token, need)
                else:
                    ask = limiter.turn_ask(batch_lane(batch_id))
                    made = store.claim(
                        batch_id,
                        token,
                        lease,
                        top_up_to=50,
                        turn=ask,
                        fence_ms=need,
                        opt_out_reads=True,
                    )
                    assert made.fenced
            spent[way][0] += time.thread_time() - began
            spent[way][1] += server_cpu(services) - redis_before
            spent[way][2] += len(chunk)
    figures: dict[str, float] = {}
    for way, (python, redis, count) in spent.items():
        figures[f"{way}: worker us a batch"] = python * 1e6 / count
        figures[f"{way}: redis-server us a batch"] = redis * 1e6 / count
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identifiers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=20)
    args = parser.parse_args()
    runs: list[dict[str, float]] = []
    for round_ in range(args.rounds):
        figures = one_round(args.identifiers, args.block, round_)
        runs.append(figures)
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:,.0f}" for k, v in figures.items()))
    result: dict[str, Any] = {
        "identifiers": args.identifiers,
        "rounds": args.rounds,
        "load_average": round(os.getloadavg()[0], 1),
    }
    for label in runs[0]:
        result[label] = round(statistics.median(run[label] for run in runs), 1)
    print()
    publish(result, "claim-turn.json")


if __name__ == "__main__":
    main()
