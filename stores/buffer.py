"""The change buffer in Redis: where changes wait, newest per identifier, until batched.

Producers `enqueue` validated changes (one Redis round trip per chunk); the coalescer reads
the `due` ones and `take`s planned batches out of the buffer. See `stores/lua/` for the
atomic steps and `stores/keys.py` for the layout.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

from redis import Redis

from core.changes import Change, IdentifierKind, SubscriptionState
from core.planning import PendingChange, PlannedBatch
from stores.keys import Keys, buffer_field, split_field
from stores.scripts import Scripts

# Changes per enqueue script call. Large enough that the round trip is amortised over many
# changes, small enough that one call never blocks Redis for more than a few milliseconds.
ENQUEUE_CHUNK = 1000


def _chunks(items: Iterable[Change], size: int) -> Iterator[list[Change]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def server_time_ms(client: Redis) -> int:
    """Redis server time: the one clock every process agrees on."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class Buffer:
    def __init__(self, client: Redis, keys: Keys, scripts: Scripts | None = None) -> None:
        self.client = client
        self.keys = keys
        self.scripts = scripts or Scripts(client)

    def _enqueue_keys(self) -> list[str]:
        k = self.keys
        return [k.seq, k.pending, k.due, k.inflight, k.stats, k.dead_letter_fields]

    @staticmethod
    def _enqueue_args(changes: Sequence[Change]) -> list[str | int]:
        args: list[str | int] = []
        for change in changes:
            args += (
                buffer_field(change.group_id, change.kind, change.value),
                change.state.value,
                int(change.double_opt_in),
                round(change.delay_seconds * 1000),
            )
        return args

    def enqueue(self, changes: Iterable[Change], *, chunk_size: int = ENQUEUE_CHUNK) -> int:
        """Add changes in order (the last one per identifier wins); returns how many.

        Each chunk is one atomic script call; callers that need all-or-nothing validate
        everything before calling (the producer API does).
        """
        count = 0
        keys = self._enqueue_keys()
        for chunk in _chunks(changes, chunk_size):
            self.scripts.enqueue(keys=keys, args=self._enqueue_args(chunk))
            count += len(chunk)
        return count

    def read_due(self, now_ms: int, limit: int) -> tuple[list[PendingChange], bool]:
        """The oldest due changes not locked by a batch; True if more were left unread."""
        fields: list[bytes] = self.client.zrangebyscore(
            self.keys.due, "-inf", now_ms, start=0, num=limit + 1
        )
        more = len(fields) > limit
        fields = fields[:limit]
        if not fields:
            return [], False
        payloads = self.client.hmget(self.keys.pending, fields)
        changes: list[PendingChange] = []
        for raw_field, payload in zip(fields, payloads, strict=True):
            if payload is None:  # taken by a concurrent coalescer since the range read
                continue
            group_id, kind, value = split_field(raw_field.decode())
            data = json.loads(payload)
            changes.append(
                PendingChange(
                    group_id=group_id,
                    kind=IdentifierKind(kind),
                    value=value,
                    state=SubscriptionState(data["s"]),
                    double_opt_in=bool(data["o"]),
                    seq=int(data["q"]),
                    due_ms=int(data["t"]),
                )
            )
        return changes, more

    def take(
        self, packs: Sequence[Sequence[PlannedBatch]], redispatch_ms: int
    ) -> list[list[tuple[str, int]]]:
        """Move planned batches out of the buffer into batch records, in one round trip.

        `packs` groups the batches that may share one v2 request (see `pack_batches`); each
        record lists its pack. Returns, pack by pack, (batch id, members taken) for every
        batch that took at least one member (packs that took nothing are left out).
        """
        batches = [batch for pack in packs for batch in pack]
        if not batches:
            return []
        k = self.keys
        ids = [uuid.uuid4().hex for _ in batches]
        pack_of: list[str] = []
        start = 0
        for pack in packs:
            siblings = ids[start : start + len(pack)]
            pack_of += [json.dumps(siblings)] * len(pack)
            start += len(pack)
        pipe = self.client.pipeline(transaction=False)
        for batch_id, batch, pack_json in zip(ids, batches, pack_of, strict=True):
            args: list[str | int] = [
                batch_id,
                batch.key.group_id,
                batch.key.state.value,
                batch.key.kind.value,
                int(batch.key.double_opt_in),
                redispatch_ms,
                pack_json,
            ]
            for member in batch.members:
                args += (member.value, member.seq)
            self.scripts.take_batch(
                keys=[k.pending, k.due, k.inflight, k.batches, k.batch(batch_id), k.stats],
                args=args,
                client=pipe,
            )
        taken = iter(zip(ids, pipe.execute(), strict=True))
        result = []
        for pack in packs:
            members = [(bid, int(n)) for bid, n in (next(taken) for _ in pack) if int(n) > 0]
            if members:
                result.append(members)
        return result

    def pending_count(self) -> int:
        """Distinct group + identifier pairs waiting, not yet in a batch."""
        return int(self.client.hlen(self.keys.pending))

    def inflight_count(self) -> int:
        """Identifiers in batches not yet acknowledged by Braze."""
        return int(self.client.hlen(self.keys.inflight))
