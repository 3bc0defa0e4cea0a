"""Fault injection, end to end: real worker and beat processes, the simulator over HTTP.

Each test injects one fault (a Braze outage, random 500s, a poison identifier, a refused
key, beats killed or doubled, workers killed with SIGKILL, Redis killed and restarted) and
ends the same way: everything drained, the simulator holds the last-written state of every
identifier, no identifier ever received an older state after a newer one (the order oracle
over the simulator's applied log), and the dead-letter store holds exactly what it should
(usually nothing).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import RedisError

from admin.status import Status, read_status
from delivery.services import reset_services, services
from devtools.processes import free_port
from stores.dead_letters import DeadLetter, DeadLetters
from tasks.producer import enqueue_changes
from tests.conftest import SIM_KEY, EnqueuedLog, assert_applied_in_order, identifier, wait_for
from tests.sim_control import faults, sim_states, sim_stats

pytestmark = pytest.mark.slow

Slot = tuple[str, str, str]  # (group, kind, value), as the simulator names a subscription

GROUPS = {
    "email": ["news", "promo-mail"],
    "phone": ["sms-promos"],
    "external_id": ["news", "sms-promos"],
}
STATES = ("subscribed", "unsubscribed")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def row(group: str, kind: str, value: str, state: str) -> dict[str, Any]:
    return {"subscription_group_id": group, "subscription_state": state, kind: value}


def random_rows(
    rng: random.Random, count: int, slots: int, expected: dict[Slot, str]
) -> list[dict[str, Any]]:
    """`count` changes over about `slots` identifiers (so they flip); `expected` keeps the
    last write of each (later rows win)."""
    rows = []
    for _ in range(count):
        kind = rng.choice(list(GROUPS))
        group = rng.choice(GROUPS[kind])
        value = identifier(kind, rng.randrange(slots))
        state = rng.choice(STATES)
        rows.append(row(group, kind, value, state))
        expected[(group, kind, value)] = state
    return rows


# What this test enqueued per identifier, in order: the order oracle's input.
SENT = EnqueuedLog()


@pytest.fixture(autouse=True)
def _fresh_log() -> Iterator[None]:
    SENT.clear()
    yield
    SENT.clear()


def enqueue(rows: list[dict[str, Any]]) -> int:
    return enqueue_changes(SENT.add(rows))


def status(*, limiter: bool = False) -> Status:
    found = services()
    return read_status(found.redis, found.keys, found.limiter if limiter else None)


def drained() -> bool:
    now = status()
    return now.pending == 0 and now.in_flight == 0 and now.batches_in_flight == 0


def batch_records() -> list[dict[str, Any]]:
    """Every unfinished batch record, as stored."""
    found = services()
    ids = [raw.decode() for raw in found.redis.zrange(found.keys.batches, 0, -1)]
    raws = [found.redis.get(found.keys.batch(batch_id)) for batch_id in ids]
    return [json.loads(raw) for raw in raws if raw is not None]


def dead_letters() -> list[DeadLetter]:
    found = services()
    return DeadLetters(found.redis, found.keys).list()


def describe(sim: Any, processes: Any = None) -> str:
    """What is going on, for a failure message."""
    lines = [f"status: {status(limiter=True)}", f"stats: {sim_stats(sim)}"]
    for process in getattr(processes, "started", []):
        log = Path(process.log_path).read_text(errors="replace").splitlines()
        # From the first fatal line if there is one (the cause), else the last lines.
        fatal = [n for n, line in enumerate(log) if "CRITICAL" in line or "Unrecoverable" in line]
        tail = log[fatal[0] : fatal[0] + 120] if fatal else log[-15:]
        lines.append(f"--- {process.log_path.name} (rc={process.poll()})")
        lines += tail
    return "\n".join(lines)


def wait_drained(sim: Any, processes: Any, timeout: float) -> None:
    try:
        wait_for(drained, timeout=timeout, interval=0.1, what="everything to drain")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe(sim, processes)}") from None


def assert_final(
    sim: Any, expected: dict[Slot, str], dead: dict[Slot, str] | None = None
) -> dict[str, Any]:
    """The simulator holds the last write of every identifier not dead-lettered, and the
    dead-letter store holds exactly `dead`. Returns the simulator's stats."""
    dead = dead or {}
    delivered = {slot: state for slot, state in expected.items() if slot not in dead}
    actual = sim_states(sim)
    wrong = {slot: (actual.get(slot), state) for slot, state in delivered.items()}
    wrong = {slot: pair for slot, pair in wrong.items() if pair[0] != pair[1]}
    extra = set(actual) - set(delivered)
    assert not wrong and not extra, (
        f"{len(wrong)} identifiers not in their last-written state (actual, expected), e.g. "
        f"{list(wrong.items())[:5]}; {len(extra)} unexpected, e.g. {sorted(extra)[:5]}"
    )
    entries = dead_letters()
    held = {
        (entry.subscription_group_id, item["kind"], item["value"]): entry.subscription_state
        for entry in entries
        for item in entry.identifiers
    }
    assert held == dead, [entry.as_dict() for entry in entries]
    assert status().dead_letter == len(dead)
    stats = sim_stats(sim)
    assert stats["malformed"] == 0, stats
    # Final states alone would pass an old state that arrived late and was overwritten.
    assert_applied_in_order(sim.url, SENT)
    return stats


