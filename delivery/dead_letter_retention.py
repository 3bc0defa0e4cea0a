"""Dead-letter retention: entries older than `DEAD_LETTER_RETENTION_DAYS` are removed, each
with a WARNING line, and counted in `status` (dead_letters_expired).

Runs as its own beat task, `subscriptions.expire_dead_letters`, every
`DEAD_LETTER_EXPIRY_INTERVAL_SECONDS`: a retention counted in days needs no per-second
check, and the coalescer's tick stays about batches.
"""

from __future__ import annotations

import logging

from config.settings import Settings
from core.redaction import confine
from stores.clock import server_time_ms
from stores.dead_letters import DeadLetters

logger = logging.getLogger("braze_subs.dead_letters")

# Entries removed per step (each step is one read and one purge per entry).
STEP = 100


def expire_dead_letters(settings: Settings, dead_letters: DeadLetters) -> int:
    """Remove every entry past its retention; returns how many."""
    before_ms = server_time_ms(dead_letters.client) - settings.dead_letter_retention_ms
    expired = 0
    while True:
        entries = dead_letters.expire(before_ms, limit=STEP)
        for entry in entries:
            logger.warning(
                "dead-letter entry %s expired after %g days: group=%s state=%s identifiers=%d "
                "error=%r",
                entry.id,
                settings.dead_letter_retention_days,
                entry.subscription_group_id,
                entry.subscription_state,
                len(entry.identifiers),
                # The entry keeps its own identifiers whole in Braze's text; a log does not.
                confine(entry.error, [(i["kind"], i["value"]) for i in entry.identifiers]),
            )
        expired += len(entries)
        if len(entries) < STEP:
            return expired
