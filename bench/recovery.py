"""Recovery at the default settings, with real processes (issue 9): how long a stopped
worker's batches take to go out again, how fast a SIGTERM'd worker exits, and how soon a
key rotation delivers; optionally a worker frozen past its lease.

    .venv/bin/python -m bench.recovery                # kill -9 + SIGTERM, key rotation
    .venv/bin/python -m bench.recovery --runs 5       # the kill 5 times, and its spread
    .venv/bin/python -m bench.recovery --freeze       # and a worker frozen for 65 s
    .venv/bin/python -m bench.recovery --runs 3 --systems redis,cluster+rabbitmq  # side by side

Each scenario starts its own `celery -A worker.app` workers and beat (as the Procfile
does) against a private redis-server and the simulator, every setting at its default but
the API key, Redis and Braze's address (the freeze also lowers BRAZE_RATE_LIMIT: a tight
budget is its scenario, so that claimed batches wait for their turn). Writes the figures
to bench/results/recovery.json. With `--systems` (issue 24) the kill scenario runs on each
state store + broker named (bench.drain.SYSTEMS: `redis`, the state on one redis-server that
is the broker too; `cluster+rabbitmq`, the state on a 3 + 3 Redis Cluster and the broker a
rabbitmq-server; ...), side by side in one run, and its summary per system goes to
bench/results/recovery-systems.json; on a cluster system, `master_kill` runs as often:
kill -9 of the master holding the workspace mid-drain, timed kill -> promoted -> drained,
with the post tasks the outage failed and how many of their batches could not be given
back.

The scenarios are functions of a process group, a Redis client and the simulator, so that
`tests/e2e/test_recovery.py` runs the same ones and asserts on what they return.

- `kill_and_term`: 3 workers (8 threads each), a backlog of 4,000 changes (~3,500
  identifiers; 800 of the changes newer ones arriving once it drains), answers after
  500 ms, 10 % 500s; one worker gets SIGKILL and another SIGTERM while both hold claims.
  Measured: kill -> every batch the killed worker had claimed taken back, -> ended
  (delivered; a 500 on the re-post adds its retry's backoff), and -> the last
  arrival at the simulator of one of their identifiers; SIGTERM -> exit; kill -> drained.
- `key_rotation`: workers with a key the simulator refuses (401) until every batch waits
  for reason 'credentials'; SIGTERM them, start one with the right key. Measured: its
  `ready.` -> the first delivery, and -> drained.
- `freeze`: 2 workers, a tight budget; SIGSTOP one while it holds a claimed batch waiting
  for its turn, flip the same identifiers, SIGCONT it past its lease. Measured: freeze ->
  its batches taken back, -> the newer state delivered everywhere; stale deliveries after
  the thaw (must be 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
from redis import Redis

from admin.status import read_status
from bench.workloads import STATES, identity
from config.settings import Settings
from devtools.processes import CeleryProcess, ProcessGroup, worker_args

RESULTS = Path(__file__).resolve().parent / "results"

Slot = tuple[str, str, str]  # (group, kind, value), as the simulator names a subscription
Row = dict[str, Any]
Enqueue = Callable[[list[Row]], object]

# The defaults the scenarios run at (they change none of these).
DEFAULTS = Settings.model_construct()
LEASE_SECONDS = DEFAULTS.batch_claim_seconds
HEARTBEAT_TTL_SECONDS = DEFAULTS.heartbeat_ttl_seconds
HTTP_TIMEOUT_SECONDS = DEFAULTS.http_timeout_seconds


def row(slot: Slot, state: str) -> Row:
    group, kind, value = slot
    return {"subscription_group_id": group, "subscription_state": state, kind: value}


class TimedOut(AssertionError):
    """A scenario's condition did not come in time (its message says what and the state)."""


