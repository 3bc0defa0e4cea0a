"""Erasure: `braze-subs forget` removes everything braze-subs holds about one identifier.

One atomic script (`stores/lua/forget.lua`): pending changes, locks and batch-record
membership of batches in flight (a claimed batch not yet sent loses its claim, so its
worker's check before the first byte stops it), dead letters, watermarks and history,
across all groups.
It does not change Braze: the identifier's profile and subscription states there are
Braze's to delete (its user deletion endpoint, /users/delete).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis import Redis

from stores.history import Retention
from stores.keys import Keys
from stores.scripts import Scripts


@dataclass(frozen=True, slots=True)
class ErasureReport:
    pending: int  # changes waiting in the buffer
    in_flight: int  # batches on the wire or waiting to retry that held it
    dead_letters: int  # dead-letter entries it was removed from
    history_events: int
    watermarks: int  # groups with a watermark

    def as_dict(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "in_flight": self.in_flight,
            "dead_letters": self.dead_letters,
            "history_events": self.history_events,
            "watermarks": self.watermarks,
        }


def forget(
    client: Redis,
    keys: Keys,
    kind: str,
    value: str,
    *,
    scripts: Scripts | None = None,
    retention: Retention | None = None,
    grace_ms: int,
) -> ErasureReport:
    """Erase the (normalised) identifier; returns what was removed. A batch holding it
    that a worker has claimed but not yet sent loses its claim (with the rest of its
    request) and waits in the schedule, due now: nothing is sent for the identifier after
    this returns; `grace_ms` is the sweep's grace for those batches."""
    scripts = scripts or Scripts(client)
    retention = retention or Retention()
    raw = scripts.forget(
        keys=[
            keys.pending,
            keys.due,
            keys.inflight,
            keys.dead_letters,
            keys.dead_letter_index,
            keys.dead_letter_identifiers,
            keys.dead_letter_fields,
            keys.stats,
            keys.groups,
            keys.claims,
            keys.claim_tokens,
            keys.fences,
            keys.schedule,
            keys.schedule_reasons,
            keys.batches,
            keys.coalesce_nudge,
            keys.subject(kind, value),
            keys.history(kind, value),
        ],
        args=[kind, value, retention.history_ms, grace_ms],
    )
    data = json.loads(raw)
    return ErasureReport(**{name: int(count) for name, count in data.items()})
