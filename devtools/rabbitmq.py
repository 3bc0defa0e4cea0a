"""A private rabbitmq-server for the tests and benchmarks (Debian's package, `./dev install`):
its own node name, ports (AMQP, Erlang distribution, epmd) and data directory, all through
RABBITMQ_* variables, so it never meets a system RabbitMQ or another run's. Stopped (and its
epmd with it) at the end.

Dev tooling: not on the product's import path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import amqp

from devtools.processes import free_port, wait_until

# Debian's /usr/sbin/rabbitmq-server switches to the `rabbitmq` user when started as root,
# which could not write a private data directory; the scripts it wraps run as the caller.
SCRIPTS = Path("/usr/lib/rabbitmq/bin")
GUEST = ("guest", "guest")  # RabbitMQ's default user, accepted on loopback only


def _script(name: str) -> str | None:
    candidate = SCRIPTS / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def unavailable() -> str | None:
    """Why a private rabbitmq-server cannot be started here, or None."""
    if _script("rabbitmq-server") is None or _script("rabbitmqctl") is None:
        return "rabbitmq-server is not installed (./dev install installs it with apt-get)"
    if shutil.which("erl") is None and not Path("/usr/lib/erlang").is_dir():
        return "Erlang (rabbitmq-server's runtime) is not installed"
    return None


class RabbitMQ:
    """One rabbitmq-server node on 127.0.0.1 with its data under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.node = f"braze-subs-{self.port}@localhost"
        self.env = {
            **os.environ,
            "HOME": str(directory),  # the Erlang cookie the node and rabbitmqctl share
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_PORT": str(free_port()),  # a private epmd, stopped with the node
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": str(directory / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(directory / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        }
        self.log = directory / "rabbitmq.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, vhost: str = "") -> str:
        return f"amqp://{GUEST[0]}:{GUEST[1]}@127.0.0.1:{self.port}/{vhost}"

    def start(self, timeout: float = 90.0) -> RabbitMQ:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "enabled_plugins").write_text("[].\n")
        server = _script("rabbitmq-server")
        assert server is not None
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [server],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_until(self._answers, timeout=timeout, what="rabbitmq-server to accept AMQP")
        except TimeoutError:
            tail = self.log.read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"rabbitmq-server did not start; its log ends:\n{tail}") from None
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}")
        try:
            with self.connection():
                return True
        except OSError:
            return False

    def connection(self, vhost: str = "/") -> amqp.Connection:
        connection = amqp.Connection(
            f"127.0.0.1:{self.port}",
            userid=GUEST[0],
            password=GUEST[1],
            virtual_host=vhost,
            connect_timeout=2,
        )
        connection.connect()
        return connection

    def ctl(self, *args: str) -> str:
        ctl = _script("rabbitmqctl")
        assert ctl is not None
        done = subprocess.run(
            [ctl, "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def add_vhost(self) -> str:
        """A fresh virtual host the guest user may use: one test's broker."""
        vhost = f"t-{uuid.uuid4().hex[:8]}"
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, GUEST[0], ".*", ".*", ".*")
        return vhost

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost)

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """Each queue of `vhost` by name: its type, arguments, ready and unacknowledged
        message counts and consumers (rabbitmqctl list_queues)."""
        out = self.ctl(
            "list_queues",
            "-p",
            vhost,
            "name",
            "type",
            "arguments",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "--formatter",
            "json",
        )
        rows = json.loads(out[out.index("[") :]) if "[" in out else []
        return {row["name"]: row for row in rows}

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.process = None
        epmd = shutil.which("epmd")
        if epmd is not None:  # the private epmd the node started
            subprocess.run(
                [epmd, "-kill"], env=self.env, capture_output=True, timeout=10, check=False
            )
