"""Where a drain at the ceiling spends its time (issue 26): requests a tenth of a second.

`bench.ceiling`'s drain (100,000 identifiers, two v1 workers and beat, an unlimited
budget, the simulator in this process), once with the defaults and once with the settings
given by `--with NAME=VALUE,...`, alternating for `--rounds`. Each drain's requests are
counted per 100 ms from the first (the simulator's log), and the batches in flight are
sampled at each of the drain's status polls (0.1 s). Reported: identifiers/s; the share of
the drain's tenths with no more than two requests (the pipeline idle); the rate while it
flows (the median tenth of those with ten requests or more, as identifiers/s); and one
round's timeline of each setting, to read the shape (posting, then a gap while the next
cut is made). What it showed at main 2828c1a: posting flows at ~19,000-20,000
identifiers/s, and ~0.3 of the drain has no request, while the next tick's cut is made
(README, The ceiling, seventh step all together).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time
from typing import Any

import httpx

import bench.drain as drain
from bench.figures import publish


def one_drain(identifiers: int, settings: dict[str, str]) -> dict[str, Any]:
    """One drain with `settings` in the environment the workers and beat inherit."""
    samples: list[tuple[float, int, int]] = []
    stats: dict[str, Any] = {}
    polled, real_get = drain.read_status, httpx.get

    def watched(client: Any, keys: Any) -> Any:
        status = polled(client, keys)
        samples.append((time.time(), status.pending, status.in_flight))
        return status

    def get(url: str, *args: Any, **kwargs: Any) -> Any:
        answer = real_get(url, *args, **kwargs)
        if url.endswith("/_sim/stats"):
            stats.update(answer.json())
        return answer

    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    drain.read_status, drain.httpx.get = watched, get  # type: ignore[attr-defined]
    try:
        args = argparse.Namespace(
            workers="v1,v1", identifiers=identifiers, groups=4, limit=drain.UNLIMITED,
            window=2, timeout=600,
        )  # fmt: skip
        figures = drain.run(args)
    finally:
        drain.read_status, drain.httpx.get = polled, real_get  # type: ignore[attr-defined]
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    times = sorted(r["t"] for r in stats["requests"])
    first = times[0]
    tenths = collections.Counter(int((t - first) * 10) for t in times)
    bins = [tenths.get(i, 0) for i in range(max(tenths) + 1)]
    flowing = [n for n in bins if n >= 10]
    return {
        "identifiers_per_second": figures["identifiers_per_second"],
        "idle_share": round(sum(1 for n in bins if n <= 2) / len(bins), 3),
        "flowing_identifiers_per_second": round(statistics.median(flowing) * 10 * 50)
        if flowing
        else 0,
        "wrong_final_state": figures["wrong_final_state"],
        "timeline": " ".join(map(str, bins)),
        "in_flight": " ".join(
            f"{t - first:.1f}:{in_flight}" for t, _pending, in_flight in samples if t >= first
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--identifiers", type=int, default=100_000)
    parser.add_argument(
        "--with",
        dest="other",
        default="MAX_BATCHES_IN_FLIGHT=1000,COALESCE_MAX_CHANGES_PER_TICK=50000",
        help="the other drain's settings, NAME=VALUE,...",
    )
    args = parser.parse_args()
    other = dict(pair.split("=", 1) for pair in args.other.split(",") if pair)
    configs = {"defaults": {}, "other": other}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
        for name in order:
            figures = one_drain(args.identifiers, configs[name])
            runs[name].append(figures)
            print(
                f"round {round_ + 1} {name}: {figures['identifiers_per_second']:,} "
                f"identifiers/s, idle {figures['idle_share']}, flowing "
                f"{figures['flowing_identifiers_per_second']:,}/s",
                flush=True,
            )
    result: dict[str, Any] = {
        "identifiers": args.identifiers,
        "other": args.other,
        "load_average": round(os.getloadavg()[0], 1),
    }
    for name, figures in runs.items():
        for key in ("identifiers_per_second", "idle_share", "flowing_identifiers_per_second"):
            values = [f[key] for f in figures]
            result[f"{name}.{key}"] = values
            result[f"{name}.{key}.median"] = statistics.median(values)
        result[f"{name}.wrong_final_state"] = sum(f["wrong_final_state"] for f in figures)
        result[f"{name}.timeline_round_1"] = figures[0]["timeline"]
    publish(result, "drain-timeline.json")


if __name__ == "__main__":
    main()
