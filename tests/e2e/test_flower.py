"""Flower, as an operator sees it: a real worker and Flower, read back through Flower's API."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from devtools.processes import free_port
from tests.conftest import SIM_KEY, wait_for

pytestmark = pytest.mark.slow

AUTH = ("operator", "s3cret")


def test_flower_shows_batches_and_never_identifiers_or_the_key(env, sim, processes):
    from config.settings import get_settings
    from tasks.celery_app import create_app

    # An app for this test's broker: `tasks.celery_app.app` was built from the settings of
    # whichever test imported it first, possibly before any Redis URL was set.
    app = create_app(get_settings())

    processes.worker("w1")
    processes.beat()
    port = free_port()
    processes.start(
        "flower",
        "flower",
        [f"--port={port}", "--address=127.0.0.1", f"--basic-auth={':'.join(AUTH)}"],
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def tasks() -> dict:
        return httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=5).json()

    def seen(name: str) -> list[dict]:
        return [t for t in tasks().values() if t.get("name") == name]

    wait_for(answers, timeout=60, what="Flower to answer")
    assert httpx.get(f"{base}/api/tasks").status_code == 401, "the API needs the password"
    # Flower answers before it listens to the events (Redis pub/sub: what is published
    # before it subscribes never reaches it; seen once: the post's task-succeeded missed, its
    # state left short of SUCCESS). The ticks, every COALESCE_INTERVAL_SECONDS, show when
    # it does: a tick that has succeeded in Flower.
    wait_for(
        lambda: any(t.get("state") == "SUCCESS" for t in seen("subscriptions.coalesce")),
        timeout=60,
        what="Flower to see the worker's events",
    )

    app.send_task(
        "subscriptions.record_change",
        kwargs={
            "subscription_group_id": "news",
            "subscription_state": "subscribed",
            "email": "jane.doe@example.com",
        },
    )

    wait_for(lambda: seen("subscriptions.post_batch"), timeout=60, what="post_batch in Flower")
    wait_for(lambda: seen("subscriptions.record_change"), timeout=30, what="record_change")
    [record] = seen("subscriptions.record_change")
    post = seen("subscriptions.post_batch")[0]

    # The posting task is shown by its batch id only; its result by sizes and status.
    # (A live change's batch: its id says its lane.)
    assert re.fullmatch(r"\('live-[0-9a-f]{32}',\)", post["args"]), post["args"]
    wait_for(lambda: seen("subscriptions.post_batch")[0].get("state") == "SUCCESS", timeout=30)
    result = seen("subscriptions.post_batch")[0]["result"]
    assert "'status': 'delivered'" in result and "'size': 1" in result

    everything = json.dumps(tasks())
    assert "jane.doe@example.com" not in everything, json.dumps(record, indent=1)
    assert "j***@example.com" in record["kwargs"]
    assert SIM_KEY not in everything