# --------------------------------------------------------------------------------------
# Reading the simulator and Redis
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sim:
    url: str

    def faults(self, **switches: Any) -> None:
        httpx.post(f"{self.url}/_sim/faults", json=switches, timeout=10).raise_for_status()

    def stats(self, *, log: bool = False) -> dict[str, Any]:
        params = {} if log else {"log": "0"}
        return httpx.get(f"{self.url}/_sim/stats", params=params, timeout=30).json()

    def states(self) -> dict[Slot, str]:
        data = httpx.get(f"{self.url}/_sim/state", params={"log": "0"}, timeout=30).json()
        return {(s["group"], s["kind"], s["value"]): s["state"] for s in data["subscriptions"]}

    def applied(self) -> dict[Slot, list[dict[str, Any]]]:
        """Every state applied per slot, in order, with its arrival time `t` (epoch s)."""
        document = httpx.get(f"{self.url}/_sim/applied", timeout=60).json()
        assert document["complete"], "the simulator's applied log is incomplete"
        return {
            (item["group"], item["kind"], item["value"]): item["states"]
            for item in document["applied"]
        }


def worker_id_prefix(pid: int) -> str:
    """How the worker process `pid` of this host names itself in claim tokens
    (delivery/liveness.py: host:pid:random)."""
    return f"{socket.gethostname()}:{pid}:"


@dataclass(frozen=True)
class Holdings:
    claims: dict[str, bool]  # batch id -> its request was sent (fenced)

    @property
    def unsent(self) -> set[str]:
        return {batch_id for batch_id, sent in self.claims.items() if not sent}

    @property
    def batch_ids(self) -> set[str]:
        return set(self.claims)


@dataclass(frozen=True)
class Fleet:
    """What the fleet holds, read from Redis (keys as stores/keys.py names them)."""

    client: Redis
    keys: Any  # stores.keys.Keys

    def holdings(self, pid: int) -> Holdings:
        prefix = worker_id_prefix(pid)
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.keys.claim_tokens)
        pipe.hgetall(self.keys.fences)
        tokens, fences = pipe.execute()
        return Holdings(
            {
                batch_id.decode(): batch_id in fences
                for batch_id, token in tokens.items()
                if token.decode().startswith(prefix)
            }
        )

    def unfinished(self, batch_ids: Iterable[str]) -> set[str]:
        """Those of `batch_ids` not ended yet (still recorded in the batches ZSET)."""
        ids = sorted(batch_ids)
        if not ids:
            return set()
        scores = self.client.zmscore(self.keys.batches, ids)
        return {batch_id for batch_id, score in zip(ids, scores, strict=True) if score is not None}

    def slots(self, batch_ids: Iterable[str]) -> dict[Slot, str]:
        """The members of these batches (as recorded now) with the state they carry."""
        found: dict[Slot, str] = {}
        for batch_id in batch_ids:
            raw = self.client.get(self.keys.batch(batch_id))
            if raw is None:
                continue
            record = json.loads(raw)
            for member in record["members"]:
                found[(record["group"], record["kind"], member[0])] = record["state"]
        return found

    def waiting(self) -> Counter[str]:
        """Batches waiting in the schedule, by reason."""
        return Counter(raw.decode() for raw in self.client.hvals(self.keys.schedule_reasons))

    def batches(self) -> int:
        return int(self.client.zcard(self.keys.batches))

    def claimed(self) -> int:
        return int(self.client.zcard(self.keys.claims))

    def drained(self) -> bool:
        status = read_status(self.client, self.keys)
        return status.pending == 0 and status.in_flight == 0 and status.batches_in_flight == 0


