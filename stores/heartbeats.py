"""Worker liveness in Redis: one heartbeat key per worker process, with a short expiry.

A worker process beats every `HEARTBEAT_INTERVAL_SECONDS`; its key expires
`HEARTBEAT_TTL_SECONDS` after the last beat. A process killed with SIGKILL, OOM-killed,
frozen (SIGSTOP, a paused container) or cut off from Redis stops beating, and the
coalescer's tick takes back the batches it held (`BatchStore.take_back`). The same beat
extends the leases of the claims the process is posting (`heartbeat.lua`).
"""

from __future__ import annotations

from collections.abc import Iterable

from redis import Redis

from stores.clock import server_time_ms
from stores.keys import Keys
from stores.scripts import Scripts


def beat_alive(client: Redis, keys: Keys) -> None:
    """Beat is running now (Redis's clock). Beat only schedules: the coalescer's ticks run
    on the workers, so the last tick's age alone cannot tell which of the two is missing."""
    client.set(keys.beat_seen, server_time_ms(client))


class Heartbeats:
    def __init__(self, client: Redis, keys: Keys, scripts: Scripts | None = None) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts or Scripts(client)

    def beat(
        self,
        worker_id: str,
        ttl_ms: int,
        *,
        claims: Iterable[tuple[str, str]] = (),
        lease_ms: int = 0,
    ) -> int:
        """Say `worker_id` is alive for `ttl_ms`, and extend to `lease_ms` from now the
        leases of `claims` ((batch id, token) pairs) still held; returns how many."""
        k = self.keys
        args: list[str | int] = [worker_id, ttl_ms, lease_ms]
        for batch_id, token in claims:
            args += [batch_id, token]
        return int(
            self.scripts.heartbeat(
                keys=[k.heartbeat(worker_id), k.workers, k.claims, k.claim_tokens], args=args
            )
        )

    def stop(self, worker_id: str) -> None:
        """A clean exit: the worker is gone now, not in `ttl` seconds. It stays listed (with
        no beat) until the tick has taken back whatever it still held."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.heartbeat(worker_id))
        pipe.zadd(self.keys.workers, {worker_id: 0}, xx=True)
        pipe.execute()

    def suspects(self, now_ms: int, ttl_ms: int) -> list[str]:
        """Workers whose last beat is older than the heartbeat's lifetime: dead, unless a
        beat lands right now (take_back.lua checks each heartbeat key in the same step)."""
        ids = self.client.zrangebyscore(self.keys.workers, "-inf", now_ms - ttl_ms)
        return [raw.decode() if isinstance(raw, bytes) else raw for raw in ids]

    def alive(self, worker_id: str) -> bool:
        return bool(self.client.exists(self.keys.heartbeat(worker_id)))
