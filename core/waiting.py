"""Why a batch waits in the schedule (Redis: `Keys.schedule`, `Keys.schedule_reasons`).

Every batch that is not being posted right now waits in one place, the schedule in Redis,
with its due time and one of these reasons; the coalescer's tick sends it a message when
it is due. `status` and the metrics exporter count the schedule by reason.
"""

from __future__ import annotations

from enum import StrEnum


class WaitReason(StrEnum):
    READY = "ready"  # cut or split just now: due at once, waiting for the tick's message
    RETRY = "retry"  # a failed attempt's backoff
    PAUSED = "paused"  # Braze answered 429: every worker waits for its reset
    CREDENTIALS = "credentials"  # the key is refused: waits for the next probe
    BUDGET = "budget"  # its turn in the shared rate budget (or the read budget) is far off
    HELD = "held"  # a refused half waiting for its sibling half's answer
    RECOVERED = "recovered"  # taken back from a worker whose heartbeat is gone
    HANDED_BACK = "handed_back"  # handed back by a worker stopping (SIGTERM)
