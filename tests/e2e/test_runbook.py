"""README's runbook, done as an operator does it (issue 27): each situation is caused for real
(real worker and beat processes, the exporter as the Procfile runs it, a real Prometheus
scraping it every second, the simulator over HTTP), and the alert expression of
`deploy/prometheus/alerts.yml` (asked of Prometheus), `braze-subs status` (a real process)
and the runbook entry the alert and the status warning name must agree, then clear.

Prometheus is Debian's `prometheus` package (`./dev install` installs it); without it these
tests skip, saying so.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.processes import worker_args
from tasks.producer import enqueue_changes
from tests.cli_runs import run_real
from tests.conftest import SIM_KEY, identifier, wait_for
from tests.e2e.test_prometheus import Prometheus, exporter, prometheus  # noqa: F401 (fixtures)
from tests.sim_control import braze_states, faults

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RULES = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
NEW_KEY = "the-rotated-key"


def rule(name: str) -> dict[str, Any]:
    [found] = [r for g in RULES["groups"] for r in g["rules"] if r.get("alert") == name]
    return found


def firing(api: Prometheus, name: str) -> bool:
    """Whether the alert's expression holds now (its `for:` aside): what Prometheus would
    fire on, asked of the real one."""
    return bool(api.query(rule(name)["expr"]))


def runbook_entry(name: str) -> str:
    """The runbook entry an alert names ("README.md, Runbook: The key was revoked"), checked
    to exist in README.md as a bold entry."""
    where = rule(name)["annotations"]["runbook"]
    title = where.removeprefix("README.md, Runbook: ")
    assert f"**{title}**" in (ROOT / "README.md").read_text(), where
    return title


def status(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """`braze-subs status --json` as a shell runs it (this process's environment: the key
    the fleet started with)."""
    done = run_real("status", "--json", extra_env=extra_env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def status_text(extra_env: dict[str, str] | None = None) -> str:
    """`braze-subs status` as a shell prints it, its whitespace (the table's padding, lines
    wrapped at 80 columns) collapsed to single spaces."""
    done = run_real("status", extra_env=extra_env)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


def changes(start: int, count: int, state: str = "subscribed") -> list[dict[str, Any]]:
    return [
        {
            "subscription_group_id": "news",
            "subscription_state": state,
            "email": identifier("email", n),
        }
        for n in range(start, start + count)
    ]


def test_key_rotation_as_the_runbook_says_clears_metric_alert_and_status_within_seconds(
    default_env,
    sim,
    processes,
    prometheus: Prometheus,  # noqa: F811
):
    """The key is revoked while a worker and beat run (defaults: one probe a minute); the
    runbook's rotation restarts them with the new key. The exporter and a shell's `status`
    keep the old key on purpose: the refusal is the deployment's, so they clear too."""
    worker = processes.worker("w-old", concurrency=4)
    beat = processes.beat("beat-old")
    faults(sim, api_keys=[NEW_KEY])  # the old key is revoked
    enqueue_changes(changes(0, 500))

    assert runbook_entry("BrazeSubsKeyRefused") == "The key was revoked"
    wait_for(
        lambda: firing(prometheus, "BrazeSubsKeyRefused"),
        timeout=60,
        interval=0.5,
        what="BrazeSubsKeyRefused's expression to hold in Prometheus",
    )
    before = status()
    assert before["credentials_refused"] and "401" in before["credentials_refused"]
    assert "runbook: the key was revoked" in status_text()
    # Labels say what a batch waits for: the key, never "paused after a 429".
    wait_for(
        lambda: (
            (found := status()["waiting_by_reason"])["credentials"] > 0
            and found["paused"] == 0
            and status()["pending"] == 0
        ),
        timeout=60,
        interval=0.5,
        what="every change cut and waiting for the key",
    )
    assert "key refused: next probe" in status_text()

    # The runbook's rotation (Procfile / shell row): the new key, worker and beat restarted.
    for process in (worker, beat):
        process.signal_group(signal.SIGTERM)
        process.wait(timeout=60)
    new_key = {"BRAZE_API_KEY": NEW_KEY}
    processes.start("beat", "beat-new", extra_env=new_key)
    started = processes.start(
        "worker", "w-new", worker_args("w-new", "--concurrency", "4"), extra_env=new_key
    )
    processes.wait_ready([started])
    ready = time.monotonic()

    def cleared() -> bool:
        found = status()  # still the old key
        return (
            found["credentials_refused"] is None
            and prometheus.value("max(braze_subs_credentials_circuit_open)") == 0
            and not firing(prometheus, "BrazeSubsKeyRefused")
        )

    wait_for(cleared, timeout=30, interval=0.2, what="metric, alert and status to clear")
    clear_seconds = time.monotonic() - ready
    wait_for(
        lambda: len(braze_states(sim.url, "news")) == 500 and status()["in_flight"] == 0,
        timeout=60,
        interval=0.5,
        what="all 500 delivered with the new key",
    )
    delivered_seconds = time.monotonic() - ready
    print(
        f"key rotation: ready -> metric, alert, status clear {clear_seconds:.1f} s; "
        f"-> 500 delivered {delivered_seconds:.1f} s"
    )
    assert clear_seconds <= 10
    assert delivered_seconds <= 15  # none waited for the old key's next probe (60 s)
    after = status()
    assert after["waiting_by_reason"]["credentials"] == 0
    text = status_text()
    assert re.search(r"posting running", text), text
    assert "the key was revoked" not in text
    assert SIM_KEY not in text and NEW_KEY not in text
