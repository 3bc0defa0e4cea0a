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
from redis import Redis

from devtools.processes import worker_args
from tasks.producer import enqueue_changes
from tests.cli_runs import run_real
from tests.conftest import SIM_KEY, identifier, keyspace_traces, wait_for
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


def first_step(title: str) -> str:
    """The first thing README's runbook entry `title` tells the operator to do: its first
    numbered step, or its first paragraph."""
    readme = (ROOT / "README.md").read_text()
    entry = readme.split(f"**{title}**", 1)[1].split("\n**", 1)[0]
    paragraphs = [p.strip() for p in entry.split("\n\n")[1:] if p.strip()]
    return " ".join(paragraphs[0].split())


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


@pytest.mark.alone  # cleared within 10 s: timed
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
    # Neither key is anywhere in Redis, names or values: the circuit names the refused key
    # by its workspace id (endpoint host + a hash of the key).
    client = Redis.from_url(default_env["REDIS_URL"])
    for key in (SIM_KEY, NEW_KEY):
        assert keyspace_traces(client, key) == [], key


COMPONENT_ALERTS = ("BrazeSubsBeatDown", "BrazeSubsNoWorkerAlive", "BrazeSubsNoCoalescerTick")


def only_firing(api: Prometheus, name: str | None) -> bool:
    """`name` (or none) is the one of the component alerts whose expression holds."""
    return [alert for alert in COMPONENT_ALERTS if firing(api, alert)] == ([name] if name else [])


def unsubscribed(url: str) -> int:
    return sum(state == "unsubscribed" for state in braze_states(url, "news").values())


def warnings_of(text: str) -> list[str]:
    return [w.strip() for w in text.split("! ")[1:]]


def component_warnings(text: str) -> list[str]:
    """The status warnings about a missing process (beat, workers, the ticks)."""
    starts = ("beat is not running", "no worker is alive", "no coalescer tick")
    return [w for w in warnings_of(text) if w.startswith(starts)]


@pytest.mark.timeout(420)  # three situations, each held past its alert's threshold
def test_each_situation_names_the_missing_component_in_alert_status_and_runbook(
    default_env,
    sim,
    processes,
    prometheus: Prometheus,  # noqa: F811
):
    """A 429 storm, beat stopped, every worker stopped (defaults throughout): the alert
    whose expression holds, the `status` warning and the runbook entry they name agree on
    what is missing, and the alerts for the other components stay silent."""
    workers = [processes.worker("w1", concurrency=4), processes.worker("w2", concurrency=4)]
    beat = processes.beat("beat-1")
    enqueue_changes(changes(0, 200))
    wait_for(lambda: len(braze_states(sim.url, "news")) == 200, timeout=60, what="200 delivered")
    wait_for(lambda: only_firing(prometheus, None), timeout=30, what="no component alert")
    text = status_text()
    assert "beat: last heartbeat" in text and "last coalescer tick (run by workers)" in text
    assert not [w for w in warnings_of(text) if "runbook" in w], text
    assert component_warnings(text) == []

    # 1. A 429 storm: Braze allows 4 requests per 3 s, the fleet's budget far more.
    faults(sim, rate_limit=4, window_seconds=3)
    enqueue_changes(changes(200, 2000, "unsubscribed"))
    assert runbook_entry("BrazeSubsSustained429") == "Braze answers 429"
    wait_for(
        lambda: firing(prometheus, "BrazeSubsSustained429"),
        timeout=90,
        interval=1.0,
        what="BrazeSubsSustained429's expression to hold",
    )
    waiting = wait_for(
        lambda: (found := status()["waiting_by_reason"])["paused"] and found,
        timeout=30,
        interval=0.2,
        what="batches waiting after a 429",
    )
    assert waiting["credentials"] == 0  # a 429 pause is not the key's
    text = status_text()
    assert "paused after a 429" in text and "key refused" not in text
    assert any("(runbook: Braze answers 429)" in w for w in warnings_of(text)), text
    assert "429" in first_step("Braze answers 429")
    assert only_firing(prometheus, None)
    faults(sim, rate_limit=5000, window_seconds=60)
    wait_for(
        lambda: unsubscribed(sim.url) == 2000,
        timeout=120,
        interval=1.0,
        what="the storm's changes delivered",
    )

    # 2. Beat stopped: the workers are alive, nothing is cut.
    beat.signal_group(signal.SIGTERM)
    beat.wait(timeout=30)
    enqueue_changes(changes(0, 100))
    assert runbook_entry("BrazeSubsBeatDown") == "Beat is not running"
    assert first_step("Beat is not running").startswith("1. Start beat")
    wait_for(
        lambda: only_firing(prometheus, "BrazeSubsBeatDown"),
        timeout=90,
        interval=1.0,
        what="BrazeSubsBeatDown alone",
    )
    text = status_text()
    [warning] = component_warnings(text)
    assert warning.startswith("beat is not running") and "(runbook: beat is not running)" in warning
    assert status()["last_tick_seconds"] > 30 and status()["workers_alive"] == 2
    processes.start("beat", "beat-2")
    wait_for(lambda: status()["pending"] == 0 and status()["in_flight"] == 0, timeout=60)
    wait_for(lambda: only_firing(prometheus, None), timeout=30, what="beat's alert to clear")

    # 3. Every worker stopped: beat is alive, and the coalescer (run by workers) stops too.
    for worker in workers:
        worker.signal_group(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=60)
    enqueue_changes(changes(100, 100, "unsubscribed"))
    assert runbook_entry("BrazeSubsNoWorkerAlive") == "No worker is alive"
    assert first_step("No worker is alive").startswith("1. Start workers")
    wait_for(
        lambda: only_firing(prometheus, "BrazeSubsNoWorkerAlive"),
        timeout=60,
        interval=1.0,
        what="BrazeSubsNoWorkerAlive alone",
    )
    # Past the tick alert's own threshold (a minute without a tick): still not beat's.
    wait_for(
        lambda: (
            (prometheus.value("time() - braze_subs_coalescer_last_tick_timestamp_seconds") or 0)
            > 65
        ),
        timeout=120,
        interval=2.0,
        what="a minute without a coalescer tick",
    )
    assert only_firing(prometheus, "BrazeSubsNoWorkerAlive")
    text = status_text()
    [warning] = component_warnings(text)
    assert warning.startswith("no worker is alive") and "(runbook: no worker is alive)" in warning
    found = status()
    assert found["beat_last_seen_seconds"] < 5 and found["last_tick_seconds"] > 60
    processes.worker("w3", concurrency=4)
    wait_for(
        lambda: unsubscribed(sim.url) == 2100,
        timeout=60,
        what="the changes made while workers were gone delivered",
    )
    wait_for(lambda: only_firing(prometheus, None), timeout=30, what="the workers' alert to clear")
