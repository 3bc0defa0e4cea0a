"""Flower and the exporter listen where an operator expects (issue 21, item 8): loopback by
default, and Flower never on another address without authentication. Real processes, as
the Procfile starts them; the listening socket is read from /proc/net/tcp(6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.processes import free_port
from tests.conftest import ROOT, wait_for

SECRET = "sk-Secret-Value-0123456789abcdef"


def listening(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (hex as in /proc)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


LOOPBACK_V4 = "0100007F"  # 127.0.0.1, little-endian hex


def child_env(env: dict[str, str], **extra: str) -> dict[str, str]:
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("FLOWER_") and name not in ("METRICS_ADDRESS", "COLUMNS")
    }
    return {**environ, **env, "BRAZE_API_KEY": SECRET, **extra}


def start(command: list[str], environ: dict[str, str], tmp_path: Path) -> subprocess.Popen:
    log = (tmp_path / "out.log").open("w")
    return subprocess.Popen(
        command, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


FLOWER = [sys.executable, "-m", "celery", "-A", "worker.app", "flower"]


def test_flower_as_the_procfile_starts_it_listens_on_loopback_only(env, tmp_path):
    """The Procfile's line, no address given: Flower's own default is every interface."""
    port = free_port()
    process = start([*FLOWER, f"--port={port}"], child_env(env), tmp_path)
    try:
        bound = wait_for(lambda: listening(port), timeout=60, what="Flower to listen")
        assert bound == {LOOPBACK_V4}, (bound, (tmp_path / "out.log").read_text()[-2000:])
    finally:
        stop(process)


@pytest.mark.parametrize(
    ("arguments", "extra"),
    [
        (["--address=0.0.0.0"], {}),
        ([], {"FLOWER_ADDRESS": "0.0.0.0"}),
        (["--address=10.1.2.3"], {}),
    ],
    ids=["argument", "environment", "an-interface"],
)
def test_flower_refuses_a_non_loopback_address_without_basic_auth(env, arguments, extra):
    port = free_port()
    result = subprocess.run(
        [*FLOWER, f"--port={port}", *arguments],
        cwd=ROOT,
        env=child_env(env, **extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("braze-subs: FLOWER_BASIC_AUTH: required"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert SECRET not in result.stderr + result.stdout


def test_flower_on_every_interface_with_basic_auth_starts(env, tmp_path):
    port = free_port()
    process = start(
        [*FLOWER, f"--port={port}"],
        child_env(env, FLOWER_ADDRESS="0.0.0.0", FLOWER_BASIC_AUTH="admin:a-long-password"),
        tmp_path,
    )
    try:
        bound = wait_for(lambda: listening(port), timeout=60, what="Flower to listen")
        assert bound == {"00000000"}, bound
    finally:
        stop(process)


def test_the_exporter_listens_on_loopback_unless_told(env, tmp_path):
    port = free_port()
    process = start(
        [sys.executable, "-m", "worker", "metrics", "--port", str(port)], child_env(env), tmp_path
    )
    try:
        bound = wait_for(lambda: listening(port), timeout=60, what="the exporter to listen")
        assert bound == {LOOPBACK_V4}, (bound, (tmp_path / "out.log").read_text()[-2000:])
    finally:
        stop(process)
    port = free_port()
    process = start(
        [sys.executable, "-m", "worker", "metrics", "--port", str(port)],
        child_env(env, METRICS_ADDRESS="0.0.0.0"),
        tmp_path,
    )
    try:
        bound = wait_for(lambda: listening(port), timeout=60, what="the exporter to listen")
        assert bound == {"00000000"}, bound
    finally:
        stop(process)
