"""Issue 10: `status` run without BRAZE_API_KEY (an operator's shell) shows the budget the
workers spend - found through the workspace they recorded - or says it cannot tell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from delivery.services import services
from tasks.producer import enqueue_change
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in {**os.environ, **env}.items() if k != "BRAZE_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "worker", "status", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def status_json(env: dict[str, str]) -> dict:
    return json.loads(status(env, "--json").stdout)


def test_status_without_the_key_finds_the_fleets_budget_or_says_it_cannot(
    env, sim, processes, redis_client
):
    keys = services().keys
    unknown = status_json(env)  # no worker has run yet
    assert unknown["budget_source"] == "unknown"
    assert unknown["tokens_left"] is None and unknown["paused"] is None
    assert "unknown" in status(env).stdout

    processes.worker("w1", concurrency=2)
    processes.beat()
    httpx.post(f"{sim.url}/_sim/faults", json={"api_keys": ["another-key"]}).raise_for_status()
    enqueue_change(subscription_group_id="news", subscription_state="subscribed", external_id="u-1")
    found = wait_for(
        lambda: (s := status_json(env))["credentials_refused"] and s,
        timeout=30,
        what="status without the key to see posting stopped",
    )
    assert found["budget_source"] == "recorded by a worker"
    assert found["budget_workspace"].startswith(f"{sim.url.split('//')[1]}:")
    assert "sim-key" not in json.dumps(found)
    assert "stopped: Braze refuses the API key" in status(env).stdout

    redis_client.delete(keys.workspaces)
    assert status_json(env)["budget_source"] == "unknown"
