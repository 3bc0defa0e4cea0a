"""A real Prometheus scrapes `braze-subs metrics` during an end-to-end run (real worker and
beat processes, the simulator over HTTP), and the test asks Prometheus's HTTP API what it
saw: the backlog rose and fell, the requests counted match the simulator's count, a 429
burst shows up, a refused key flips the circuit gauge and back.

Prometheus is Debian's `prometheus` package (`./dev install` installs it); without it the
test skips, saying so.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.processes import free_port
from tasks.producer import enqueue_changes
from tests.conftest import SIM_KEY, identifier, wait_for
from tests.metrics_scrape import metrics_exporter
from tests.sim_control import faults, sim_stats

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        reply.raise_for_status()
        return reply.json()["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None when it has no result."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def by_label(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def exporter(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`braze-subs metrics` as the Procfile runs it, on a free port; yields host:port."""
    with metrics_exporter(tmp_path / "exporter.log", env) as target:
        yield target


@pytest.fixture
def prometheus(exporter: str, tmp_path: Path) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (./dev install installs Debian's package)")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: braze-subs\n"
        f"    static_configs:\n      - targets: ['{exporter}']\n"
    )
    port = free_port()
    args = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log = tmp_path / "prometheus.log"
    with running(args, {"PATH": "/usr/bin:/bin"}, log) as process:
        api = Prometheus(f"http://127.0.0.1:{port}")

        def scraping() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return api.value('up{job="braze-subs"}') == 1
            except httpx.HTTPError:
                return False

        wait_for(scraping, timeout=60, interval=0.5, what="Prometheus to scrape the exporter")
        yield api


def changes(start: int, count: int, state: str = "subscribed") -> list[dict[str, Any]]:
    return [
        {
            "subscription_group_id": "news",
            "subscription_state": state,
            "email": identifier("email", n),
        }
        for n in range(start, start + count)
    ]


