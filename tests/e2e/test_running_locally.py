"""README's "Running it locally", run as written (issue 27): every shell block of that section,
in order, in one `bash`, from the repository root, with only its two port numbers (Redis's
and the simulator's) changed to free ones. Real redis-server, simulator, worker and beat;
the blocks themselves wait for what they show (`until ...`), so this test only checks what
they printed and that they stopped everything they started."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from devtools.processes import free_port
from tests.cli_runs import run_real

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
REDIS_PORT, SIM_PORT = "6390", "8700"  # as README writes them


def local_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Running it locally\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_the_readme_blocks_run_as_written(tmp_path: Path):
    blocks = local_blocks()
    assert len(blocks) == 4, "start, send, a fault, stop"
    script = "\n".join(blocks)
    assert script.count(REDIS_PORT) >= 2 and script.count(SIM_PORT) >= 4
    redis_port, sim_port = str(free_port()), str(free_port())
    script = script.replace(REDIS_PORT, redis_port).replace(SIM_PORT, sim_port)
    # A shell as an operator has it: no setting of this test run leaks in.
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("BRAZE_", "REDIS_", "COALESCE_", "CREDENTIALS_", "RETRY_"))
        and name not in ("BATCH_LINGER_SECONDS", "VIRTUAL_ENV")
    }
    environ["HEALTH_DIR"] = str(tmp_path / "health")
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        shell = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=ROOT,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = shell.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        subprocess.run(
            ["redis-cli", "-p", redis_port, "shutdown", "nosave"],
            capture_output=True,
            timeout=30,
        )
    printed = log.read_text()
    assert code == 0, printed[-4000:]
    flat = " ".join(printed.split())
    assert f"Braze simulator on http://127.0.0.1:{sim_port}, accepting the key sim-key" in flat
    assert '"value":"jane@example.com","state":"unsubscribed"' in flat.replace(" ", "")
    assert "posting stopped: Braze refuses the API key" in flat
    assert "Traceback" not in printed
    # Everything it started is gone: the simulator's port is free again, Redis stopped.
    with contextlib.closing(socket.socket()) as probe:
        assert probe.connect_ex(("127.0.0.1", int(sim_port))) != 0


def test_simulate_help_names_the_key_it_accepts():
    done = run_real("simulate", "--help")  # in a pipe: 80 columns, the help wraps
    assert done.returncode == 0, done.stderr
    flat = " ".join(re.sub("[│╭╮╰╯─]", " ", done.stdout).split())
    assert "the workers' BRAZE_API_KEY. [default: (sim-key)]" in flat, flat
    assert "It accepts the key sim-key" in flat and "BRAZE_API_KEY=sim-key" in flat
