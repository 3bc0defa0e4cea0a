"""The systems under comparison, behind one small interface: the environment and processes
of a run, how a producer hands them changes, and whether they still hold work."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from celery import Celery
from redis import Redis

from admin.status import read_status
from bench.workloads import Write
from core.changes import Change, IdentifierKind, SubscriptionState
from devtools.processes import CeleryProcess, ProcessGroup
from stores.buffer import Buffer
from stores.keys import Keys

# Recovery timers of braze-subs for the kill workloads, scaled down like the rate window (the
# defaults, 60 s claim and 120 s redispatch, would outlast the run); the same values as the
# kill -9 test in tests/e2e/test_faults.py.
FAST_RECOVERY = {
    "HTTP_TIMEOUT_SECONDS": "3",
    "BATCH_CLAIM_SECONDS": "6",
    "BATCH_REDISPATCH_SECONDS": "4",
}


class System(Protocol):
    name: str
    label: str

    def env(self, workers: int, fast_recovery: bool) -> dict[str, str]: ...

    def start(self, procs: ProcessGroup, workers: int) -> list[CeleryProcess]:
        """Start the processes; return the workers (the ones to wait for and to kill)."""
        ...

    def connect(self, redis_url: str) -> None: ...

    def enqueue(self, writes: Sequence[Write]) -> None: ...

    def idle(self) -> bool:
        """Nothing left to post: no change buffered, queued or held by a worker."""
        ...

    def leftovers(self) -> dict[str, int]: ...

    def in_workers(self) -> int:
        """Changes handed to workers and not finished (braze-subs: identifiers in unfinished
        batches; Celery: unacknowledged messages)."""
        ...


@dataclass
class BrazeSubs:
    version: str = "v1"
    name: str = ""
    label: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"braze-subs-{self.version}"
        self.label = self.label or f"braze-subs {self.version}"
        self._client: Redis | None = None
        self._keys = Keys("braze-subs")

    def env(self, workers: int, fast_recovery: bool) -> dict[str, str]:
        extra = FAST_RECOVERY if fast_recovery else {}
        return {"BRAZE_API_VERSION": self.version, "LOG_LEVEL": "INFO", **extra}

    def start(self, procs: ProcessGroup, workers: int) -> list[CeleryProcess]:
        started = [procs.worker(f"w{n}") for n in range(workers)]
        procs.beat()
        return started

    def connect(self, redis_url: str) -> None:
        self._client = Redis.from_url(redis_url)
        self._buffer = Buffer(self._client, self._keys)

    def enqueue(self, writes: Sequence[Write]) -> None:
        self._buffer.enqueue(
            [
                Change(w.group_id, SubscriptionState(w.state), IdentifierKind(w.kind), w.value)
                for w in writes
            ]
        )

    def idle(self) -> bool:
        assert self._client is not None
        status = read_status(self._client, self._keys)
        return status.pending == 0 and status.in_flight == 0

    def leftovers(self) -> dict[str, int]:
        assert self._client is not None
        status = read_status(self._client, self._keys)
        return {
            "buffered": status.pending,
            "in_flight": status.in_flight,
            "dead_lettered": status.dead_letter,
        }

    def in_workers(self) -> int:
        assert self._client is not None
        return read_status(self._client, self._keys).in_flight


# Kombu's Redis transport: the default queue, and the hash of delivered, unacknowledged
# messages (given back to the queue only after the visibility timeout, 1 h by default).
CELERY_QUEUE = "celery"
UNACKED = "unacked"


@dataclass
class CeleryAlternative:
    name: str
    label: str
    app: str  # module given to `celery -A`
    task: str

    def __post_init__(self) -> None:
        self._client: Redis | None = None
        self._producer: Celery | None = None

    def env(self, workers: int, fast_recovery: bool) -> dict[str, str]:
        return {"BENCH_WORKERS": str(workers)}

    def start(self, procs: ProcessGroup, workers: int) -> list[CeleryProcess]:
        return [procs.worker(f"w{n}", app=self.app) for n in range(workers)]

    def connect(self, redis_url: str) -> None:
        self._client = Redis.from_url(redis_url)
        self._producer = Celery("bench-producer", broker=redis_url)
        self._producer.conf.broker_connection_retry_on_startup = True

    def enqueue(self, writes: Sequence[Write]) -> None:
        assert self._producer is not None
        with self._producer.producer_or_acquire() as producer:
            for w in writes:
                self._producer.send_task(
                    self.task,
                    kwargs={
                        "group_id": w.group_id,
                        "state": w.state,
                        "kind": w.kind,
                        "value": w.value,
                    },
                    producer=producer,
                )

    def idle(self) -> bool:
        assert self._client is not None
        return self._client.llen(CELERY_QUEUE) == 0 and self._client.hlen(UNACKED) == 0

    def leftovers(self) -> dict[str, int]:
        assert self._client is not None
        return {
            "queued": int(self._client.llen(CELERY_QUEUE)),
            "unacked": int(self._client.hlen(UNACKED)),
        }

    def in_workers(self) -> int:
        assert self._client is not None
        return int(self._client.hlen(UNACKED))


def naive() -> CeleryAlternative:
    return CeleryAlternative(
        "naive", "naive (task per change)", "bench.alternatives.naive", "naive.set_status"
    )


def batched() -> CeleryAlternative:
    return CeleryAlternative(
        "celery-batches", "celery-batches", "bench.alternatives.batched", "batched.set_status"
    )


def systems_for(packing: bool) -> list[System]:
    """Fresh instances, braze-subs v1 first (the base of every ratio); v2 where the workload
    allows packing."""
    chosen: list[System] = [BrazeSubs("v1")]
    if packing:
        chosen.append(BrazeSubs("v2"))
    chosen += [naive(), batched()]
    return chosen
