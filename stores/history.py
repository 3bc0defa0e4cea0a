"""What outlives the buffer per identifier: its watermarks and its consent history.

The Lua scripts that already touch an identifier (enqueue, take, claim, defer, finish,
replay, purge) record what happened to it in the same atomic step, so history costs no
extra round trip and can never disagree with the buffer. This module reads it back and
carries the retention the scripts are given. Keys: `Keys.subject` (watermarks, dead-letter
references) and `Keys.history` (events), both named by a hash of the identifier, so a
lookup reads one key and never scans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from config.settings import Settings
from core.changes import format_ms
from stores.keys import FIELD_SEPARATOR, Keys, buffer_field
from stores.scripts import Scripts

DAY_MS = 86_400_000
_LAST = float("inf")


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


@dataclass(frozen=True, slots=True)
class Retention:
    """How long watermarks and history are kept (the defaults are the Settings defaults)."""

    watermark_ms: int = round(_default("watermark_retention_days") * DAY_MS)
    history_ms: int = round(_default("history_retention_days") * DAY_MS)
    history_max_events: int = _default("history_max_events")
    dead_letter_ms: int = round(_default("dead_letter_retention_days") * DAY_MS)

    @classmethod
    def from_settings(cls, settings: Settings) -> Retention:
        return cls(
            watermark_ms=round(settings.watermark_retention_days * DAY_MS),
            history_ms=round(settings.history_retention_days * DAY_MS),
            history_max_events=settings.history_max_events,
            dead_letter_ms=round(settings.dead_letter_retention_days * DAY_MS),
        )

    @property
    def history_args(self) -> list[int]:
        """The history arguments every recording script takes: retention (ms), most events."""
        return [self.history_ms, self.history_max_events]

    @property
    def subject_ms(self) -> int:
        """How long an identifier's subject key lives after its last change, delivery or
        dead letter: its watermarks for their retention, and its references to dead letters
        as long as the entries may live (forget finds them there). One lifetime for every
        script, so refreshing it never shortens it. The scripts add a minute to it and to
        the history's (`EXPIRY_SLACK_MS` in stores/lua/_prelude.lua: a take's expiries cover
        a finish within that minute, which sets none)."""
        return max(self.watermark_ms, self.dead_letter_ms)


# What each event means, for people (the `history` command).
EVENT_TITLES: dict[str, str] = {
    "enqueued": "enqueued",
    "stale": "dropped as stale",
    "superseded": "superseded",
    "batched": "batched",
    "posted": "posted",
    "retried": "retried",
    "dead_lettered": "dead-lettered",
    "replayed": "replayed",
    "purged": "dead letter purged",
    "skipped_opt_out": "skipped: opted out in Braze",
    "erased": "erased",
}


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One thing that happened to an identifier's change, at `at_ms` (Redis's clock)."""

    at_ms: int
    event: str
    group_id: str | None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes | str) -> HistoryEvent:
        text = raw.decode() if isinstance(raw, bytes) else raw
        stamp, _, payload = text.partition(FIELD_SEPARATOR)
        data = json.loads(payload)
        event = data.pop("e")
        group = data.pop("g", None)
        return cls(int(stamp), event, group, data)

    def as_dict(self) -> dict[str, Any]:
        """The event as the `history --json` command prints it: readable names."""
        d = self.details
        out: dict[str, Any] = {
            "at": format_ms(self.at_ms),
            "event": self.event,
            "subscription_group_id": self.group_id,
        }
        names = {
            "s": "subscription_state",
            "c": "source",
            "q": "seq",
            "b": "batch_id",
            "h": "http_status",
            "l": "latency_ms",
            "n": "attempts",
            "x": "error",
            "at": "where",
            "d": "delay_ms",
        }
        for short, name in names.items():
            if short in d and not (short == "x" and self.event == "enqueued"):
                out[name] = d[short]
        if self.event in ("enqueued", "stale"):
            out["occurred_at"] = format_ms(d["o"]) if "o" in d else None
            out["occurred_at_given"] = "o" in d
        if self.event == "enqueued":
            out["pending"] = bool(d.get("pending"))
            out["respect_opt_out"] = bool(d.get("r"))
            out["beyond_watermark_retention"] = bool(d.get("x"))
        if self.event == "stale":
            out["accepted_occurred_at"] = format_ms(d["m"])
        if self.event == "erased":
            out["removed"] = d.get("removed", {})
        return out

    def describe(self) -> str:
        """One line for people."""
        d = self.details
        parts: list[str] = [EVENT_TITLES.get(self.event, self.event)]
        if self.event in ("enqueued", "stale"):
            parts.append(d.get("s", ""))
            occurred = f"occurred {format_ms(d['o'])}" if "o" in d else "occurred at arrival"
            parts.append(occurred)
            if d.get("c"):
                parts.append(f"source {d['c']!r}")
            if self.event == "stale":
                parts.append(f"older than the accepted change of {format_ms(d['m'])}")
            if d.get("r"):
                parts.append("respect opt-out")
            if d.get("d"):
                parts.append(f"delay {d['d'] / 1000:g}s")
            if self.event == "enqueued" and d.get("x"):
                parts.append("older than the watermark retention: compared with what is held")
            if d.get("pending"):
                parts.append("pending")
        elif self.event == "superseded":
            where = {"pending": "while pending", "batch": "in its batch"}.get(
                d.get("at", ""), "in the dead-letter store"
            )
            parts.append(f"by a newer change {where}")
        if "b" in d:
            noun = "entry" if self.event in ("dead_lettered", "replayed", "purged") else "batch"
            parts.append(f"{noun} {d['b']}")
        if "h" in d:
            parts.append(f"HTTP {d['h']}")
        if "l" in d:
            parts.append(f"Braze answered in {d['l']:g} ms")
        if "n" in d:
            parts.append(f"attempt {d['n']}")
        if d.get("x") and self.event != "enqueued":
            parts.append(f"error: {d['x']}")
        if self.event == "erased":
            removed = d.get("removed", {})
            parts.append(", ".join(f"{count} {what}" for what, count in removed.items()))
        return ", ".join(part for part in parts if part)