def poll(
    condition: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    state: Callable[[], str] | None = None,
) -> Any:
    """Poll `condition` until truthy (returned); `TimedOut` naming `what` (and `state()`)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = f"\n{state()}" if state is not None else ""
            raise TimedOut(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def start_workers(
    procs: ProcessGroup,
    names: Iterable[str],
    *,
    concurrency: int,
    extra_env: Mapping[str, str] | None = None,
) -> list[CeleryProcess]:
    """Start workers side by side and wait until every one is ready."""
    started = [
        procs.start("worker", name, worker_args(name, "--concurrency", str(concurrency)), extra_env)
        for name in names
    ]
    procs.wait_ready(started, timeout=120)
    return started


def log_since(process: CeleryProcess, offset: int) -> str:
    return process.log_path.read_bytes()[offset:].decode(errors="replace")


# Celery's line for a finished post task: its PostReport, batch id (live ones 'live-…') and
# status first.
TASK_DONE = re.compile(
    r"post_batch\[[^\]]+\] succeeded in [\d.]+s: \{'batch_id': '([\w-]+)', 'status': '(\w+)'"
)


def task_outcomes(log: str) -> dict[str, str]:
    """Batch id -> the status its post task reported, from a worker's log (the last)."""
    return dict(TASK_DONE.findall(log))


def stopped(pid: int) -> bool:
    """Every thread of process `pid` is stopped (SIGSTOP took effect)."""
    tasks = Path(f"/proc/{pid}/task")
    try:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(states) and all(s in ("T", "t") for s in states)


def settled(read: Callable[[], Any], *, timeout: float = 5.0) -> Any:
    """A value read twice in a row the same (a stopped process's last command to Redis,
    already on its way, has landed)."""
    last = read()

    def same() -> bool:
        nonlocal last
        now = read()
        equal = now == last
        last = now
        return equal

    poll(same, timeout=timeout, what="Redis to settle", interval=0.02)
    return last


def last_arrival(applied: Mapping[Slot, list[dict[str, Any]]], slots: Iterable[Slot]) -> float:
    """The latest time any of `slots` received a state from braze-subs."""
    times = [
        entry["t"] for slot in slots for entry in applied.get(slot, []) if not entry.get("external")
    ]
    return max(times, default=0.0)


# --------------------------------------------------------------------------------------
# 1. kill -9 one worker and SIGTERM another, mid-backlog
# --------------------------------------------------------------------------------------


GROUPS = {"email": ["news", "promo-mail"], "phone": ["sms-promos"], "external_id": ["news"]}


def backlog_rows(
    rng: random.Random, count: int, population: int, expected: dict[Slot, str]
) -> list[Row]:
    """`count` changes over `population` identifiers (numbered as bench.workloads does), in
    random groups of their channel and random states; `expected` keeps the last write."""
    rows = []
    for _ in range(count):
        _, kind, value = identity(rng.randrange(population), 0)
        group = rng.choice(GROUPS[kind])
        state = rng.choice(STATES)
        rows.append(row((group, kind, value), state))
        expected[(group, kind, value)] = state
    return rows


@dataclass
class KillReport:
    expected: dict[Slot, str]  # last write of every identifier
    killed_batches: int  # batches the killed worker had claimed at its death
    killed_sent: int  # of those, batches whose request was on the wire (outcome unknown)
    killed_identifiers: int
    kill_to_taken_back: float  # kill -> none of them held by the dead worker any more
    kill_to_batches_ended: float  # kill -> every one of those batches ended
    kill_to_last_arrival: float  # kill -> last arrival at Braze of one of their identifiers
    term_batches: int  # batches the SIGTERM'd worker held just before the signal
    term_exit_seconds: float  # SIGTERM -> the process exited
    term_exit_code: int
    term_to_batches_ended: float  # SIGTERM -> every one of its batches ended
    kill_to_drained: float
    requests: int = 0
    server_errors: int = 0

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("expected",)}


