"""Opt-out checks shared between batches: one read of Braze covers up to 100 identifiers,
two batches of 50, so a batch may find its check already done by the worker that posted
another batch of its group and kind a moment earlier.

Per batch, one short-lived key (`Keys.opt_out_read`):
- `claim <ms>`: a worker is reading Braze for it now (SET NX, so one reader per batch);
  it expires by itself if that worker dies;
- a result `{"t": read time ms, "read": [...], "unsubscribed": [...]}`: what Braze held
  then for the identifiers read, as digests (`digest`); it expires after the freshness
  limit, and readers also check its age against Redis's clock.
Single commands (SET NX / MGET / SET PX), so no script is needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from redis import Redis

from stores.batch_records import BatchRecord
from stores.keys import Keys, buffer_field

CLAIM = b"claim"


def digest(value: str) -> str:
    """What the result keeps of an identifier: enough to recognise it, not to read it
    (no email or phone number sits in these keys, not even for their 30 seconds)."""
    return hashlib.blake2b(value.encode(), digest_size=10).hexdigest()


@dataclass(frozen=True, slots=True)
class OptOutRead:
    read_ms: int
    read: frozenset[str]  # digests of the identifiers read
    unsubscribed: frozenset[str]  # digests of those Braze held as unsubscribed

    @classmethod
    def of(cls, read_ms: int, read: Iterable[str], unsubscribed: Iterable[str]) -> OptOutRead:
        return cls(read_ms, frozenset(map(digest, read)), frozenset(map(digest, unsubscribed)))

    def covers(self, values: Iterable[str], now_ms: int, max_age_ms: int) -> bool:
        return now_ms - self.read_ms <= max_age_ms and self.read.issuperset(map(digest, values))

    def holds_unsubscribed(self, value: str) -> bool:
        return digest(value) in self.unsubscribed


class OptOutReads:
    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def still_held(self, group_id: str, kind: str, holders: dict[str, str]) -> bool:
        """Whether each value is still locked by the batch it was read for (`holders`:
        value -> batch id), i.e. not erased by `forget` since: asked right before an
        opt-out read's first byte, so the read never names an erased identifier."""
        if not holders:
            return True
        values = list(holders)
        fields = [buffer_field(group_id, kind, value) for value in values]
        locks = self.client.hmget(self.keys.inflight, fields)
        return all(
            lock is not None and lock.decode() == holders[value]
            for value, lock in zip(values, locks, strict=True)
        )

    def get(self, batch_ids: Sequence[str]) -> list[OptOutRead | bytes | None]:
        """For each batch: its result, `CLAIM` while someone reads it, or None."""
        if not batch_ids:
            return []
        found: list[OptOutRead | bytes | None] = []
        for raw in self.client.mget([self.keys.opt_out_read(i) for i in batch_ids]):
            if raw is None or raw.startswith(CLAIM):
                found.append(raw[: len(CLAIM)] if raw else None)
                continue
            data = json.loads(raw)
            found.append(
                OptOutRead(int(data["t"]), frozenset(data["read"]), frozenset(data["unsubscribed"]))
            )
        return found

    def claim(self, batch_id: str, lease_ms: int) -> bool:
        """Become the one reader of this batch's check, unless someone is or has been."""
        return bool(self.client.set(self.keys.opt_out_read(batch_id), CLAIM, nx=True, px=lease_ms))

    def release(self, batch_ids: Iterable[str]) -> None:
        """Give claims back after a failed read, so that each batch reads for itself."""
        names = [self.keys.opt_out_read(i) for i in batch_ids]
        if names:
            # Only claims: a result another worker wrote meanwhile stays.
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
            current = pipe.execute()
            stale = [n for n, raw in zip(names, current, strict=True) if raw == CLAIM]
            if stale:
                self.client.delete(*stale)

    def store(self, results: dict[str, OptOutRead], ttl_ms: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for batch_id, result in results.items():
            payload = {
                "t": result.read_ms,
                "read": sorted(result.read),
                "unsubscribed": sorted(result.unsubscribed),
            }
            pipe.set(self.keys.opt_out_read(batch_id), json.dumps(payload), px=ttl_ms)
        pipe.execute()

    def upcoming(self, limit: int) -> list[BatchRecord]:
        """Batches cut and not finished, the oldest first (candidates to read along)."""
        ids = self.client.zrange(self.keys.batches, 0, limit - 1)
        if not ids:
            return []
        raws = self.client.mget([self.keys.batch(raw.decode()) for raw in ids])
        return [BatchRecord.from_json(raw) for raw in raws if raw is not None]
