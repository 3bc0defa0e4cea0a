"""`braze-subs status` as an operator reads it: the table the command prints against a real
Redis (the pure sections and warnings: tests/unit/test_status_view.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core.changes import parse_change
from delivery.services import services

ROOT = Path(__file__).resolve().parents[2]


def test_the_status_command_prints_the_sections(env):
    services().buffer.enqueue(
        [
            parse_change(
                {
                    "subscription_group_id": "newsletter",
                    "subscription_state": "subscribed",
                    "email": f"reader{n}@example.com",
                }
            )
            for n in range(1_234)
        ]
    )
    environ = {**os.environ}
    for name in ("COLUMNS", "LINES"):
        environ.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "worker", "status"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    for title in ("BUFFER", "IN FLIGHT", "DEAD LETTERS", "RATE BUDGET", "LAST MINUTE"):
        assert title in lines
    assert any(line.split() == ["pending", "changes", "1,234"] for line in lines), lines
    assert any(line.split() == ["posting", "running"] for line in lines), lines
    assert "reader" not in result.stdout
