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
from typing import NamedTuple, cast

import msgspec
from redis import Redis
from redis.exceptions import ConnectionError, NoScriptError, RedisError, TimeoutError
from redis.lock import Lock

from core.changes import (
    Change,
    ChangeFields,
    IdentifierKind,
    Lane,
    SubscriptionState,
    change_fields,
)
from core.planning import PendingChange, PlannedBatch, lane_prefix
from stores.base import ScriptedStore
from stores.batch_records import TOP_UP_LOOK_AT
from stores.history import Retention
from stores.keys import FIELD_SEPARATOR, Keys, buffer_field, identity_digest, split_field
from stores.replication import ReplicaWait, on_write_node, write_node
from stores.scripts import Scripts, encoded

# Changes per enqueue script call. Large enough that the round trip is amortised over many
# changes, small enough that one call never blocks Redis for more than a few milliseconds.
ENQUEUE_CHUNK = 1000
# Calls a pipelined enqueue keeps unanswered: while Redis runs one call's script (~5 µs a
# change), the importer encodes and sends the next (~4 µs a change) instead of waiting.
CALLS_IN_FLIGHT = 3
# The enqueue script's arguments per change (see `encode_change` and enqueue.lua).
ARGS_PER_CHANGE = 5

_LANE_BYTES: dict[Lane, bytes] = {lane: lane.value.encode() for lane in Lane}
_LANE_MARK: dict[Lane | None, bytes] = {Lane.LIVE: b"l", Lane.BULK: b"b", None: b"-"}
_SEP = FIELD_SEPARATOR.encode()


def encode_change(
    change: Change, *, respect_opt_out: bool = False
) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """The enqueue script's arguments for one change: the buffer's wire format, owned here.

    Five: the buffer field; the identifier's digest (`identity_digest`, which names its
    subject and history keys); the occurred time in ms (empty: Redis's clock stands in);
    the profile, the lane as one byte ("l", "b", or "-": the call's default lane) followed
    by the delay in ms; and the members of the pending change's JSON that the producer
    knows — "s" (state), "o" (double opt-in 0|1), and only when they say something "w"
    (occurred at), "d" (delay), "r" (respect opt-out), "c" (source) — which enqueue.lua
    completes with what only Redis knows. `respect_opt_out` sets "r" whatever the change
    says (`import --respect-opt-outs`). A call also names its changes' groups once
    (`call_groups`).

    Few arguments, much formatted here: each argument costs Redis ~850 instructions to
    parse and hand to Lua (callgrind, bench/enqueue_cost.py), so nine per change were a
    quarter of the script's cost; the formatting runs in the producer's process (for an
    import, in the validating processes, in parallel). The digest likewise: SHA-1 in
    Redis's Lua cost ~8,000 instructions a change. The script trusts all of it as it
    trusts the field.

    Encoding to bytes here (rather than letting redis-py do it) lets the import encode rows
    where they are validated, in parallel, and finds text UTF-8 cannot carry (a lone
    surrogate from a JSON escape) before anything is sent: raises `UnicodeEncodeError`.
    """
    return encode_fields(change_fields(change), respect_opt_out=respect_opt_out)


