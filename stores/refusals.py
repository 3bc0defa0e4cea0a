"""What Braze refuses: groups refused as a whole, the halves of a split waiting for their
sibling, and the API key (the credentials circuit, read here; opened and closed by the
budget's `circuit.lua`).

A *refusal* names a group + state + identifier kind whose batch Braze refused entirely (see
`core.refusal`). While it stands (`GROUP_REFUSAL_SECONDS`), a batch for it is dead-lettered
without a request: the workspace's budget, shared with every other Braze client, is not
spent on requests that cannot succeed. It is dead-lettered rather than held because a held
batch keeps its identifiers locked and counts against `MAX_BATCHES_IN_FLIGHT`, so a bad
producer would slowly stop every other group; a dead letter keeps its changes for `dlq
replay` (which lifts the refusal) and a newer change still wins over it. When the refusal
expires, the next batch is sent: one request tells whether the group exists by then.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis import Redis

from core.redaction import confine
from core.refusal import Sibling
from stores.clock import server_time_ms
from stores.keys import FIELD_SEPARATOR, Keys


def refusal_field(group_id: str, state: str, kind: str) -> str:
    return FIELD_SEPARATOR.join((group_id, state, kind))


@dataclass(frozen=True, slots=True)
class Refusal:
    group: str
    state: str
    kind: str
    detail: str
    since_ms: int
    until_ms: int

    @classmethod
    def from_json(cls, raw: bytes | str) -> Refusal:
        data = json.loads(raw)
        return cls(
            group=data["group"],
            state=data["state"],
            kind=data["kind"],
            detail=data.get("detail", ""),
            since_ms=int(data["since"]),
            until_ms=int(data["until"]),
        )


@dataclass(frozen=True, slots=True)
class KeyRefusal:
    """The deployment's credentials circuit while it is open: Braze refuses the key of
    `workspace` (endpoint host + a hash of the key). Not the view of one process: any
    worker's success with a working key ends it for every reader."""

    workspace: str
    reason: str
    since_ms: float
    probe_at_ms: float  # the refused key's next probe

    @classmethod
    def from_fields(cls, fields: list[bytes | None]) -> KeyRefusal | None:
        """From HMGET of `KEY_REFUSAL_FIELDS`; None while no key is refused."""
        workspace, reason, since, probe_at = fields
        if workspace is None:
            return None
        return cls(
            workspace=workspace.decode(),
            reason=(reason or b"").decode(),
            since_ms=float(since or 0),
            probe_at_ms=float(probe_at or 0),
        )


KEY_REFUSAL_FIELDS = ("workspace", "reason", "since", "probe_at")  # circuit.lua's names


def key_refusal(client: Redis, keys: Keys) -> KeyRefusal | None:
    """Whether Braze refuses the deployment's key now, whoever asks."""
    return KeyRefusal.from_fields(client.hmget(keys.credentials, KEY_REFUSAL_FIELDS))


class Refusals:
    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def standing(self, group_id: str, state: str, kind: str) -> Refusal | None:
        """The refusal of this group + state + kind, while it stands."""
        raw = self.client.get(self.keys.refusal(refusal_field(group_id, state, kind)))
        return None if raw is None else Refusal.from_json(raw)

    def refuse(
        self,
        group_id: str,
        state: str,
        kind: str,
        detail: str,
        *,
        seconds: float,
        now_ms: int | None = None,
    ) -> Refusal:
        """Refuse group + state + kind for `seconds` from `now_ms` (Redis's clock when
        None)."""
        if now_ms is None:
            now_ms = server_time_ms(self.client)
        ttl_ms = max(1, round(seconds * 1000))
        # Kept for the group, shown by `status` and quoted in the dead letters of later
        # batches: no identifier of the refused batch stays in it.
        detail = confine(detail, ())
        refusal = Refusal(group_id, state, kind, detail, now_ms, now_ms + ttl_ms)
        raw = json.dumps(
            {
                "group": group_id,
                "state": state,
                "kind": kind,
                "detail": detail,
                "since": refusal.since_ms,
                "until": refusal.until_ms,
            }
        )
        field = refusal_field(group_id, state, kind)
        # The index keeps only standing refusals: ended ones go when a new one is written.
        ended = [
            name
            for name, value in self.client.hgetall(self.keys.refusals).items()
            if Refusal.from_json(value).until_ms <= now_ms
        ]
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.refusal(field), raw, px=ttl_ms)
        if ended:
            pipe.hdel(self.keys.refusals, *ended)
        pipe.hset(self.keys.refusals, field, raw)
        pipe.execute()
        return refusal

    def listing(self, now_ms: int) -> list[Refusal]:
        """The refusals standing at `now_ms`, oldest first (the index is small: one field
        per refused group, state and kind)."""
        raws = self.client.hvals(self.keys.refusals)
        found = [Refusal.from_json(raw) for raw in raws]
        return sorted((r for r in found if r.until_ms > now_ms), key=lambda r: r.since_ms)

    def lift(self, fields: list[tuple[str, str, str]] | None = None) -> None:
        """Lift refusals (all when `fields` is None): an operator fixed the group."""
        if fields is None:
            names = [raw.decode() for raw in self.client.hkeys(self.keys.refusals)]
        else:
            names = [refusal_field(*parts) for parts in fields]
        if not names:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(*(self.keys.refusal(name) for name in names))
        pipe.hdel(self.keys.refusals, *names)
        pipe.execute()

    # --- halves of an anonymous split -------------------------------------------------------

    def half_refused(self, batch_id: str) -> str | None:
        """Braze's message for this half, if it was refused and awaits its sibling."""
        raw = self.client.get(self.keys.refused_half(batch_id))
        return None if raw is None else raw.decode()

    def mark_half_refused(
        self, batch_id: str, sibling_id: str, detail: str, *, ttl_seconds: float
    ) -> Sibling:
        """Record that this half was refused, and see where its sibling stands, in one
        transaction: of two halves refused at the same moment, the second always sees the
        first, so exactly one condemns the group or both wait no longer than a turn."""
        k = self.keys
        # Braze's message names no one of this half (else it was not anonymous), but it may
        # name the sibling's members: stored with every email and phone masked, as a
        # refusal's detail is (an identifier is stored only in its own records).
        detail = confine(detail, ())
        pipe = self.client.pipeline(transaction=True)
        pipe.set(k.refused_half(batch_id), detail, px=max(1, round(ttl_seconds * 1000)))
        pipe.exists(k.refused_half(sibling_id))
        pipe.exists(k.batch(sibling_id))
        _, sibling_refused, sibling_exists = pipe.execute()
        if sibling_refused:
            return Sibling.REFUSED
        return Sibling.PENDING if sibling_exists else Sibling.GONE

    def forget_half(self, batch_id: str) -> None:
        self.client.delete(self.keys.refused_half(batch_id))
