"""The README's first command: `braze-subs demo`, end to end, and `--keep-running` for
exploring with Flower, `status` and `import` before it is stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def answers(url: str, **kwargs: object) -> int | None:
    try:
        return httpx.get(url, timeout=2, **kwargs).status_code  # type: ignore[arg-type]
    except httpx.HTTPError:
        return None


def redis_answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_timeout=1).ping())
    except RedisError:
        return False


@pytest.mark.slow
def test_demo_delivers_everything_then_keeps_running_until_stopped(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "REDIS_"))}
    stdout, stderr = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        demo = subprocess.Popen(
            [sys.executable, "-m", "worker", "demo", "--changes", "1500", "--keep-running"],
            cwd=ROOT,
            env=environ,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: "keeps running" in stderr.read_text() or demo.poll() is not None,
            timeout=150,
            what="the demo to deliver everything",
        )
        printed = stderr.read_text()
        assert demo.poll() is None, printed
        table = stdout.read_text()
        (checked,) = re.findall(r"last-written state\s*│\s*([\d,]+) of ([\d,]+)", table)
        assert checked[0] == checked[1] and int(checked[0].replace(",", "")) > 500, table
        assert "every identifier is in its last-written state" in printed

        flower = re.search(r"Flower\s+(http://\S+)\s+\(user (\S+), password (\S+)\)", printed)
        redis_url = re.search(r"export REDIS_URL=(\S+)", printed)
        assert flower and redis_url, printed
        base, user, password = flower.groups()
        wait_for(lambda: answers(f"{base}/healthcheck") == 200, timeout=60, what="Flower")
        assert answers(f"{base}/api/tasks") == 401
        assert answers(f"{base}/api/tasks", auth=(user, password)) == 200

        # The printed REDIS_URL is all `status` needs.
        status = subprocess.run(
            [sys.executable, "-m", "worker", "status", "--json"],
            cwd=ROOT,
            env={**environ, "REDIS_URL": redis_url.group(1)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(status.stdout)["pending"] == 0

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0, stderr.read_text()
        assert "stopping" in stderr.read_text()
        assert not redis_answers(redis_url.group(1)), "the demo's Redis outlived it"
        assert answers(f"{base}/healthcheck") is None, "Flower outlived the demo"
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()


@pytest.mark.slow
def test_demo_honours_redis_key_prefix(tmp_path):
    """Its processes inherit REDIS_KEY_PREFIX; the demo itself must read the same keys."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "REDIS_"))}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--changes", "400"],
        cwd=ROOT,
        env={**environ, "REDIS_KEY_PREFIX": "acme-subs"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "every identifier is in its last-written state" in result.stderr
    (checked,) = re.findall(r"last-written state\s*│\s*([\d,]+) of ([\d,]+)", result.stdout)
    assert checked[0] == checked[1] and int(checked[0]) > 100, result.stdout
    # The table shows the fill of the requests and what the claims' top-ups took in, and
    # the workload's floor beside it (issue 26): the fewest requests, and those beyond it.
    (fill,) = re.findall(r"fill \(of 50 per request\)\s*│\s*([\d.]+)", result.stdout)
    assert 0 < float(fill) <= 1, result.stdout
    (floor,) = re.findall(
        r"floor: fewest requests \(fill\)\s*│\s*[\d,]+ \(([\d.]+)\)", result.stdout
    )
    assert float(fill) <= float(floor) <= 1, result.stdout
    assert re.search(r"requests beyond the floor\s*│\s*\d+", result.stdout), result.stdout
    assert re.search(r"taken in by a top-up\s*│\s*[\d,]+", result.stdout), result.stdout
