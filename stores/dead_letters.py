"""The dead-letter store: batches given up on, kept whole with their error until an operator
replays or purges them. Entries are never dropped silently; see README for retention."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from stores.base import ScriptedStore
from stores.refusals import Refusals


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    subscription_group_id: str
    subscription_state: str
    use_double_opt_in_logic: bool
    identifiers: list[dict[str, str]]
    error: str
    attempts: int
    created_at: int  # ms, when the batch was cut
    dead_lettered_at: int  # ms

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        data = json.loads(raw)
        return cls(
            id=data["id"],
            subscription_group_id=data["subscription_group_id"],
            subscription_state=data["subscription_state"],
            use_double_opt_in_logic=bool(data.get("use_double_opt_in_logic", False)),
            identifiers=[
                {"kind": item["kind"], "value": item["value"]} for item in data["identifiers"]
            ],
            error=data.get("error", ""),
            attempts=int(data.get("attempts", 0)),
            created_at=int(data.get("created_at", 0)),
            dead_lettered_at=int(data.get("dead_lettered_at", 0)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subscription_group_id": self.subscription_group_id,
            "subscription_state": self.subscription_state,
            "use_double_opt_in_logic": self.use_double_opt_in_logic,
            "identifiers": self.identifiers,
            "error": self.error,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "dead_lettered_at": self.dead_lettered_at,
        }


@dataclass(slots=True)
class ReplayReport:
    entries: int = 0
    requeued: int = 0
    superseded: int = 0
    missing: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Resolved:
    """Entry ids as an operator typed them, resolved: whole ids, or unique prefixes."""

    ids: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # matched no entry
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # prefix -> some matches


@dataclass(slots=True)
class PurgeReport:
    entries: int = 0
    identifiers: int = 0
    missing: list[str] = field(default_factory=list)


class DeadLetters(ScriptedStore):
    def ids(self) -> list[str]:
        return [raw.decode() for raw in self.client.zrange(self.keys.dead_letter_index, 0, -1)]

    def resolve(self, given: list[str], *, shown: int = 3) -> Resolved:
        """Each of `given` as a whole entry id or a prefix of exactly one (what `dlq list`
        showed, perhaps cut). A whole id is one HEXISTS; a prefix is a ZSCAN of the index
        matching it (ids and scores only; run only for what an operator types), stopped at
        `shown` + 1 matches (so an ambiguous prefix can name `shown` and say there are
        more). An id given twice, whole or by prefix, is resolved once."""
        resolved = Resolved()
        for text in given:
            if text and self.client.hexists(self.keys.dead_letters, text):
                if text not in resolved.ids:
                    resolved.ids.append(text)
                continue
            matches: list[str] = []
            if text:
                pattern = _glob_escape(text) + "*"
                for name, _ in self.client.zscan_iter(
                    self.keys.dead_letter_index, match=pattern, count=1000
                ):
                    matches.append(name.decode() if isinstance(name, bytes) else name)
                    if len(matches) > shown:
                        break
            if len(matches) == 1:
                if matches[0] not in resolved.ids:
                    resolved.ids.append(matches[0])
            elif matches:
                resolved.ambiguous[text] = sorted(matches)
            else:
                resolved.missing.append(text)
        return resolved

    def list(self) -> list[DeadLetter]:
        """Every entry, oldest first."""
        ids = self.ids()
        if not ids:
            return []
        raws = self.client.hmget(self.keys.dead_letters, ids)
        return [DeadLetter.from_json(raw) for raw in raws if raw is not None]

    def page(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[DeadLetter], str | None]:
        """Up to `limit` entries after `cursor`, oldest first, and the cursor of the next
        page (None at the end). Memory and Redis work stay bounded by `limit` whatever the
        store holds. The cursor is the position (dead-lettered ms, id) of the last entry
        shown, so entries purged or added meanwhile never shift a page."""
        index = self.keys.dead_letter_index
        ids: list[str] = []
        if cursor is None:
            ids = [raw.decode() for raw in self.client.zrange(index, 0, limit)]
            last_score = None
        else:
            score_text, _, last_id = cursor.partition(":")
            last_score = int(score_text)
            # Entries dead-lettered in the same millisecond sort by id.
            ties = self.client.zrangebyscore(index, last_score, last_score)
            ids = [raw.decode() for raw in ties if raw.decode() > last_id][: limit + 1]
            if len(ids) <= limit:
                later = self.client.zrangebyscore(
                    index, f"({last_score}", "+inf", start=0, num=limit + 1 - len(ids)
                )
                ids += [raw.decode() for raw in later]
        more = len(ids) > limit
        ids = ids[:limit]
        if not ids:
            return [], None
        raws = self.client.hmget(self.keys.dead_letters, ids)
        entries = [DeadLetter.from_json(raw) for raw in raws if raw is not None]
        if not more:
            return entries, None
        score = self.client.zscore(index, ids[-1])
        position = int(score) if score is not None else (last_score or 0)
        return entries, f"{position}:{ids[-1]}"

    def replay(self, ids: list[str] | None) -> ReplayReport:
        """Return entries (all if `ids` is None) to the buffer, newer changes winning. A
        replay says the operator fixed the cause: it lifts the refusal of the entries'
        groups (else their batches would be dead-lettered again unsent)."""
        k = self.keys
        report = ReplayReport()
        self._lift_refusals(ids)
        for entry_id in self.ids() if ids is None else ids:
            requeued, skipped = self.scripts.replay_dead_letter(
                keys=[
                    k.dead_letters,
                    k.dead_letter_index,
                    k.dead_letter_identifiers,
                    k.seq,
                    k.pending,
                    k.due,
                    k.inflight,
                    k.dead_letter_fields,
                ],
                args=[entry_id, *self.retention.history_args, self.retention.subject_ms],
            )
            if int(requeued) < 0:
                report.missing.append(entry_id)
                continue
            report.entries += 1
            report.requeued += int(requeued)
            report.superseded += int(skipped)
        return report

    def _lift_refusals(self, ids: list[str] | None) -> None:
        refusals = Refusals(self.client, self.keys)
        if ids is None:
            refusals.lift(None)
            return
        fields = set()
        for raw in self.client.hmget(self.keys.dead_letters, ids) if ids else []:
            if raw is not None:
                entry = DeadLetter.from_json(raw)
                for kind in {item["kind"] for item in entry.identifiers}:
                    fields.add((entry.subscription_group_id, entry.subscription_state, kind))
        refusals.lift(sorted(fields))

    def expire(self, before_ms: float, limit: int = 100) -> list[DeadLetter]:
        """Remove (and return) entries dead-lettered before `before_ms`, oldest first."""
        ids = [
            raw.decode()
            for raw in self.client.zrangebyscore(
                self.keys.dead_letter_index, "-inf", before_ms, start=0, num=limit
            )
        ]
        if not ids:
            return []
        raws = self.client.hmget(self.keys.dead_letters, ids)
        entries = [DeadLetter.from_json(raw) for raw in raws if raw is not None]
        self.purge(ids, reason="expired")
        self.client.hincrby(self.keys.stats, "dead_letters_expired", len(entries))
        return entries

    def purge(self, ids: list[str] | None, *, reason: str = "purged") -> PurgeReport:
        """Delete entries (all if `ids` is None) for good; `reason` goes into the history."""
        k = self.keys
        report = PurgeReport()
        for entry_id in self.ids() if ids is None else ids:
            removed = int(
                self.scripts.purge_dead_letter(
                    keys=[
                        k.dead_letters,
                        k.dead_letter_index,
                        k.dead_letter_identifiers,
                        k.dead_letter_fields,
                    ],
                    args=[entry_id, reason, *self.retention.history_args],
                )
            )
            if removed < 0:
                report.missing.append(entry_id)
                continue
            report.entries += 1
            report.identifiers += removed
        return report


def _glob_escape(text: str) -> str:
    """`text` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
