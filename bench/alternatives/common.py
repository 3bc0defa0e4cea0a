"""Settings and the HTTP client shared by the two alternatives (nothing braze-subs-specific)."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import httpx

V1_PATH = "/subscription/status/set"
MAX_IDENTIFIERS = 50  # Braze's cap per request
MAX_RETRIES = 5


def per_worker_rate_limit(limit: int, window_seconds: float, workers: int) -> str:
    """Celery `rate_limit` for one worker so that `workers` of them stay within `limit` per
    `window_seconds`: the budget divided by the number of workers, in tasks per second."""
    per_second = limit / window_seconds / max(1, workers)
    return f"{per_second:g}/s"


def rate_limit_from_env() -> str:
    return per_worker_rate_limit(
        int(os.environ.get("BRAZE_RATE_LIMIT", "5000")),
        float(os.environ.get("BRAZE_RATE_LIMIT_WINDOW_SECONDS", "60")),
        int(os.environ.get("BENCH_WORKERS", "1")),
    )


def broker_url() -> str:
    return os.environ.get("REDIS_URL", "redis://localhost:6379/0")


@cache
def braze() -> httpx.Client:
    """One client per process: created on first use, so after the prefork pool forked."""
    return httpx.Client(
        base_url=os.environ["BRAZE_REST_ENDPOINT"],
        headers={"Authorization": f"Bearer {os.environ['BRAZE_API_KEY']}"},
        timeout=10.0,
    )


def v1_body(group_id: str, state: str, kind: str, values: list[str]) -> dict[str, Any]:
    return {"subscription_group_id": group_id, "subscription_state": state, kind: values}