def kill_and_term(
    procs: ProcessGroup,
    fleet: Fleet,
    sim: Sim,
    enqueue: Enqueue,
    *,
    changes: int = 4_000,
    population: int = 3_000,
    latency_ms: float = 500,
    error_rate: float = 0.1,
    concurrency: int = 8,
    seed: int = 9,
    timeout: float = 180,
) -> KillReport:
    rng = random.Random(seed)
    sim.faults(latency_ms=latency_ms, error_rate=error_rate)
    victim, stopper, _survivor = start_workers(
        procs, ["w-killed", "w-stopped", "w-survivor"], concurrency=concurrency
    )
    procs.beat()
    expected: dict[Slot, str] = {}
    enqueue(backlog_rows(rng, changes * 4 // 5, population, expected))
    poll(lambda: sim.stats()["requests_ok"] >= 20, timeout=60, what="the first deliveries")
    # Newer changes for identifiers of the backlog, some of them locked in batches now.
    enqueue(backlog_rows(rng, changes // 5, population, expected))

    def both_busy() -> Holdings | None:
        # Mid-backlog: the one to be killed posting on a quarter of its threads (two of
        # eight), the other posting. A cut's batches travel ten to a message, posted one
        # after the other (`subscriptions.post_batches`), so a worker holds one claim per
        # message it runs: half its threads (four messages of the few a cut makes) was
        # rare enough once the posts got cheaper that the wait timed out (1 CI in ~30).
        term = fleet.holdings(stopper.pid)
        busy = len(fleet.holdings(victim.pid).claims) >= max(2, concurrency // 4)
        return term if busy and term.claims else None

    term_held = poll(
        both_busy, timeout=60, interval=0.01, what="the two workers to hold claims"
    ).batch_ids
    victim.signal_group(signal.SIGKILL)
    killed_at = time.time()
    stopper.signal_group(signal.SIGTERM)
    termed_at = time.time()
    victim.wait(timeout=30)
    # Dead: what it holds can no longer change, and no tick takes it back before its
    # heartbeat expires (HEARTBEAT_TTL_SECONDS).
    held = fleet.holdings(victim.pid)
    killed_ids = held.batch_ids
    killed_slots = fleet.slots(killed_ids)

    left_killed, left_term = set(killed_ids), set(term_held)
    killed_done = term_done = term_exit = taken_back = None
    deadline = time.monotonic() + timeout
    while True:
        now = time.time()
        if term_exit is None and stopper.poll() is not None:
            term_exit = now - termed_at
        if taken_back is None and not fleet.holdings(victim.pid).claims:
            taken_back = now - killed_at
        if left_killed:
            left_killed = fleet.unfinished(left_killed)
            if not left_killed:
                killed_done = now - killed_at
        if left_term:
            left_term = fleet.unfinished(left_term)
            if not left_term:
                term_done = now - termed_at
        settled = not left_killed and not left_term and taken_back is not None
        if settled and term_exit is not None and fleet.drained():
            drained = now - killed_at
            break
        if time.monotonic() > deadline:
            raise TimedOut(
                f"not recovered within {timeout:g}s: killed worker's batches left "
                f"{len(left_killed)}, SIGTERM'd worker's {len(left_term)}, exited "
                f"{term_exit is not None}, status {read_status(fleet.client, fleet.keys)}"
            )
        time.sleep(0.05)

    applied = sim.applied()
    stats = sim.stats()
    code = stopper.poll()
    return KillReport(
        expected=expected,
        killed_batches=len(killed_ids),
        killed_sent=sum(held.claims.values()),
        killed_identifiers=len(killed_slots),
        kill_to_taken_back=round(taken_back or 0.0, 2),
        kill_to_batches_ended=round(killed_done or 0.0, 2),
        kill_to_last_arrival=round(last_arrival(applied, killed_slots) - killed_at, 2),
        term_batches=len(term_held),
        term_exit_seconds=round(term_exit or 0.0, 2),
        term_exit_code=-1 if code is None else code,
        term_to_batches_ended=round(term_done or 0.0, 2),
        kill_to_drained=round(drained, 2),
        requests=stats["requests_total"],
        server_errors=stats["server_errors"],
    )


# --------------------------------------------------------------------------------------
# 2. The runbook's key rotation: a wrong key, then workers restarted with the right one
# --------------------------------------------------------------------------------------


@dataclass
class RotationReport:
    expected: dict[Slot, str]
    waiting_before: dict[str, int]  # batches in the schedule by reason, before the restart
    unauthorized: int  # 401s the wrong key got
    old_exit_seconds: list[float]  # SIGTERM -> exit of each wrong-key worker
    start_to_ready: float  # the right-key worker: process started -> `ready.`
    ready_to_first_delivery: float  # its `ready.` (as seen by polling its log) -> first 201
    ready_to_drained: float

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "expected"}


def key_rotation(
    procs: ProcessGroup,
    fleet: Fleet,
    sim: Sim,
    enqueue: Enqueue,
    *,
    wrong_key: str = "a-revoked-key",
    changes: int = 3_000,
    population: int = 2_500,
    seed: int = 10,
    timeout: float = 90,
) -> RotationReport:
    rng = random.Random(seed)
    wrong = {"BRAZE_API_KEY": wrong_key}
    old = start_workers(procs, ["w-wrong-1", "w-wrong-2"], concurrency=4, extra_env=wrong)
    procs.beat()
    expected: dict[Slot, str] = {}
    enqueue(backlog_rows(rng, changes, population, expected))

    def all_wait_for_the_key() -> Counter[str] | None:
        # Everything cut, nothing claimed, every batch in the schedule for the key.
        waiting = fleet.waiting()
        if read_status(fleet.client, fleet.keys).pending or fleet.claimed():
            return None
        total = fleet.batches()
        return waiting if total and waiting.get("credentials", 0) == total else None

    waiting = poll(
        all_wait_for_the_key,
        timeout=timeout,
        what="every batch to wait for reason 'credentials'",
        state=lambda: f"waiting {fleet.waiting()}, batches {fleet.batches()}",
    )
    stats = sim.stats()
    assert stats["requests_ok"] == 0, stats

    for process in old:
        process.signal_group(signal.SIGTERM)
    termed = time.time()
    exits = []
    for process in old:
        process.wait(timeout=60)
        exits.append(round(time.time() - termed, 2))

    started = time.time()
    new = procs.start("worker", "w-right", worker_args("w-right", "--concurrency", "4"))
    poll(new.ready, timeout=120, interval=0.02, what="the right-key worker to be ready")
    ready = time.time()
    first = poll(
        lambda: [r["t"] for r in sim.stats(log=True)["requests"] if r["status"] == 201],
        timeout=timeout,
        interval=0.05,
        what="the first delivery with the right key",
    )
    poll(fleet.drained, timeout=timeout, what="the backlog to drain")
    return RotationReport(
        expected=expected,
        waiting_before=dict(waiting),
        unauthorized=stats["unauthorized"],
        old_exit_seconds=exits,
        start_to_ready=round(ready - started, 2),
        ready_to_first_delivery=round(min(first) - ready, 2),
        ready_to_drained=round(time.time() - ready, 2),
    )


# --------------------------------------------------------------------------------------
# 3. A worker frozen past its lease while newer changes arrive
# --------------------------------------------------------------------------------------


@dataclass
class FreezeReport:
    expected: dict[Slot, str]
    frozen_batches: int  # claimed, request not sent, when the worker froze
    frozen_identifiers: int
    freeze_attempts: int  # SIGSTOPs until one caught an unsent claim
    frozen_seconds: float
    freeze_to_taken_back: float
    freeze_to_newer_delivered: float
    thaw_to_posts_ended: float  # thaw -> the thawed worker's posts of them returned
    thawed_reports: dict[str, int]  # what those posts reported (must be all "lost")
    stale_after_thaw: int  # older states that reached Braze after the thaw (must be 0)
    thaw_to_drained: float

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "expected"}


def freeze(
    procs: ProcessGroup,
    fleet: Fleet,
    sim: Sim,
    enqueue: Enqueue,
    *,
    freeze_seconds: float = LEASE_SECONDS + 5,
    identifiers: int = 1_000,
    rate_limit: int = 120,
    timeout: float = 120,
) -> FreezeReport:
    budget = {"BRAZE_RATE_LIMIT": str(rate_limit)}
    frozen, _other = start_workers(procs, ["w-frozen", "w-other"], concurrency=4, extra_env=budget)
    procs.beat()
    slots = [("news", "email", f"user{n}@example.com") for n in range(identifiers)]
    enqueue([row(slot, "subscribed") for slot in slots])

    attempts = 0
    held: set[str] = set()
    while not held:
        attempts += 1
        if attempts > 50:
            raise TimedOut("could not freeze the worker while it held an unsent claim")
        poll(
            lambda: fleet.holdings(frozen.pid).unsent,
            timeout=60,
            interval=0.005,
            what="the worker to hold a claimed batch not sent yet",
        )
        frozen.signal_group(signal.SIGSTOP)
        frozen_at = time.time()
        poll(lambda: stopped(frozen.pid), timeout=10, interval=0.005, what="SIGSTOP")
        held = settled(lambda: fleet.holdings(frozen.pid)).unsent
        if not held:  # it sent (or ended) them just before it stopped: again
            frozen.signal_group(signal.SIGCONT)
    frozen_slots = fleet.slots(held)
    offset = len(frozen.log_path.read_bytes())

    # A second wave flips the same identifiers while the worker is frozen.
    enqueue([row(slot, "unsubscribed") for slot in slots])
    expected = dict.fromkeys(slots, "unsubscribed")
    status = lambda: f"{read_status(fleet.client, fleet.keys)} waiting {fleet.waiting()}"  # noqa: E731
    poll(
        lambda: not (fleet.holdings(frozen.pid).unsent & held),
        timeout=timeout,
        what="the frozen worker's claims to be taken back",
        state=status,
    )
    taken_back = time.time() - frozen_at
    poll(
        lambda: sim.states() == expected,
        timeout=timeout,
        interval=0.5,
        what="the newer state delivered everywhere",
        state=status,
    )
    newer = time.time() - frozen_at
    poll(
        lambda: time.time() >= frozen_at + freeze_seconds,
        timeout=freeze_seconds + 5,
        interval=0.2,
        what="the freeze to last",
    )
    frozen.signal_group(signal.SIGCONT)
    thawed = time.time()

    def outcomes() -> dict[str, str] | None:
        found = task_outcomes(log_since(frozen, offset))
        return found if held <= set(found) else None

    reported = poll(
        outcomes,
        timeout=timeout,
        what="the thawed worker to end its posts of the frozen batches",
        state=lambda: log_since(frozen, offset)[-3000:],
    )
    ended = time.time() - thawed
    poll(fleet.drained, timeout=timeout, what="everything to drain", state=status)
    drained = time.time() - thawed
    applied = sim.applied()
    stale = sum(
        1
        for slot in slots
        for entry in applied.get(slot, [])
        if entry["t"] >= thawed and entry["state"] != "unsubscribed"
    )
    return FreezeReport(
        expected=expected,
        frozen_batches=len(held),
        frozen_identifiers=len(frozen_slots),
        freeze_attempts=attempts,
        frozen_seconds=round(thawed - frozen_at, 2),
        freeze_to_taken_back=round(taken_back, 2),
        freeze_to_newer_delivered=round(newer, 2),
        thaw_to_posts_ended=round(ended, 2),
        thawed_reports=dict(Counter(reported[batch_id] for batch_id in held)),
        stale_after_thaw=stale,
        thaw_to_drained=round(drained, 2),
    )


# --------------------------------------------------------------------------------------
# 4. On a Redis Cluster: kill -9 of the master holding the workspace, mid-drain
# --------------------------------------------------------------------------------------


@dataclass
class MasterKillReport:
    expected: dict[Slot, str]
    kill_to_promoted: float  # kill -> the replica serves the slot (cluster-node-timeout 2 s)
    promoted_to_drained: float  # -> nothing pending, in flight or claimed
    posts_failed: int  # post tasks the outage ended with an error (their batches given back)
    not_given_back: int  # of those, batches whose give-back failed (left for the lease)
    requests: int = 0

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "expected"}


POST_FAILED = re.compile(r"Task subscriptions\.post_batch\[[^\]]+\] raised unexpected")


def master_kill(
    procs: ProcessGroup,
    fleet: Fleet,
    sim: Sim,
    enqueue: Enqueue,
    *,
    cluster: Any,  # devtools.redis_cluster.RedisCluster holding the state
    changes: int = 3_000,
    population: int = 1_200,
    latency_ms: float = 1000,
    seed: int = 24,
    timeout: float = 180,
) -> MasterKillReport:
    """A worker (8 threads) and beat drain flipping changes with Braze answering in 1 s;
    once the drain is under way the master of the workspace's slot gets SIGKILL (after
    WAIT: the changes themselves are on the replica, what is measured is the outage).
    As e2e/test_redis_cluster.py's kill test, timed."""
    rng = random.Random(seed)
    sim.faults(latency_ms=latency_ms)
    (worker,) = start_workers(procs, ["w-1"], concurrency=8)
    procs.beat()
    expected: dict[Slot, str] = {}
    enqueue(backlog_rows(rng, changes, population, expected))
    master = cluster.master_of(fleet.keys.pending)
    node = cluster.node(master)
    node.set(f"{fleet.keys.tag}:bench-wait", "1")
    node.execute_command("WAIT", 1, 10_000)
    poll(lambda: sim.stats()["requests_ok"] >= 5, timeout=60, what="the drain under way")
    killed = time.time()
    cluster.kill_master(master)
    promoted = time.time()
    poll(fleet.drained, timeout=timeout, what="the drain after the promotion")
    drained = time.time()
    log = worker.log_path.read_text(errors="replace")
    return MasterKillReport(
        expected=expected,
        kill_to_promoted=round(promoted - killed, 2),
        promoted_to_drained=round(drained - promoted, 2),
        posts_failed=len(POST_FAILED.findall(log)),
        not_given_back=log.count("could not be given back"),
        requests=sim.stats()["requests_total"],
    )


# --------------------------------------------------------------------------------------
# The benchmark: each scenario against a fresh Redis and simulator
# --------------------------------------------------------------------------------------

KEY = "bench-key"


def _run(scenario: Callable[..., Any], system: str = "redis") -> dict[str, Any]:
    """`scenario` against a fresh state store and broker of `system` (bench.drain.SYSTEMS:
    `redis`, one redis-server for both, or e.g. `cluster+rabbitmq`) and simulator."""
    from bench.drain import SYSTEMS, start_stores
    from delivery.services import reset_services, services
    from simulator import SimulatorConfig, SimulatorServer
    from tasks.producer import enqueue_changes

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(TemporaryDirectory(prefix="braze-subs-bench-")))
        clusters: list[Any] = []
        redis_url, broker_url = start_stores(stack, workdir, *SYSTEMS[system], clusters)
        server = SimulatorServer(SimulatorConfig(api_keys={KEY}, auto_groups=True))
        server.start()
        stack.callback(server.stop)
        env = {
            "REDIS_URL": redis_url,
            "BROKER_URL": broker_url,
            "BRAZE_REST_ENDPOINT": server.url,
            "BRAZE_API_KEY": KEY,
        }
        os.environ.update(env)
        reset_services()
        found = services()
        procs = stack.enter_context(ProcessGroup(workdir, {**os.environ, "LOG_LEVEL": "INFO"}))
        extra = {"cluster": clusters[0]} if scenario is master_kill else {}
        report = scenario(
            procs, Fleet(found.redis, found.keys), Sim(server.url), enqueue_changes, **extra
        )
        states = Sim(server.url).states()
        wrong = sum(1 for slot, state in report.expected.items() if states.get(slot) != state)
        return {**report.figures(), "wrong_final_state": wrong}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The kill scenario over several runs: the spread of its figures, and how many runs
    needed the sweep (drained more than 30 s after the kill: a lost message)."""
    ended = [run["kill_to_batches_ended"] for run in runs]
    exits = [run["term_exit_seconds"] for run in runs]
    return {
        "runs": len(runs),
        "kill_to_taken_back_max": max(run["kill_to_taken_back"] for run in runs),
        "kill_to_batches_ended_median": round(statistics.median(ended), 2),
        "kill_to_batches_ended_max": max(ended),
        "term_exit_seconds_max": max(exits),
        "kill_to_drained": [run["kill_to_drained"] for run in runs],
        "runs_drained_after_30s": sum(1 for run in runs if run["kill_to_drained"] > 30),
        "wrong_final_state": sum(run["wrong_final_state"] for run in runs),
    }


def show(name: str, figures: Mapping[str, Any]) -> None:
    print(f"{name}:")
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"  {key:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of kill_and_term")
    parser.add_argument("--freeze", action="store_true", help="also the 65 s freeze (slow)")
    parser.add_argument(
        "--systems",
        default="",
        help="comma-separated state+broker systems (bench.drain.SYSTEMS, e.g. "
        "redis,cluster+rabbitmq): kill_and_term on each, side by side, the order rotated "
        "every run; writes bench/results/recovery-systems.json",
    )
    args = parser.parse_args()
    # A killed worker's request cut off mid-body makes the simulator log a ClientDisconnect.
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    if args.systems:
        side_by_side(args.systems.split(","), args.runs)
        return
    results: dict[str, Any] = {}
    runs = []
    for run in range(args.runs):
        runs.append(_run(kill_and_term))
        show(f"kill_and_term (run {run + 1})", runs[-1])
    results["kill_and_term"] = runs
    if args.runs > 1:
        results["kill_and_term_summary"] = summary(runs)
        show("kill_and_term over all runs", results["kill_and_term_summary"])
    scenarios: list[tuple[str, Callable[..., Any]]] = [("key_rotation", key_rotation)]
    if args.freeze:
        scenarios.append(("freeze", freeze))
    for name, scenario in scenarios:
        results[name] = _run(scenario)
        show(name, results[name])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps(results, indent=2) + "\n")


def side_by_side(systems: list[str], runs: int) -> None:
    """kill_and_term `runs` times on each system, the systems' order rotated every run."""
    from bench.drain import SYSTEMS
    from bench.figures import publish

    for system in systems:
        if system not in SYSTEMS:
            raise SystemExit(f"--systems: unknown system {system!r} ({', '.join(SYSTEMS)})")
    found: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    for run in range(runs):
        for system in systems[run % len(systems) :] + systems[: run % len(systems)]:
            found[system].append(_run(kill_and_term, system))
            show(f"kill_and_term on {system} (run {run + 1})", found[system][-1])
    figures: dict[str, Any] = {"runs": runs}
    for system in systems:
        for name, value in summary(found[system]).items():
            if name != "runs":
                figures[f"{system} {name}"] = value
    # The state store's own failover, where there is one to kill: a cluster's master.
    for system in (s for s in systems if SYSTEMS[s][0] == "cluster"):
        kills = []
        for run in range(runs):
            kills.append(_run(master_kill, system))
            show(f"master_kill on {system} (run {run + 1})", kills[-1])
        for name in ("kill_to_promoted", "promoted_to_drained", "posts_failed", "not_given_back"):
            figures[f"{system} master_kill {name}"] = [kill[name] for kill in kills]
        figures[f"{system} master_kill wrong_final_state"] = sum(
            kill["wrong_final_state"] for kill in kills
        )
    publish(figures, "recovery-systems.json")


if __name__ == "__main__":
    main()
