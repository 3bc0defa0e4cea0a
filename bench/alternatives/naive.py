"""One Celery task per change, throttled with Celery's own `rate_limit`.

    celery -A bench.alternatives.naive worker

Celery defaults throughout (prefork pool, one process per core, prefetch multiplier 4,
early acknowledgement); each task posts one identifier; HTTP errors (429 included) are
retried with Celery's exponential backoff, at most `MAX_RETRIES` times.
"""

from __future__ import annotations

import httpx
from celery import Celery

from bench.alternatives.common import (
    MAX_RETRIES,
    V1_PATH,
    braze,
    broker_url,
    rate_limit_from_env,
    v1_body,
)

TASK = "naive.set_status"

app = Celery("naive", broker=broker_url())


@app.task(
    name=TASK,
    # Celery's rate limit is per worker, so the fleet's budget is split across workers.
    rate_limit=rate_limit_from_env(),
    autoretry_for=(httpx.HTTPError,),
    retry_backoff=True,
    max_retries=MAX_RETRIES,
)
def set_status(group_id: str, state: str, kind: str, value: str) -> None:
    response = braze().post(V1_PATH, json=v1_body(group_id, state, kind, [value]))
    response.raise_for_status()