# alone: its 429 needs the workers to post within the simulator's 3 s window spent by the
# other client (timed out waiting for one in a serial CI run and in a parallel run here).
@pytest.mark.alone
def test_prometheus_sees_backlog_requests_429s_and_a_refused_key(
    env, sim, processes, prometheus: Prometheus
):
    # 1. A backlog builds while no worker or beat runs, then drains once they start.
    enqueue_changes(changes(0, 3000))
    wait_for(
        lambda: prometheus.value("braze_subs_buffer_pending") == 3000,
        timeout=30,
        what="Prometheus to see the backlog of 3,000",
    )
    assert prometheus.value("braze_subs_buffer_oldest_due_age_seconds") >= 0
    assert prometheus.value("braze_subs_workers_alive") == 0  # BrazeSubsNoWorkerAlive's input
    processes.worker("w1", concurrency=8)
    processes.beat()
    wait_for(
        lambda: prometheus.value("braze_subs_workers_alive") == 1,
        timeout=30,
        what="Prometheus to see the worker's heartbeat",
    )
    wait_for(
        lambda: (
            prometheus.value("braze_subs_buffer_pending") == 0
            and prometheus.value("braze_subs_in_flight_identifiers") == 0
        ),
        timeout=90,
        interval=0.5,
        what="Prometheus to see the backlog drained",
    )
    assert prometheus.value("max_over_time(braze_subs_buffer_pending[10m])") == 3000
    wait_for(
        lambda: prometheus.value("braze_subs_identifiers_delivered_total") == 3000,
        timeout=30,
        what="3,000 identifiers delivered in Prometheus",
    )
    assert prometheus.value("time() - braze_subs_coalescer_last_tick_timestamp_seconds") < 30

    # 2. A 429 burst: another client spends the simulator's window; the next requests get
    # 429, every worker pauses until the reset, then the changes go through.
    faults(sim, rate_limit=40, window_seconds=3, spend=40)
    enqueue_changes(changes(3000, 1000))
    wait_for(
        lambda: (prometheus.value("braze_subs_braze_throttled_total") or 0) >= 1,
        timeout=60,
        interval=0.5,
        what="Prometheus to count a 429",
    )
    wait_for(
        lambda: prometheus.value("braze_subs_identifiers_delivered_total") == 4000,
        timeout=90,
        interval=0.5,
        what="the changes after the 429s to be delivered",
    )
    throttled = sim_stats(sim)["rate_limited_429"]
    assert throttled >= 1
    wait_for(
        lambda: prometheus.value('sum(braze_subs_braze_requests_total{code="429"})') == throttled,
        timeout=30,
        what=f"Prometheus to count the simulator's {throttled} 429s",
    )
    assert prometheus.value("braze_subs_braze_throttled_total") == throttled
    faults(sim, rate_limit=5000, window_seconds=60)

    # 3. A refused key flips the circuit gauge, with the HTTP status as reason; a working
    # key again (one probe per CREDENTIALS_PROBE_SECONDS) flips it back.
    faults(sim, api_keys=["another-key"])
    enqueue_changes(changes(4000, 100, "unsubscribed"))
    wait_for(
        lambda: (
            prometheus.by_label("braze_subs_credentials_circuit_open == 1", "reason")
            == {"401": 1.0}
        ),
        timeout=60,
        interval=0.5,
        what="Prometheus to see the credentials circuit open (401)",
    )
    assert prometheus.by_label("braze_subs_posting_paused == 1", "reason") == {"credentials": 1.0}
    # The refused batches wait in the schedule for the next probe, not in a worker.
    wait_for(
        lambda: (
            (
                prometheus.value(
                    'max_over_time(braze_subs_waiting_batches{reason="credentials"}[10m])'
                )
                or 0
            )
            >= 1
        ),
        timeout=30,
        interval=0.5,
        what="Prometheus to see batches waiting for the key",
    )
    faults(sim, api_keys=[SIM_KEY])
    wait_for(
        lambda: (
            prometheus.value("max(braze_subs_credentials_circuit_open)") == 0
            and prometheus.value("braze_subs_identifiers_delivered_total") == 4100
        ),
        timeout=60,
        interval=0.5,
        what="the circuit to close and the 100 changes to be delivered",
    )

    # Every request the simulator received is counted once, by endpoint and status.
    stats = sim_stats(sim)
    codes = {"201": stats["requests_ok"], "429": stats["rate_limited_429"]}
    codes["401"] = stats["unauthorized"]
    wait_for(
        lambda: prometheus.value("sum(braze_subs_braze_requests_total)") == stats["requests_total"],
        timeout=30,
        what=f"Prometheus to count the simulator's {stats['requests_total']} requests",
    )
    seen = prometheus.by_label("sum by (code) (braze_subs_braze_requests_total)", "code")
    assert seen == {code: float(n) for code, n in codes.items() if n}, (seen, stats)
    endpoints = prometheus.by_label(
        "sum by (endpoint) (braze_subs_braze_requests_total)", "endpoint"
    )
    assert set(endpoints) == {"/subscription/status/set"}
    assert prometheus.value("braze_subs_dead_letter_entries") == 0
    wait_for(
        lambda: prometheus.value("sum(braze_subs_waiting_batches)") == 0,
        timeout=30,
        what="the schedule to be empty in Prometheus",
    )

    # A change that occurred before one already accepted is dropped, and counted as stale.
    newer, older = changes(5000, 1, "unsubscribed")[0], changes(5000, 1)[0]
    enqueue_changes([{**newer, "occurred_at": 1_700_000_100}])
    enqueue_changes([{**older, "occurred_at": 1_700_000_000}])
    wait_for(
        lambda: prometheus.value("braze_subs_stale_dropped_total") == 1,
        timeout=30,
        what="Prometheus to count the stale change",
    )
    assert prometheus.value("braze_subs_redis_up") == 1