def worker_env(**values: Any) -> dict[str, str]:
    return {name: str(value) for name, value in values.items()}


def start_beat(processes: Any, name: str, extra: dict[str, str]) -> Any:
    return processes.start("beat", name, extra_env=extra)


# --------------------------------------------------------------------------------------
# 1. A Braze outage longer than several backoffs
# --------------------------------------------------------------------------------------


def test_outage_longer_than_several_backoffs_loses_nothing(env, sim, processes):
    rng = random.Random(1)
    extra = worker_env(
        MAX_ATTEMPTS=60, RETRY_BACKOFF_BASE_SECONDS=0.1, RETRY_BACKOFF_MAX_SECONDS=0.5
    )
    faults(sim, outage=True)
    processes.worker("w1", concurrency=8, extra_env=extra)
    start_beat(processes, "beat", extra)

    expected: dict[Slot, str] = {}
    enqueue(random_rows(rng, 300, 150, expected))
    wait_for(
        lambda: (records := batch_records()) and all(record["attempts"] >= 3 for record in records),
        timeout=30,
        what="every batch to have failed at least 3 attempts",
    )
    # Newer changes for identifiers locked in retrying batches: they wait in the buffer,
    # and the retried batches drop what they supersede.
    enqueue(random_rows(rng, 200, 150, expected))
    errors = sim_stats(sim)["server_errors"]
    wait_for(
        lambda: sim_stats(sim)["server_errors"] >= errors + 20,
        timeout=20,
        what="the outage to go on for 20 more failed requests",
    )
    assert max(record["attempts"] for record in batch_records()) >= 4
    assert status().dead_letter == 0
    assert sim_stats(sim)["requests_ok"] == 0
    faults(sim, outage=False)

    wait_drained(sim, processes, timeout=40)
    stats = assert_final(sim, expected)
    assert stats["server_errors"] >= errors + 20
    print(f"outage: {stats['server_errors']} 503s, {stats['requests_ok']} requests ok")


