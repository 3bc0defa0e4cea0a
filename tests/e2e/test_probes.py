"""Health probes as Kubernetes runs them (exec): `braze-subs probe live --role worker|beat`
against real worker and beat processes, and `braze-subs probe ready` against a Redis that
goes away. Default LIVENESS_MAX_AGE_SECONDS (5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.settings import Settings
from devtools.processes import local_redis
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

BRAZE_SUBS = str(Path(sys.executable).parent / "braze-subs")
MAX_AGE = Settings.model_fields["liveness_max_age_seconds"].default


def probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BRAZE_SUBS, "probe", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def seconds_until_failing(env: dict[str, str], role: str) -> float:
    started = time.monotonic()
    wait_for(
        lambda: probe(env, "live", "--role", role).returncode == 1,
        timeout=MAX_AGE + 15,
        interval=0.2,
        what=f"the {role} liveness probe to fail",
    )
    return time.monotonic() - started


@pytest.mark.alone  # within seconds: timed
@pytest.mark.parametrize("role", ["worker", "beat"])
def test_liveness_fails_within_seconds_of_a_freeze_and_of_a_kill(env, processes, tmp_path, role):
    health = {**env, "HEALTH_DIR": str(tmp_path / "health")}
    assert probe(health, "live", "--role", role).returncode == 1  # nothing started yet
    if role == "worker":
        process = processes.worker("w1", extra_env={"HEALTH_DIR": health["HEALTH_DIR"]})
    else:
        process = processes.start("beat", "beat", extra_env={"HEALTH_DIR": health["HEALTH_DIR"]})
    wait_for(
        lambda: probe(health, "live", "--role", role).returncode == 0,
        timeout=60,
        interval=0.2,
        what=f"the {role} liveness probe to pass",
    )
    # Still passing a few heartbeats later: the thread keeps the file fresh.
    deadline = time.monotonic() + MAX_AGE + 1
    while time.monotonic() < deadline:
        result = probe(health, "live", "--role", role)
        assert result.returncode == 0, result.stderr
    # Frozen (a paused container, SIGSTOP): fails once the heartbeat is MAX_AGE old.
    process.signal_group(signal.SIGSTOP)
    try:
        frozen = seconds_until_failing(health, role)
        assert "frozen?" in probe(health, "live", "--role", role).stderr
    finally:
        process.signal_group(signal.SIGCONT)
    assert frozen <= MAX_AGE + 3, frozen
    wait_for(
        lambda: probe(health, "live", "--role", role).returncode == 0,
        timeout=10,
        interval=0.2,
        what=f"the {role} liveness probe to pass after a thaw",
    )
    # Killed (OOM, kill -9): the heartbeat's process is gone, so it fails at once.
    processes.kill(process, signal.SIGKILL)
    killed = seconds_until_failing(health, role)
    assert killed < 2, killed
    assert "gone" in probe(health, "live", "--role", role).stderr


def test_liveness_file_is_removed_on_a_warm_shutdown(env, processes, tmp_path):
    health = {**env, "HEALTH_DIR": str(tmp_path / "health")}
    process = processes.worker("w1", extra_env={"HEALTH_DIR": health["HEALTH_DIR"]})
    wait_for(lambda: probe(health, "live", "--role", "worker").returncode == 0, timeout=30)
    process.signal_group(signal.SIGTERM)
    process.wait(timeout=30)
    result = probe(health, "live", "--role", "worker")
    assert result.returncode == 1
    assert "no heartbeat" in result.stderr


def test_readiness_fails_while_redis_is_down_and_on_bad_settings(tmp_path):
    with local_redis(tmp_path) as url:
        up = probe({"REDIS_URL": url}, "ready")
        assert (up.returncode, up.stdout.strip()) == (0, "ready")
    down = probe({"REDIS_URL": url}, "ready", "--timeout", "1")
    assert down.returncode == 1
    assert down.stderr.startswith(f"braze-subs: not ready: cannot reach Redis at {url}")
    assert "Traceback" not in down.stderr
    bad = probe({"REDIS_URL": url, "BATCH_MAX_IDENTIFIERS": "60"}, "ready")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "braze-subs: not ready: BATCH_MAX_IDENTIFIERS: Braze accepts at most 50 identifiers"
    )


@pytest.mark.parametrize("role", ["worker", "beat"])
def test_a_process_started_before_its_cluster_is_formed_is_live_and_catches_up(
    env, processes, tmp_path, role
):
    """Compose's `cluster` profile starts the processes while `redis-cluster-create` is still
    joining the nodes (podman before 4.6 does not even wait for `service_healthy`). A
    process whose cluster has no slots yet is live (its probe passes), and once the
    cluster is formed it does what its start needed Redis for: the worker's heartbeat and
    workspace recorded, beat's "seen" mark. Before, the first Redis call raised inside
    Celery's start-up signal, the rest of the handler was skipped, and the probe failed
    for good while the process worked (found by e2e/test_containers_cluster.py)."""
    from devtools.redis_cluster import RedisCluster, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = RedisCluster(tmp_path / "nodes").start(create=False)  # nodes, no slots yet
    try:
        extra = {
            "HEALTH_DIR": str(tmp_path / "health"),
            "REDIS_URL": cluster.url,
            "BROKER_URL": env["REDIS_URL"],
        }
        health = {**env, **extra}
        if role == "worker":
            processes.worker("w1", extra_env=extra)
        else:
            processes.start("beat", "beat", extra_env=extra)
        wait_for(
            lambda: probe(health, "live", "--role", role).returncode == 0,
            timeout=60,
            interval=0.2,
            what=f"the {role} liveness probe to pass before the cluster is formed",
        )
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in cluster.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout[-2000:]
        wanted = ("heartbeat:", "workspaces") if role == "worker" else ("beat:seen",)

        def found() -> bool:
            keys = {k.decode() for p in cluster.ports for k in cluster.node(p).keys("*")}
            return all(any(part in key for key in keys) for part in wanted)

        wait_for(found, timeout=60, interval=0.2, what=f"the {role}'s keys once formed")
        assert probe(health, "live", "--role", role).returncode == 0
    finally:
        processes.stop_all()  # before the cluster goes, so nothing retries a dead one
        cluster.stop()
