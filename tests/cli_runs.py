"""Running the `braze-subs` command from tests: in this process through typer's `CliRunner`
(`run_cli`), or for real in a subprocess (`run_real`, `python -m worker ...`) where the
process is what is tested (its exit code, no traceback, the module entry point, a process
pool) or where the test holds services a `run_cli` would reset."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from admin.cli import main
from delivery.services import reset_services
from tests.conftest import ROOT

RUNNER = CliRunner()


def run_cli(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`braze-subs ARGS` in this process (CliRunner's isolation around `admin.cli.main`).
    It resets the process's services before and after: services held across it go stale."""
    # A pipe, as in CI logs: no terminal width to lean on.
    environ: dict[str, str | None] = {"COLUMNS": None, "LINES": None, **(extra_env or {})}
    argv = sys.argv
    with RUNNER.isolation(input="", env=environ) as (stdout, stderr, _output):
        reset_services()  # settings and clients as this call's environment gives them
        sys.argv = ["braze-subs", *args]
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = argv
            reset_services()
        return subprocess.CompletedProcess(
            ["braze-subs", *args], code, stdout.getvalue().decode(), stderr.getvalue().decode()
        )


def run_real(
    *args: str, extra_env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m worker ARGS` in a subprocess, in this process's environment."""
    environ = {**os.environ, **(extra_env or {})}
    # A pipe, as in CI logs: no terminal width to lean on.
    for name in ("COLUMNS", "LINES"):
        environ.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    lines = stderr_lines(result)
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    for needle in needles:
        assert needle in lines[0], lines[0]