def test_an_outage_outlasting_max_attempts_dead_letters_after_exactly_max_attempts(
    env, sim, processes
):
    """MAX_ATTEMPTS is the setting under test, so it and the backoff are shortened (the
    default schedule, 15 attempts ≈ 20 min, is checked as arithmetic in
    tests/unit/test_outcome.py): every batch makes exactly MAX_ATTEMPTS requests, then its
    identifiers are dead-lettered with the last error, and nothing else is sent."""
    attempts = 4
    extra = worker_env(
        MAX_ATTEMPTS=attempts, RETRY_BACKOFF_BASE_SECONDS=0.1, RETRY_BACKOFF_MAX_SECONDS=0.2
    )
    faults(sim, outage=True)
    # 120 unsubscribes in one group, all in the buffer before the first tick: 3 batches.
    rows = [row("news", "email", identifier("email", n), "unsubscribed") for n in range(120)]
    enqueue(rows)
    processes.worker("w1", concurrency=4, extra_env=extra)
    start_beat(processes, "beat", extra)

    wait_drained(sim, processes, timeout=60)
    entries = dead_letters()
    assert sorted(len(entry.identifiers) for entry in entries) == [20, 50, 50]
    assert all(entry.attempts == attempts for entry in entries), [e.as_dict() for e in entries]
    assert all("503" in entry.error for entry in entries), [e.error for e in entries]
    stats = sim_stats(sim)
    assert stats["server_errors"] == 3 * attempts, stats
    assert stats["requests_total"] == 3 * attempts, stats
    dead = {("news", "email", identifier("email", n)): "unsubscribed" for n in range(120)}
    assert_final(sim, dead, dead=dead)


# --------------------------------------------------------------------------------------
# 2. Random 500s while waves flip the same identifiers
# --------------------------------------------------------------------------------------


def test_random_server_errors_over_flipping_waves(env, sim, processes):
    rng = random.Random(2)
    faults(sim, error_rate=0.1)
    processes.worker("w1", concurrency=8)
    start_beat(processes, "beat", {})

    expected: dict[Slot, str] = {}
    for _wave in range(4):
        before = sim_stats(sim)["requests_total"]
        enqueue(random_rows(rng, 750, 250, expected))
        wait_for(
            lambda before=before: sim_stats(sim)["requests_total"] >= before + 5,
            timeout=20,
            what="some requests of this wave",
        )

    wait_drained(sim, processes, timeout=60)
    stats = assert_final(sim, expected)
    assert stats["server_errors"] > 0
    print(
        f"error_rate 0.1: {len(expected)} identifiers, {stats['requests_total']} requests, "
        f"{stats['server_errors']} 500s, {stats['requests_ok']} ok"
    )


# --------------------------------------------------------------------------------------
# 3. One poison identifier
# --------------------------------------------------------------------------------------


def poison_run(sim: Any, processes: Any, switch: str) -> tuple[dict[str, Any], int, int]:
    """One poison email among ~500 others, refused by the simulator's `switch` (`reject`:
    the 400 names it; `reject_anonymous`: it names nothing). Returns the simulator's stats
    (with the request log), the requests needed without the poison, and the size of the
    batch the poison was in (its first 400)."""
    rng = random.Random(3)
    poison = identifier("email", 137)
    faults(sim, **{switch: [poison]})
    processes.worker("w1", concurrency=8)

    expected: dict[Slot, str] = {}
    rows = []
    for _ in range(500):
        value = identifier("email", rng.randrange(600))
        state = rng.choice(STATES)
        rows.append(row("news", "email", value, state))
        expected[("news", "email", value)] = state
    poison_slot = ("news", "email", poison)
    if poison_slot not in expected:
        rows.append(row("news", "email", poison, "unsubscribed"))
        expected[poison_slot] = "unsubscribed"
    # All of it is in the buffer before the first tick: batches are as full as they can be.
    enqueue(rows)
    start_beat(processes, "beat", {})

    wait_drained(sim, processes, timeout=30)
    assert_final(sim, expected, dead={poison_slot: expected[poison_slot]})
    (entry,) = dead_letters()
    assert entry.identifiers == [{"kind": "email", "value": poison}]
    if switch == "reject":
        assert poison in entry.error, entry.error

    per_state = Counter(state for state in expected.values())
    needed = sum(math.ceil(count / 50) for count in per_state.values())
    stats = sim_stats(sim, log=True)
    refused = [r for r in stats["requests"] if r["status"] == 400]
    assert refused, stats["requests"][:5]
    return stats, needed, refused[0]["identifiers"]