def encode_fields(
    fields: ChangeFields, *, respect_opt_out: bool = False
) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """`encode_change` of a change given as `core.changes.ChangeFields` (`parse_fields`'
    answer): the import encodes its rows without building a `Change` for each."""
    group_id, state, kind, value, double_opt_in, delay_seconds, occurred_ms, source = fields[:8]
    delay_ms = round(delay_seconds * 1000)
    members = _MEMBERS[state, double_opt_in]
    if occurred_ms is not None:
        occurred = b"%d" % occurred_ms
        members += b',"w":' + occurred
    else:
        occurred = b""
    if delay_ms > 0:
        members += b',"d":%d' % delay_ms
    if respect_opt_out or fields[8]:
        members += b',"r":1'
    if source:
        # As UTF-8 (ensure_ascii=False), as cjson wrote it; encode() raises on a lone
        # surrogate, which the import reports as a bad row. A printable text without a
        # quote or a backslash is its own JSON string: json.dumps' answer without the
        # call (~1 us a row; printable excludes every character JSON escapes).
        if source.isprintable() and '"' not in source and "\\" not in source:
            members += b',"c":"' + source.encode() + b'"'
        else:
            members += b',"c":' + json.dumps(source, ensure_ascii=False).encode()
    return (
        buffer_field(group_id, kind, value).encode(),
        identity_digest(kind.value, value).encode(),
        occurred,
        b"%s%d" % (_LANE_MARK[fields[9]], delay_ms),
        members,
    )


_MEMBERS: dict[tuple[SubscriptionState, bool], bytes] = {
    (state, double): b'"s":%s,"o":%d' % (json.dumps(state.value).encode(), double)
    for state in SubscriptionState
    for double in (False, True)
}


def call_groups(args: Sequence[bytes]) -> list[bytes]:
    """What one enqueue call sends before its changes (`args`, encoded): how many groups
    they name, then those groups, each once (enqueue.lua adds them to the groups set in
    one SADD rather than finding each change's group in Lua)."""
    groups = list(dict.fromkeys(field[: field.index(_SEP)] for field in args[::ARGS_PER_CHANGE]))
    return [b"%d" % len(groups), *groups]


class PackedChanges(NamedTuple):
    """Encoded changes (`encode_change`) already in the Redis protocol (RESP bulk strings,
    back to back), with the groups they name: a piece of an enqueue call. The import packs
    them in its validating processes, in parallel, so the importing process only joins
    pieces into calls and writes bytes to the socket (redis-py packed each of the ~5,000
    arguments of a call in Python, in the one process every call goes through)."""

    changes: int
    groups: tuple[bytes, ...]
    body: bytes


def _bulk(args: Iterable[bytes]) -> bytes:
    return b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args])


_CHANGE_BULKS = b"$%d\r\n%s\r\n" * ARGS_PER_CHANGE


def _bulk_changes(args: Sequence[bytes]) -> bytes:
    """`_bulk` of whole changes: one formatting a change rather than one an argument."""
    five = [iter(args)] * ARGS_PER_CHANGE
    return b"".join(
        [
            _CHANGE_BULKS % (len(a), a, len(b), b, len(c), c, len(d), d, len(e), e)
            for a, b, c, d, e in zip(*five, strict=True)
        ]
    )


