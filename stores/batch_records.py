"""Batch records in Redis: claimed by one worker, then finished (delivered or dead) or deferred.

A batch record is written by `take_batch.lua` when its changes leave the buffer, and it
stays until Braze has acknowledged it or it has been dead-lettered. The Celery message that
posts it carries only the id; everything else is read here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from redis import Redis

from core.changes import IdentifierKind, SubscriptionState
from core.planning import BatchKey
from stores.history import Retention
from stores.keys import Keys
from stores.scripts import Scripts


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    key: BatchKey
    values: tuple[str, ...]
    attempts: int
    created_ms: int
    last_error: str | None = None
    pack: tuple[str, ...] = ()  # ids of the batches planned to share one v2 request
    # The members whose change asked to respect an opt-out Braze holds (`respect_opt_out`):
    # a `subscribed` change is not to be sent for them if Braze has them unsubscribed.
    respect_opt_out: frozenset[str] = frozenset()
    sibling: str | None = None  # the other half, when split without Braze naming anyone

    @classmethod
    def from_json(cls, raw: bytes | str) -> BatchRecord:
        data = json.loads(raw)
        return cls(
            id=data["id"],
            key=BatchKey(
                group_id=data["group"],
                state=SubscriptionState(data["state"]),
                kind=IdentifierKind(data["kind"]),
                double_opt_in=bool(data["doi"]),
            ),
            values=tuple(member[0] for member in data["members"]),
            attempts=int(data["attempts"]),
            created_ms=int(data["created"]),
            last_error=data.get("error"),
            # Lua's cjson writes an empty list as {}.
            pack=tuple(data.get("pack") or ()),
            respect_opt_out=frozenset(
                member[0] for member in data["members"] if len(member) > 2 and member[2]
            ),
            sibling=data.get("sibling") or None,
        )

    @property
    def size(self) -> int:
        return len(self.values)


class ClaimStatus(StrEnum):
    CLAIMED = "claimed"  # this worker may post it now
    GONE = "gone"  # already finished: nothing to do
    BUSY = "busy"  # another worker holds a live claim
    EMPTY = "empty"  # every member was superseded by a newer change; finished (the record
    # is returned as it was, for its pack)


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    record: BatchRecord | None = None


class BatchStore:
    def __init__(
        self,
        client: Redis,
        keys: Keys,
        scripts: Scripts | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts or Scripts(client)
        self.retention = retention or Retention()

    def _lock_keys(self, batch_id: str) -> list[str]:
        k = self.keys
        return [k.batch(batch_id), k.claim(batch_id), k.batches, k.pending, k.due, k.inflight]

    def claim(self, batch_id: str, token: str, lease_ms: int) -> Claim:
        reply = self.scripts.claim_batch(
            keys=self._lock_keys(batch_id),
            args=[batch_id, token, lease_ms, *self.retention.history_args],
        )
        status = ClaimStatus(reply[0].decode() if isinstance(reply[0], bytes) else reply[0])
        record = BatchRecord.from_json(reply[1]) if len(reply) > 1 else None
        return Claim(status, record)

    def fence(self, batch_ids: list[str], token: str, need_ms: int) -> bool:
        """True if `token` still holds every batch's claim with more than `need_ms` left:
        checked right before the request is sent (fence_batch.lua)."""
        keys = [self.keys.claim(batch_id) for batch_id in batch_ids]
        return bool(self.scripts.fence_batch(keys=keys, args=[token, need_ms]))

    def _finish(
        self,
        batch_id: str,
        token: str,
        outcome: str,
        error: str,
        http_status: int | None,
        latency_ms: float | None,
        sent: Iterable[str] | None = None,
        named: list[str] | None = None,
    ) -> int:
        k = self.keys
        r = self.retention
        keys = [
            *self._lock_keys(batch_id),
            k.dead_letters,
            k.dead_letter_index,
            k.dead_letter_identifiers,
            k.stats,
            k.dead_letter_fields,
        ]
        args: list[str | int | float] = [
            batch_id,
            token,
            outcome,
            error,
            json.dumps(named or []),
            "" if http_status is None else http_status,
            "" if latency_ms is None else round(latency_ms, 1),
            *r.history_args,
            r.subject_ms,
        ]
        args += ["all"] if sent is None else ["listed", *sent]
        return int(self.scripts.finish_batch(keys=keys, args=args))

    def delivered(
        self,
        batch_id: str,
        token: str,
        *,
        http_status: int | None = None,
        latency_ms: float | None = None,
        sent: Iterable[str] | None = None,
    ) -> int:
        """Braze accepted the batch: end it and let waiting newer changes become due.

        For the history: Braze's status and answer time; `sent`, the members actually in
        the request when some were left out (an opt-out Braze holds; None: all were)."""
        return self._finish(batch_id, token, "delivered", "", http_status, latency_ms, sent)

    def delivered_except(
        self,
        batch_id: str,
        token: str,
        named: list[str],
        error: str,
        *,
        http_status: int | None = None,
        latency_ms: float | None = None,
        sent: Iterable[str] | None = None,
    ) -> int:
        """Braze accepted the batch but its `errors` named some identifiers: those alone
        are dead-lettered (with `error`), the rest delivered, in one step."""
        return self._finish(
            batch_id, token, "delivered", error, http_status, latency_ms, sent, named
        )

    def dead_letter(
        self,
        batch_id: str,
        token: str,
        error: str,
        *,
        http_status: int | None = None,
        latency_ms: float | None = None,
    ) -> int:
        """Give up on the batch after a failed attempt: move it whole to the dead-letter
        store with its error and the attempts made (this one included)."""
        return self._finish(batch_id, token, "dead", error, http_status, latency_ms)

    def defer(
        self,
        batch_id: str,
        token: str,
        *,
        error: str,
        count_attempt: bool,
        redispatch_ms: int,
        solo: bool = False,
        http_status: int | None = None,
    ) -> int:
        """Release the claim after a failed try; returns the attempts so far (-1: not ours).
        `solo` takes the batch out of its v2 pack. After a post (`http_status`, or an
        attempt counted) the members' history records the retry."""
        k = self.keys
        return int(
            self.scripts.defer_batch(
                keys=[k.batch(batch_id), k.claim(batch_id), k.batches],
                args=[
                    batch_id,
                    token,
                    int(count_attempt),
                    error,
                    redispatch_ms,
                    "solo" if solo else "",
                    "" if http_status is None else http_status,
                    *self.retention.history_args,
                ],
            )
        )

    def split(
        self, batch_id: str, token: str, *, isolate: str | None, redispatch_ms: int
    ) -> tuple[str, str] | None:
        """Replace a refused batch by two halves (the first is `isolate` alone when it is a
        member); returns their ids, or None if the batch cannot be split."""
        k = self.keys
        first, second = uuid.uuid4().hex, uuid.uuid4().hex
        size = int(
            self.scripts.split_batch(
                keys=[
                    k.batch(batch_id),
                    k.claim(batch_id),
                    k.batches,
                    k.inflight,
                    k.batch(first),
                    k.batch(second),
                ],
                args=[batch_id, token, first, second, redispatch_ms, isolate or ""],
            )
        )
        return (first, second) if size > 0 else None

    def overdue(self, now_ms: int, limit: int = 1000) -> list[str]:
        """Batches whose task should have finished by now: their message was lost."""
        ids = self.client.zrangebyscore(self.keys.batches, "-inf", now_ms, start=0, num=limit)
        return [raw.decode() for raw in ids]

    def postpone(self, batch_ids: list[str], until_ms: int) -> None:
        """Push the sweep deadline of re-dispatched batches forward."""
        if batch_ids:
            self.client.zadd(self.keys.batches, dict.fromkeys(batch_ids, until_ms), xx=True)

    def count(self) -> int:
        """Batches cut and not yet finished."""
        return int(self.client.zcard(self.keys.batches))
