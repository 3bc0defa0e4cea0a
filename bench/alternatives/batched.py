"""A `celery_batches.Batches` task: changes are buffered in the worker and flushed every 50
messages or every second; each flush is posted grouped by (group, state, identifier kind)
in requests of at most 50 identifiers.

    celery -A bench.alternatives.batched worker

As celery-batches' documentation asks, the prefetch multiplier is 0 (no prefetch limit) so a
worker can gather `flush_every` messages. A batch task cannot use Celery's `autoretry_for`
(the task runs once for many messages), so the changes of a failed request are sent again
as new messages with Celery's exponential backoff and full jitter, at most `MAX_RETRIES`
times. Within one flush only the last change per identifier is posted.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import httpx
from celery import Celery
from celery.utils.time import get_exponential_backoff_interval
from celery_batches import Batches, SimpleRequest

from bench.alternatives.common import (
    MAX_IDENTIFIERS,
    MAX_RETRIES,
    V1_PATH,
    braze,
    broker_url,
    rate_limit_from_env,
    v1_body,
)

TASK = "batched.set_status"

logger = logging.getLogger(__name__)

app = Celery("batched", broker=broker_url())
app.conf.worker_prefetch_multiplier = 0


@app.task(
    base=Batches,
    name=TASK,
    flush_every=MAX_IDENTIFIERS,
    flush_interval=1,
    # Per worker, as with any Celery task.
    rate_limit=rate_limit_from_env(),
)
def set_status(requests: list[SimpleRequest]) -> None:
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for request in requests:
        change = request.kwargs
        latest[(change["group_id"], change["kind"], change["value"])] = change
    by_key: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for change in latest.values():
        by_key[(change["group_id"], change["state"], change["kind"])].append(change)
    for (group_id, state, kind), changes in by_key.items():
        for start in range(0, len(changes), MAX_IDENTIFIERS):
            chunk = changes[start : start + MAX_IDENTIFIERS]
            values = [change["value"] for change in chunk]
            try:
                braze().post(
                    V1_PATH, json=v1_body(group_id, state, kind, values)
                ).raise_for_status()
            except httpx.HTTPError as exc:
                _retry_later(chunk, exc)


def _retry_later(changes: list[dict[str, Any]], exc: Exception) -> None:
    for change in changes:
        attempt = int(change.get("attempt", 0))
        if attempt >= MAX_RETRIES:
            logger.error("giving up on %s after %d retries: %s", change["value"], attempt, exc)
            continue
        countdown = get_exponential_backoff_interval(
            factor=1, retries=attempt, maximum=600, full_jitter=True
        )
        set_status.apply_async(kwargs={**change, "attempt": attempt + 1}, countdown=countdown)
