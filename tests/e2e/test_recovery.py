"""Issue 9's end-to-end tests: a stopped worker's batches go out again within seconds, a
worker that lost its claim never sends, a key rotation delivers at once. Real worker and
beat processes at the default settings (only the freeze lowers BRAZE_RATE_LIMIT: a tight
budget is its scenario, not a recovery timing). The scenarios live in `bench/recovery.py`
(the benchmark runs the same ones and prints the same figures); these tests assert on
them. Each ends by comparing the simulator with the last write of every identifier, the
order oracle, and an empty pipeline with no dead letter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from admin.status import read_status
from bench.recovery import (
    HEARTBEAT_TTL_SECONDS,
    LEASE_SECONDS,
    Fleet,
    Row,
    Sim,
    Slot,
    freeze,
    key_rotation,
    kill_and_term,
)
from delivery.services import services
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order

# alone: its figures (latency, shares of the budget, seconds to recover) are measured;
# under xdist nothing else runs meanwhile (tests/conftest.py, "Running in parallel").
pytestmark = [pytest.mark.slow, pytest.mark.alone]

# The goal of issue 9: the last identifier of a stopped worker's batches lands within this
# many seconds of the kill (HTTP_TIMEOUT_SECONDS of 10 s for a request that may be on the
# wire, then a tick and a post).
RECOVERY_GOAL_SECONDS = 15
# docker-compose's stop_grace_period: a SIGTERM'd worker must be gone well inside it.
STOP_GRACE_SECONDS = 30


@pytest.fixture
def sent() -> Iterator[EnqueuedLog]:
    log = EnqueuedLog()
    yield log
    log.clear()


@pytest.fixture
def fleet(default_env: dict[str, str]) -> Fleet:
    found = services()
    return Fleet(found.redis, found.keys)


def enqueuer(sent: EnqueuedLog) -> Any:
    def enqueue(rows: list[Row]) -> int:
        return enqueue_changes(sent.add(rows))

    return enqueue


def assert_settled(sim: Sim, fleet: Fleet, sent: EnqueuedLog, expected: dict[Slot, str]) -> None:
    """Braze holds the last write of every identifier and nothing else, no identifier got an
    older state after a newer one, nothing pending, in flight or dead-lettered."""
    actual = sim.states()
    wrong = {slot: (actual.get(slot), state) for slot, state in expected.items()}
    wrong = {slot: pair for slot, pair in wrong.items() if pair[0] != pair[1]}
    extra = set(actual) - set(expected)
    assert not wrong and not extra, (
        f"{len(wrong)} identifiers not in their last-written state (actual, expected), e.g. "
        f"{list(wrong.items())[:5]}; {len(extra)} unexpected"
    )
    assert_applied_in_order(sim.url, sent)
    status = read_status(fleet.client, fleet.keys)
    assert (status.pending, status.in_flight, status.batches_in_flight) == (0, 0, 0), status
    assert status.dead_letter == 0 and status.dead_letter_entries == 0, status
    assert not fleet.waiting() and not fleet.claimed(), (fleet.waiting(), fleet.claimed())
    assert sim.stats()["malformed"] == 0


def test_a_frozen_worker_thawed_sends_no_stale_state(default_env, sim, processes, fleet, sent):
    """Two workers, a tight budget so that claimed batches wait for their turn. One worker
    is frozen (SIGSTOP) while it holds such a batch, past its lease (BATCH_CLAIM_SECONDS),
    while a second wave flips the same 1,000 emails to `unsubscribed`; then thawed. Its
    batch was taken back once its heartbeat expired and the newer state delivered; thawed,
    it finds its claim gone and sends nothing: no identifier ends `subscribed`."""
    report = freeze(processes, fleet, Sim(sim.url), enqueuer(sent))
    print(f"freeze: {report.figures()}")
    assert report.frozen_batches >= 1 and report.frozen_identifiers >= 1
    assert report.frozen_seconds > LEASE_SECONDS
    # Taken back on the heartbeat, not the lease: the heartbeat's TTL, a tick, margin.
    assert report.freeze_to_taken_back < HEARTBEAT_TTL_SECONDS + 10, report.figures()
    assert report.stale_after_thaw == 0, report.figures()
    # Thawed, its posts of those batches found the claim gone: nothing sent or reported.
    assert report.thawed_reports == {"lost": report.frozen_batches}, report.figures()
    assert_settled(Sim(sim.url), fleet, sent, report.expected)


def test_kill_9_and_sigterm_mid_backlog_recover_within_seconds(
    broker, default_env, sim, processes, fleet, sent
):
    """Three workers drain 4,000 changes from slow answers (500 ms) with 10 % 500s. One
    is killed with SIGKILL and another gets SIGTERM while both hold claims: the killed
    worker's batches (some with a request on the wire) are taken back within the goal and
    land seconds later; the SIGTERM'd worker hands back what it has not sent and exits
    well inside a stop grace period; the backlog drains within seconds. On each broker:
    REDIS_URL's Redis, and RabbitMQ (BROKER_URL, issue 24)."""
    report = kill_and_term(processes, fleet, Sim(sim.url), enqueuer(sent), timeout=90)
    print(f"kill -9 + SIGTERM: {report.figures()}")
    assert report.killed_batches >= 1 and report.term_batches >= 1, report.figures()
    assert report.term_exit_code == 0, report.figures()
    assert report.term_exit_seconds <= STOP_GRACE_SECONDS, report.figures()
    # The goal: taken back from the dead worker, due now (a request it had on the wire
    # once that request has timed out, HTTP_TIMEOUT_SECONDS after its send).
    assert report.kill_to_taken_back <= RECOVERY_GOAL_SECONDS, report.figures()
    # Delivered: within the goal in most runs (11-13 s median, bench/recovery.py), but every
    # 500 on the re-post (10 % here) adds its retry's backoff (up to 2, 4, 8 s); their
    # identifiers' newer changes, locked behind them, follow after a linger. Bounded
    # generously (a loaded machine, the retry tail), printed.
    assert report.kill_to_batches_ended <= RECOVERY_GOAL_SECONDS * 2, report.figures()
    assert report.kill_to_last_arrival <= RECOVERY_GOAL_SECONDS * 2 + 5, report.figures()
    # The backlog drains with its own retries' backoff; well before the sweep's 120 s: no
    # message a stopped worker had fetched is left to the sweep.
    assert report.kill_to_drained <= 60, report.figures()
    assert_settled(Sim(sim.url), fleet, sent, report.expected)


def test_wrong_key_then_restart_with_the_right_key_delivers_within_seconds(
    default_env, sim, processes, fleet, sent
):
    """The runbook's key rotation: workers run with a key Braze refuses (401) until the
    whole backlog waits for reason 'credentials' (its next probe is a minute away); they
    are stopped (SIGTERM) and one is started with the right key: it delivers at once."""
    report = key_rotation(processes, fleet, Sim(sim.url), enqueuer(sent))
    print(f"key rotation: {report.figures()}")
    assert report.unauthorized >= 1
    assert set(report.waiting_before) == {"credentials"}, report.waiting_before
    assert all(seconds <= STOP_GRACE_SECONDS for seconds in report.old_exit_seconds)
    assert report.ready_to_first_delivery <= 5, report.figures()
    assert_settled(Sim(sim.url), fleet, sent, report.expected)