def test_poison_email_is_dead_lettered_alone_at_small_cost(env, sim, processes):
    """Braze names the bad identifier: README's cost is exactly 2 extra requests."""
    stats, needed, size = poison_run(sim, processes, "reject")
    extra = stats["requests_total"] - needed
    print(
        f"poison (named): {needed} batches needed, {stats['requests_total']} requests "
        f"({stats['rejected_400']} 400s), extra {extra}, its batch held {size}"
    )
    assert extra == 2, (extra, needed, stats["rejected_400"])


def test_anonymous_poison_is_found_by_halving_at_its_cost(env, sim, processes):
    """Braze's 400 names nobody: the batch is halved down to the culprit. Each level costs
    two requests (the refused half and the good half), so a batch of n costs
    2·ceil(log2 n) extra at most and 2·floor(log2 n) at least (README: about 2·log2(50))."""
    stats, needed, size = poison_run(sim, processes, "reject_anonymous")
    extra = stats["requests_total"] - needed
    print(
        f"poison (anonymous): {needed} batches needed, {stats['requests_total']} requests "
        f"({stats['rejected_400']} 400s), extra {extra}, its batch held {size}"
    )
    assert size > 1
    low, high = 2 * math.floor(math.log2(size)), 2 * math.ceil(math.log2(size))
    assert low <= extra <= high, (extra, size, stats["rejected_400"])
    # k halvings: k + 1 refused requests (the singleton's included) and k good halves.
    assert extra % 2 == 0 and stats["rejected_400"] == extra // 2 + 1, stats["rejected_400"]


# --------------------------------------------------------------------------------------
# 4. A refused API key, fixed later
# --------------------------------------------------------------------------------------


def test_refused_key_spends_nothing_then_drains_when_fixed(env, sim, processes):
    rng = random.Random(4)
    probe = 0.5
    concurrency = 4
    extra = worker_env(CREDENTIALS_PROBE_SECONDS=probe)
    faults(sim, api_keys=["other"])
    processes.worker("w1", concurrency=concurrency, extra_env=extra)
    start_beat(processes, "beat", extra)

    expected: dict[Slot, str] = {}
    started = time.monotonic()
    enqueue(random_rows(rng, 300, 250, expected))
    wait_for(
        lambda: status(limiter=True).credentials_refused,
        timeout=20,
        what="posting to stop on the refused key",
    )
    first = sim_stats(sim)["unauthorized"]
    # Let a few probe intervals pass: one probe per interval, nothing more.
    wait_for(
        lambda: sim_stats(sim)["unauthorized"] >= first + 3,
        timeout=20,
        what="three more probes",
    )
    refused = status(limiter=True)
    stats = sim_stats(sim)
    elapsed = time.monotonic() - started
    assert "401" in (refused.credentials_refused or ""), refused
    assert stats["requests_total"] == stats["unauthorized"], stats
    # The first requests of every busy thread may go before the circuit opens.
    assert stats["unauthorized"] <= 1 + elapsed / probe + concurrency + 1, (stats, elapsed)
    records = batch_records()
    assert records
    assert all(record["attempts"] == 0 for record in records), records
    assert refused.dead_letter == 0

    faults(sim, api_keys=["other", SIM_KEY])
    wait_drained(sim, processes, timeout=30)
    final = assert_final(sim, expected)
    assert status(limiter=True).credentials_refused is None
    print(
        f"refused key: {stats['unauthorized']} 401s in {elapsed:.1f}s "
        f"(probe {probe}s); then {final['requests_ok']} requests ok"
    )


# --------------------------------------------------------------------------------------
# 5. Two beats at once, one killed
# --------------------------------------------------------------------------------------