def pending_event(group_id: str, change: dict[str, Any]) -> HistoryEvent:
    """The "enqueued" event of a change still pending (the buffer's JSON), as
    `remember_enqueued` in _prelude.lua will write it when the change is taken."""
    details: dict[str, Any] = {"s": change["s"], "q": change["q"], "pending": 1}
    arrived = int(change["t"]) - int(change.get("d", 0))
    if "w" in change:
        details["o"] = change["w"]
    for short in ("c", "x", "d"):
        if change.get(short):
            details[short] = change[short]
    if change.get("r") == 1:
        details["r"] = 1
    return HistoryEvent(arrived, "enqueued", group_id, details)


_ARRIVALS = frozenset({"enqueued", "stale", "superseded"})


def _order(event: HistoryEvent) -> tuple[int, float]:
    """Time, then for the events of a change's arrival its sequence number (an "enqueued"
    is written when its change is taken, after later arrivals' events)."""
    return event.at_ms, event.details.get("q", _LAST) if event.event in _ARRIVALS else _LAST


class ConsentHistory:
    """Reads one identifier's history: its history key, and its changes still pending in
    the buffer (whose "enqueued" is written when they are taken into a batch), looked up by
    field for each known group. No scan."""

    def __init__(self, client: Redis, keys: Keys, scripts: Scripts | None = None) -> None:
        self.client = client
        self.keys = keys
        self._scripts = scripts

    def events(self, kind: str, value: str, group_id: str | None = None) -> list[HistoryEvent]:
        """Oldest first; only `group_id`'s events (and the erasure's) when given."""
        pipe = self.client.pipeline(transaction=False)
        pipe.lrange(self.keys.history(kind, value), 0, -1)
        pipe.smembers(self.keys.groups)
        raws, known = pipe.execute()
        events = [HistoryEvent.parse(raw) for raw in raws]
        groups = sorted(g.decode() for g in known) if group_id is None else [group_id]
        if groups:
            fields = [buffer_field(g, kind, value) for g in groups]
            for group, raw in zip(
                groups, self.client.hmget(self.keys.pending, fields), strict=True
            ):
                if raw is not None:
                    change = json.loads(raw)
                    if not change.get("p"):
                        events.append(pending_event(group, change))
        if group_id is not None:
            events = [e for e in events if e.group_id in (group_id, None)]
        # Some events are written after later ones (a change's "enqueued" when it is taken):
        # by time, then by the change they are about; otherwise in the order written.
        events.sort(key=_order)
        return events

    def watermarks(self, kind: str, value: str) -> dict[str, int]:
        """Group -> occurred at (ms) of the latest change accepted there, while retained."""
        raw = self.client.hgetall(self.keys.subject(kind, value))
        prefix = b"w" + FIELD_SEPARATOR.encode()
        return {
            name[len(prefix) :].decode(): int(mark)
            for name, mark in raw.items()
            if name.startswith(prefix)
        }

    def latest_accepted(
        self, group_id: str, kind: str, values: list[str]
    ) -> list[tuple[int | None, str | None]]:
        """For each identifier of one group and kind: the occurred time (ms) of the latest
        change accepted here (its watermark; None when none is retained) and the state that
        change set (None when the history no longer holds it). One round trip
        (latest_accepted.lua); nothing is written."""
        if not values:
            return []
        if self._scripts is None:
            self._scripts = Scripts(self.client)
        raw = self._scripts.latest_accepted(
            keys=[self.keys.pending], args=[group_id, kind, *values]
        )
        pairs = zip(raw[::2], raw[1::2], strict=True)
        return [
            (int(mark) if mark else None, state.decode() if state else None)
            for mark, state in pairs
        ]
