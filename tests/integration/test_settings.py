"""Processes stop at start with one line naming a malformed setting (real subprocesses;
the pure settings tests are in tests/unit/test_settings.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-Secret-Value-0123456789abcdef"


def _setting_env_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


# --------------------------------------------------------------------------------------
# Processes stop at start with one line (subprocesses: ~1 s each)
# --------------------------------------------------------------------------------------


def _child_env(**extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(("BRAZE_", "REDIS_"))
        and name.upper() not in _setting_env_names()
        # Rich wraps at COLUMNS (80 when unset); an unset width is what services see.
        and name not in ("COLUMNS", "LINES")
    }
    return {**env, "BRAZE_API_KEY": SECRET, **extra}


@pytest.mark.parametrize(
    ("command", "env", "variable"),
    [
        (["-m", "worker", "status"], {"BRAZE_RATE_LIMIT": "abc"}, "BRAZE_RATE_LIMIT"),
        # A message longer than 80 characters must not be wrapped onto a second line.
        (["-m", "worker", "status"], {"BRAZE_INSTANCE": "US-99"}, "BRAZE_INSTANCE"),
        (
            ["-m", "celery", "-A", "worker.app", "beat"],
            {"BRAZE_RATE_LIMIT": "abc"},
            "BRAZE_RATE_LIMIT",
        ),
        # Issue 24: a malformed BROKER_URL, its password (the secret) never shown.
        (
            ["-m", "celery", "-A", "worker.app", "worker"],
            {"BROKER_URL": f"amqp://app:{SECRET}@:5672/braze"},
            "BROKER_URL",
        ),
        (
            ["-m", "celery", "-A", "worker.app", "beat"],
            {"BROKER_URL": f"rabbitmq://app:{SECRET}@rabbit/"},
            "BROKER_URL",
        ),
    ],
    ids=[
        "cli-status",
        "cli-status-long-message",
        "celery-beat",
        "celery-worker-broker-url",
        "celery-beat-broker-scheme",
    ],
)
def test_process_stops_with_one_line(command, env, variable):
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=_child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert SECRET not in result.stderr + result.stdout