def pack_changes(args: Sequence[bytes], size: int = ENQUEUE_CHUNK) -> list[PackedChanges]:
    """Encoded changes cut into pieces of at most `size` changes, in order."""
    step = size * ARGS_PER_CHANGE
    pieces = []
    for start in range(0, len(args), step):
        part = args[start : start + step]
        groups = dict.fromkeys(field[: field.index(_SEP)] for field in part[::ARGS_PER_CHANGE])
        pieces.append(
            PackedChanges(len(part) // ARGS_PER_CHANGE, tuple(groups), _bulk_changes(part))
        )
    return pieces


def unpack_changes(piece: PackedChanges) -> list[bytes]:
    """The encoded changes of a piece: `pack_changes`' inverse."""
    args: list[bytes] = []
    body, at = piece.body, 0
    while at < len(body):
        end = body.index(b"\r\n", at)
        length = int(body[at + 1 : end])
        args.append(body[end + 2 : end + 2 + length])
        at = end + 4 + length
    return args


def encode_changes(changes: Iterable[Change]) -> list[bytes]:
    args: list[bytes] = []
    for change in changes:
        args += encode_change(change)
    return args


def _chunks(items: Iterable[Change], size: int) -> Iterator[list[Change]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


_KINDS = {kind.value: kind for kind in IdentifierKind}
_STATES = {state.value: state for state in SubscriptionState}


class _Due(msgspec.Struct, gc=False):
    """What the planning needs of a pending change's JSON (enqueue.lua's layout; fields
    it does not name are skipped). Not strict: a number written as a float by cjson
    (1.0) still reads as an int, and "o" as 0 or 1 (enqueue.lua's) or a JSON boolean
    reads as a bool (any other number fails the decode: `_decoded_one_by_one`)."""

    s: SubscriptionState
    o: bool
    q: int
    t: int


_DUE_LIST = msgspec.json.Decoder(list[_Due], strict=False)


def _decoded_one_by_one(read: list[tuple[bytes, bytes]]) -> list[PendingChange]:
    """`read_due`'s changes decoded one by one with the json module: for a read whose
    batch decode failed (a change the layout does not describe), which raises here as
    such a change always did."""
    changes = []
    for raw_field, payload in read:
        group_id, kind, value = split_field(raw_field.decode())
        data = json.loads(payload.decode())
        changes.append(
            PendingChange(
                group_id,
                _KINDS[kind],
                value,
                _STATES[data["s"]],
                bool(data["o"]),
                int(data["q"]),
                int(data["t"]),
            )
        )
    return changes


class Buffer(ScriptedStore):
    """`wait`: the replicas that must acknowledge each enqueue call (REDIS_WAIT_REPLICAS,
    `stores.replication`); none by default."""

    stale = 0  # changes this buffer's `enqueue` calls dropped as stale, so far

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        scripts: Scripts | None = None,
        retention: Retention | None = None,
        wait: ReplicaWait | None = None,
    ) -> None:
        super().__init__(client, keys, scripts, retention)
        self.wait = wait or ReplicaWait()

    def _enqueue_keys(self) -> list[str]:
        k = self.keys
        return [
            k.seq,
            k.pending,
            k.due,
            k.inflight,
            k.stats,
            k.dead_letter_fields,
            k.groups,
            k.coalesce_nudge,
            k.due_live,
            k.coalesce_nudge_live,
        ]

    def _enqueue_head(self, lane: Lane) -> list[bytes]:
        """The enqueue script's arguments before the changes: retention, history bound and
        the lane of the changes that name none."""
        r = self.retention
        return [
            b"%d" % r.watermark_ms,
            b"%d" % r.history_ms,
            b"%d" % r.history_max_events,
            _LANE_BYTES[lane],
        ]

    def enqueue(
        self,
        changes: Iterable[Change],
        *,
        chunk_size: int = ENQUEUE_CHUNK,
        lane: Lane = Lane.LIVE,
    ) -> int:
        """Add changes in order (the one that occurred last per identifier wins; equal times:
        the later); returns how many were given. Those older than a change already accepted
        are dropped as stale (counted in `self.stale`, `status` and the history). `lane`
        is the lane of the changes that name none.

        Each chunk is one atomic script call; callers that need all-or-nothing validate
        everything before calling (the producer API does). With `wait` on, each call is
        followed by WAIT on its connection, and a call too few replicas acknowledged
        raises `NotReplicated` (the chunks before it were acknowledged).
        """
        count = 0
        keys = self._enqueue_keys()
        head = self._enqueue_head(lane)
        for chunk in _chunks(changes, chunk_size):
            changes = encode_changes(chunk)
            args = head + call_groups(changes) + changes
            if self.wait.on:
                _last, stale = self._acknowledged(keys, args, len(chunk))
            else:
                _last, stale = self.scripts.enqueue(keys=keys, args=args)
            self.stale += int(stale)
            count += len(chunk)
        return count

    def _acknowledged(self, keys: list[str], args: list[bytes], changes: int) -> list[bytes]:
        """One enqueue call and `WAIT` in one pipeline, on one connection of the node that
        takes the workspace's writes (`on_write_node`, which follows a failover): one
        round trip. EVALSHA first; a node that does not know the script (restarted, a
        promoted replica) answers NOSCRIPT and writes nothing, and the pair goes again as
        EVAL with the source."""
        script = self.scripts.enqueue

        def call(node: Redis) -> list[bytes]:
            for sent in (("EVALSHA", script.sha), ("EVAL", script.script)):
                pipe = node.pipeline(transaction=False)
                pipe.execute_command(*sent, len(keys), *keys, *args)
                pipe.execute_command(*self.wait.command())
                reply, acknowledged = pipe.execute(raise_on_error=False)
                if isinstance(reply, NoScriptError):
                    continue
                if isinstance(reply, Exception):
                    raise reply
                if isinstance(acknowledged, Exception):
                    raise acknowledged
                self.wait.check(acknowledged, changes)
                return list(reply)
            raise NoScriptError("the enqueue script was refused as EVAL too")

        return on_write_node(self.client, self.keys.pending, call)

    def tick_lock(self, timeout_seconds: float, *, live_only: bool = False) -> Lock:
        """The lock coalescer ticks take turns with (not blocking: a tick that finds it
        held is skipped); `live_only`: the one live-only ticks take turns with."""
        k = self.keys
        name = k.coalesce_lock_live if live_only else k.coalesce_lock
        return self.client.lock(name, timeout=timeout_seconds, blocking=False)

    def mark_tick(self, now_ms: int) -> None:
        """When the coalescer last made progress (the exporter's "no coalescer tick")."""
        self.client.set(self.keys.coalesce_last_tick, now_ms)

    def wait_for_nudge(self, timeout_seconds: float, *, live_only: bool = False) -> bool:
        """Block until a producer nudges or `timeout_seconds` pass; True if nudged.
        `live_only`: only a live change's nudge wakes it (a backlog drains at the beat)."""
        if timeout_seconds <= 0:
            return False
        k = self.keys
        lists = [k.coalesce_nudge_live] if live_only else [k.coalesce_nudge_live, k.coalesce_nudge]
        return self.client.blpop(lists, timeout=timeout_seconds) is not None

    def pipelined(self, lane: Lane = Lane.BULK) -> PipelinedEnqueue:
        """An enqueue for streams of already-encoded changes (the bulk import): same order
        and per-call atomicity as `enqueue`, with calls overlapping their round trips.
        `lane` is the lane of the changes that name none."""
        return PipelinedEnqueue(self, lane)

    def read_due(
        self, now_ms: int, limit: int, lane: Lane | None = None, *, offset: int = 0
    ) -> tuple[list[PendingChange], bool]:
        """The lane's oldest due changes not locked by a batch (no lane: live's, then
        bulk's); True if more were left unread. `offset`: skip that many of the oldest
        (one lane only: a read that goes on from an earlier one)."""
        if lane is None:
            assert not offset, "a read of both lanes starts at the oldest"
            live, more = self.read_due(now_ms, limit, Lane.LIVE)
            if more:
                return live, more
            bulk, more = self.read_due(now_ms, limit - len(live), Lane.BULK)
            return live + bulk, more
        due = self.keys.due_live if lane is Lane.LIVE else self.keys.due
        fields: list[bytes] = self.client.zrangebyscore(
            due, "-inf", now_ms, start=offset, num=limit + 1
        )
        more = len(fields) > limit
        fields = fields[:limit]
        if not fields:
            return [], False
        payloads: list[bytes | None] = self.client.hmget(self.keys.pending, fields)
        # Per change, on every tick of a backlog (issue 26: read 1.3-2 times a change): the
        # pending changes' JSON decoded in one call, straight into the four members the
        # planning needs (`_Due`; the others are skipped unread), the field split once, the
        # change a named tuple. json.loads a change and a dict's look-ups cost ~3 times
        # msgspec's one decode of the lot (orjson, also C, still builds every dict: ~2x).
        # No pair of field and payload is made a change unless one is gone (the seventh
        # step: each was one more object the garbage collector tracks).
        if None in payloads:  # taken by a concurrent coalescer since
            kept = [(f, p) for f, p in zip(fields, payloads, strict=True) if p is not None]
            fields = [field for field, _ in kept]
            payloads = [payload for _, payload in kept]
        present = cast("list[bytes]", payloads)
        try:
            dues = _DUE_LIST.decode(b"[" + b",".join(present) + b"]")
        except msgspec.MsgspecError:
            return _decoded_one_by_one(list(zip(fields, present, strict=True))), more
        kinds, sep = _KINDS, FIELD_SEPARATOR
        changes: list[PendingChange] = []
        append = changes.append
        for raw_field, due in zip(fields, dues, strict=True):
            group_id, kind, value = raw_field.decode().split(sep, 2)
            append(PendingChange(group_id, kinds[kind], value, due.s, due.o, due.q, due.t))
        return changes, more

    def take(
        self,
        packs: Sequence[Sequence[PlannedBatch]],
        redispatch_ms: int,
        lane: Lane = Lane.BULK,
        *,
        top_up_to: int = 0,
        ids: Sequence[str] | None = None,
    ) -> list[list[tuple[str, int]]]:
        """Move planned batches out of the buffer into batch records, in one round trip.

        `packs` groups the batches that may share one v2 request (see `pack_batches`); each
        record lists its pack. The batches' ids carry their `lane` (`core.planning`).
        A batch that travels alone and comes out short of `top_up_to` members is topped up
        in its take with due changes of its kind (take_batch.lua; 0: not topped up).
        Returns, pack by pack, (batch id, members taken) for every batch that took at least
        one member (packs that took nothing are left out).
        `ids`: the batches' ids, one a batch in order (`new_batch_ids`; None: new ones).
        A take sent again with the same ids after its reply was lost takes nothing more
        and answers what its first run took (take_batch.lua; the coalescer's resend).
        """
        batches = [batch for pack in packs for batch in pack]
        if not batches:
            return []
        k = self.keys
        if ids is None:
            ids = self.new_batch_ids(len(batches), lane)
        if len(ids) != len(batches):
            raise ValueError(f"{len(ids)} batch ids for {len(batches)} batches")
        pack_of: list[str] = []
        start = 0
        for pack in packs:
            siblings = ids[start : start + len(pack)]
            pack_of += [json.dumps(siblings)] * len(pack)
            start += len(pack)
        # The keys and arguments every batch of the take shares, encoded once a take:
        # redis-py encodes a text or number argument in Python (~0.35 us), bytes as they are.
        pending, due, inflight, batches_key, stats, due_live, short = encoded(
            [k.pending, k.due, k.inflight, k.batches, k.stats, k.due_live, k.short_batches]
        )
        shared = encoded(
            [
                redispatch_ms,
                *self.retention.history_args,
                self.retention.subject_ms,
                top_up_to,
                TOP_UP_LOOK_AT,
            ]
        )
        redispatch, tail = shared[0], shared[1:]
        sep = FIELD_SEPARATOR
        pipe = self.client.pipeline(transaction=False)
        for batch_id, batch, pack_json in zip(ids, batches, pack_of, strict=True):
            key = batch.key
            args: list[str | int | bytes] = [
                batch_id,
                key.group_id,
                key.state.value,
                key.kind.value,
                b"1" if key.double_opt_in else b"0",
                redispatch,
                pack_json,
                *tail,
                # The members in one argument (take_batch.lua ARGV[13]): redis-py encodes
                # each argument in Python, ~1.5 us apiece, two a member before. Formatted
                # as text and encoded once (a member's bytes formatting cost ~1.4x).
                sep.join([f"{m.value}{sep}{m.seq}" for m in batch.members]).encode(),
            ]
            self.scripts.take_batch(
                keys=[
                    pending,
                    due,
                    inflight,
                    batches_key,
                    k.batch(batch_id),
                    stats,
                    due_live,
                    short,
                ],
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

    @staticmethod
    def new_batch_ids(count: int, lane: Lane = Lane.BULK) -> list[str]:
        """`count` new batch ids carrying `lane` (`core.planning.lane_prefix`), for `take`."""
        prefix = lane_prefix(lane)
        return [prefix + uuid.uuid4().hex for _ in range(count)]

    def pending_count(self) -> int:
        """Distinct group + identifier pairs waiting, not yet in a batch."""
        return int(self.client.hlen(self.keys.pending))

    def inflight_count(self) -> int:
        """Identifiers in batches not yet acknowledged by Braze."""
        return int(self.client.hlen(self.keys.inflight))

    def has_due(self, lane: Lane, now_ms: int) -> bool:
        """Whether any of `lane`'s changes is due at `now_ms` (one ZCOUNT)."""
        due = self.keys.due_live if lane is Lane.LIVE else self.keys.due
        return bool(self.client.zcount(due, "-inf", now_ms))

    def lanes(self, now_ms: int) -> dict[str, dict[str, int | float]]:
        """Per lane: `pending`, the changes waiting to be cut (not behind a batch in flight,
        whose end makes them due), and `oldest_seconds`, how long the oldest due one has
        been due (0 when none is). One round trip."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        for due in (k.due_live, k.due):
            pipe.zcard(due)
            pipe.zrange(due, 0, 0, withscores=True)
        live_count, live_first, bulk_count, bulk_first = pipe.execute()
        return {
            Lane.LIVE.value: lane_figures(now_ms, live_count, live_first),
            Lane.BULK.value: lane_figures(now_ms, bulk_count, bulk_first),
        }


def lane_figures(
    now_ms: int, count: int, first: list[tuple[bytes, float]]
) -> dict[str, int | float]:
    """One lane's `pending` and `oldest_seconds` from its due set's ZCARD and lowest entry
    (ZRANGE 0 0 WITHSCORES), read in the caller's round trip."""
    oldest = max(0.0, (now_ms - first[0][1]) / 1000) if first else 0.0
    return {"pending": int(count), "oldest_seconds": round(oldest, 3)}


class PipelinedEnqueue:
    """Sends enqueue-script calls of up to `ENQUEUE_CHUNK` changes, in the order given, on a
    connection of its own, with up to `CALLS_IN_FLIGHT` calls unanswered. A call is written
    to the socket as bytes: the script's head, packed once, its groups, and the changes
    as packed (`PackedChanges`: by the caller, `add_packed`, or here, `add`).

    Redis runs one connection's commands in the order sent, so the order of the changes and
    the atomicity of each call are those of `Buffer.enqueue`; only the waiting overlaps.
    Calls are EVAL with the script's source rather than EVALSHA: a Redis that has forgotten
    the script (restarted, SCRIPT FLUSH) leaves no NOSCRIPT replies to sort out among the
    calls in flight, for ~1.5 KB more per call of ~80 KB. Use it as a context manager: on an
    error the connection is dropped, unread replies and all. `count` is the changes Redis
    has confirmed (`stale` of them dropped as older than a change already accepted);
    `prefix` those of them sent before the first call Redis refused (all of them while
    none was); `sent` those handed to it.

    The connection is one of the node that takes the workspace's writes (`write_node`: on
    a Redis Cluster, the master of its slot). With the buffer's `wait` on, every call is
    followed by WAIT on the connection, and a call's changes count as confirmed once its
    WAIT says enough replicas have them (`NotReplicated` otherwise).
    """

    def __init__(self, buffer: Buffer, lane: Lane = Lane.BULK) -> None:
        node = write_node(buffer.client, buffer.keys.pending)
        self._client = Redis(connection_pool=node.connection_pool, single_connection_client=True)
        self._wait = buffer.wait
        self._connection = self._client.connection
        assert self._connection is not None
        self._buffer = buffer
        self._keys = buffer._enqueue_keys()
        head = [
            "EVAL",
            buffer.scripts.enqueue.script,
            len(self._keys),
            *self._keys,
            *buffer._enqueue_head(lane),
        ]
        self._head_count = len(head)
        encoder = self._client.connection_pool.get_encoder()
        self._head_body = b"".join(
            [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in map(encoder.encode, head)]
        )
        self._queued: list[PackedChanges] = []  # the next call's pieces, not yet sent
        self._queued_changes = 0
        self._unanswered: list[int] = []  # changes per call sent and not yet answered
        self.sent = 0
        self.count = 0
        self.stale = 0
        self.prefix = 0  # of `count`, those sent before any call Redis refused
        self._failed = False

    def __enter__(self) -> PipelinedEnqueue:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and self._connection is not None:
            self._connection.disconnect()
        self._client.close()

    def add(self, args: list[bytes]) -> None:
        """Queue encoded changes (`encode_changes`); every full call's worth is sent."""
        self.add_packed(pack_changes(args))

    def add_packed(self, pieces: Iterable[PackedChanges]) -> None:
        """Queue changes packed already (`pack_changes`), in order; every full call's worth
        is sent. Pieces are joined into calls of up to `ENQUEUE_CHUNK` changes."""
        for piece in pieces:
            if self._queued_changes + piece.changes > ENQUEUE_CHUNK:
                self._send()
            self._queued.append(piece)
            self._queued_changes += piece.changes
            if self._queued_changes >= ENQUEUE_CHUNK:
                self._send()

    def finish(self) -> None:
        """Send what is queued and wait until Redis has applied every call."""
        if self._queued:
            self._send()
        while self._unanswered:
            self._answer()

    def _send(self) -> None:
        assert self._connection is not None
        pieces, changes = self._queued, self._queued_changes
        self._queued, self._queued_changes = [], 0
        groups = list(dict.fromkeys(group for piece in pieces for group in piece.groups))
        count = self._head_count + 1 + len(groups) + changes * ARGS_PER_CHANGE
        # No health check: its PING would read a reply meant for a call in flight.
        self._connection.send_packed_command(
            [
                b"*%d\r\n" % count,
                self._head_body,
                _bulk((b"%d" % len(groups), *groups)),
                *(piece.body for piece in pieces),
            ],
            check_health=False,
        )
        if self._wait.on:  # answered after the call, once the replicas have it
            self._connection.send_command(*self._wait.command(), check_health=False)
        self._unanswered.append(changes)
        self.sent += changes
        if len(self._unanswered) >= CALLS_IN_FLIGHT:
            self._answer()

    def settle(self) -> None:
        """After a failure (this enqueuer's or another's): read the answers to the calls
        still in flight, counting those Redis applied, until none is left or the
        connection is lost. A call refused (OOM: the calls in flight fill Redis's input
        buffer) may be followed by one applied, so `count` is then more than `prefix`.
        Nothing is sent."""
        while self._unanswered:
            try:
                self._answer()
            except (ConnectionError, TimeoutError):
                return
            except RedisError:
                continue

    def _answer(self) -> None:
        changes = self._unanswered.pop(0)
        try:
            try:
                _last, stale = self._client.parse_response(self._connection, "EVAL")
            finally:
                if self._wait.on:  # its answer follows the call's, refused or not
                    acknowledged = self._client.parse_response(self._connection, "WAIT")
            if self._wait.on:
                self._wait.check(acknowledged, changes)
        except (ConnectionError, TimeoutError):
            self._failed = True
            self._unanswered.clear()  # the connection is gone: no answer will come
            raise
        except RedisError:
            self._failed = True
            raise
        if not self._failed:
            self.prefix += changes
        self.stale += int(stale)
        self.count += changes