def test_two_beats_and_a_killed_beat_post_each_change_at_most_once(env, sim, processes):
    rng = random.Random(5)
    processes.worker("w1", concurrency=4)
    beats = [start_beat(processes, "beat-a", {}), start_beat(processes, "beat-b", {})]

    expected: dict[Slot, str] = {}
    enqueued = 0
    distinct_per_wave = 0
    for wave in range(5):
        slots_seen: set[Slot] = set()
        rows = random_rows(rng, 600, 500, expected)
        for item in rows:
            kind = next(k for k in GROUPS if k in item)
            slots_seen.add((item["subscription_group_id"], kind, item[kind]))
        distinct_per_wave += len(slots_seen)
        before = sim_stats(sim)["requests_ok"]
        enqueued += enqueue(rows)
        wait_for(
            lambda before=before: sim_stats(sim)["requests_ok"] >= before + 3,
            timeout=20,
            what="some requests of this wave",
        )
        if wave == 2:
            processes.kill(beats[0])
            beats[0] = start_beat(processes, "beat-c", {})

    wait_drained(sim, processes, timeout=40)
    stats = assert_final(sim, expected)
    posted = sum(
        r["identifiers"] for r in sim_stats(sim, log=True)["requests"] if r["status"] == 201
    )
    # Within a wave, later rows of an identifier replace earlier ones before any cut; an
    # identifier may be posted once more per later wave that changed it. Nothing else.
    assert posted <= distinct_per_wave, (posted, distinct_per_wave, enqueued)
    print(
        f"two beats: {enqueued} changes, {distinct_per_wave} distinct per wave (summed), "
        f"{posted} identifiers posted in {stats['requests_ok']} requests"
    )


# --------------------------------------------------------------------------------------
# 6. Workers killed with SIGKILL while draining
# --------------------------------------------------------------------------------------


def test_worker_killed_repeatedly_while_draining(broker, env, sim, processes):
    """On each broker: REDIS_URL's Redis, and RabbitMQ (BROKER_URL, issue 24)."""
    rng = random.Random(6)
    extra = worker_env(HTTP_TIMEOUT_SECONDS=3, BATCH_CLAIM_SECONDS=6, BATCH_REDISPATCH_SECONDS=4)
    faults(sim, latency_ms=20)
    start_beat(processes, "beat", extra)

    expected: dict[Slot, str] = {}
    busy_at_kill = []
    for kill in range(3):
        enqueue(random_rows(rng, 750, 1000, expected))
        before = sim_stats(sim)["requests_ok"]
        worker = processes.worker(f"w{kill}", concurrency=4, extra_env=extra)
        target = before + rng.randint(1, 8)
        wait_for(
            lambda target=target: sim_stats(sim)["requests_ok"] >= target,
            timeout=30,
            what="progress before the kill",
        )
        busy_at_kill.append(status().batches_in_flight)
        processes.kill(worker)
    enqueue(random_rows(rng, 750, 1000, expected))
    processes.worker("w-last", concurrency=4, extra_env=extra)

    wait_drained(sim, processes, timeout=60)
    stats = assert_final(sim, expected)
    assert any(busy_at_kill), busy_at_kill
    print(
        f"kill -9 worker x3: batches in flight at each kill {busy_at_kill}; "
        f"{stats['requests_ok']} requests ok"
    )


# --------------------------------------------------------------------------------------
# 7. Redis killed and restarted (append-only persistence)
# --------------------------------------------------------------------------------------


class OwnRedis:
    """A redis-server with append-only persistence as shipped (`appendfsync everysec`) that a
    test may kill and restart.

    What a crash may lose with `everysec`: Redis writes every command to the append-only file
    (the kernel's page cache) before it answers, and only the fsync to disk waits for the
    next second. A killed Redis process (`kill -9`, the OOM killer, a crash) therefore loses
    nothing that was acknowledged; a power cut or kernel crash may lose the last second or
    two of acknowledged writes. This test kills the process, so it asserts nothing lost."""

    def __init__(self, directory: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.skip("redis-server not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [
            executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",  # as docker-compose.yml and deploy/k8s/redis.yaml ship
            "--dir",
            str(directory),
            "--save",
            "",
        ]
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.answers, timeout=20, what="redis-server to answer PING")

    def answers(self) -> bool:
        try:
            return bool(Redis.from_url(self.url, socket_timeout=1).ping())
        except RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = OwnRedis(directory)
    server.start()
    yield server
    server.kill()


def test_redis_restart_with_append_only_persistence(env, sim, own_redis, processes, monkeypatch):
    rng = random.Random(7)
    monkeypatch.setenv("REDIS_URL", own_redis.url)
    reset_services()
    extra = worker_env(
        REDIS_URL=own_redis.url,
        HTTP_TIMEOUT_SECONDS=3,
        BATCH_CLAIM_SECONDS=6,
        BATCH_REDISPATCH_SECONDS=4,
    )
    faults(sim, latency_ms=150)

    expected: dict[Slot, str] = {}
    enqueue(random_rows(rng, 1000, 800, expected))
    processes.worker("w1", concurrency=2, extra_env=extra)
    start_beat(processes, "beat", extra)
    wait_for(
        lambda: sim_stats(sim)["requests_ok"] >= 3,
        timeout=30,
        what="some batches delivered",
    )
    assert not drained()
    own_redis.kill()
    delivered_at_kill = sim_stats(sim)["requests_ok"]
    own_redis.start()
    reset_services()
    restarted = time.monotonic()
    assert status().enqueued_total == 1000  # the append-only file kept everything

    # The worker and beat must reconnect by themselves.
    wait_drained(sim, processes, timeout=40)
    recovered = time.monotonic() - restarted
    stats = assert_final(sim, expected)
    print(
        f"redis restart: {delivered_at_kill} requests ok before the kill, "
        f"{stats['requests_ok']} in all; drained {recovered:.1f}s after the restart"
    )


# --------------------------------------------------------------------------------------
# 8. A worker killed in the middle of a coalescer tick
# --------------------------------------------------------------------------------------


@pytest.mark.alone  # a change within 5 s of the kill: timed
def test_worker_killed_mid_tick_does_not_stall_coalescing(env, sim, processes):
    found = services()
    client, lock = found.redis, found.keys.coalesce_lock
    start_beat(processes, "beat", {})

    # Kill the only worker while its tick holds the lock. Pausing writes for the moment of
    # the kill keeps the tick from releasing it in between (reads go on).
    for attempt in range(5):
        worker = processes.worker(f"w{attempt}", concurrency=2)
        wait_for(
            lambda: client.exists(lock),
            timeout=20,
            interval=0.001,
            what="a tick to hold the coalescer lock",
        )
        client.client_pause(5000, all=False)
        try:
            processes.kill(worker)
        finally:
            client.client_unpause()
        if client.exists(lock):
            break
    else:
        pytest.fail("could not kill a worker in the middle of a tick")
    left_ms = client.pttl(lock)

    processes.worker("w-new", concurrency=2)
    expected = {("news", "email", identifier("email", 1)): "unsubscribed"}
    enqueue([row("news", "email", identifier("email", 1), "unsubscribed")])
    started = time.monotonic()
    wait_for(lambda: sim_states(sim) == expected, timeout=45, what="the change in Braze")
    delay = time.monotonic() - started
    wait_drained(sim, processes, timeout=10)
    assert_final(sim, expected)
    print(f"killed mid-tick: lock left for {left_ms} ms; one change took {delay:.1f}s")
    # Linger (0.3 s) plus a tick (0.2 s) in normal operation; a few seconds is generous.
    assert delay < 5, f"a change took {delay:.1f}s behind the dead tick's lock ({left_ms} ms)"
