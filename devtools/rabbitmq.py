"""A private rabbitmq-server for the tests and benchmarks (Debian's package, `./dev install`):
its own node name, ports (AMQP, Erlang distribution, epmd) and data directory, all through
RABBITMQ_* variables, so it never meets a system RabbitMQ or another run's. Stopped (and its
epmd with it) at the end.

A node may also listen for AMQP over TLS (`TlsFiles`: a CA, certificate and key made by the
caller, `rabbitmq.conf`'s `listeners.ssl.default` and `ssl_options.*`), and three nodes may
form a RabbitMQ cluster on this one machine (`RabbitMQCluster`: one Erlang cookie and one
private epmd shared, distinct node names and ports, `rabbitmqctl join_cluster`).

Dev tooling: not on the product's import path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS listener: the CA that signed the certificate, the certificate
    and its key."""

    ca: Path
    certificate: Path
    key: Path


class RabbitMQ:
    """One rabbitmq-server node on 127.0.0.1 with its data under `directory`; with `tls`,
    also an AMQP-over-TLS listener on `tls_port`. `cookie` and `epmd_port` are given to
    the nodes of one cluster (they must share both); by default the node has its own."""

    def __init__(
        self,
        directory: Path,
        *,
        tls: TlsFiles | None = None,
        cookie: str | None = None,
        epmd_port: int | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port() if tls is not None else None
        self.cookie = cookie
        self.node = f"braze-subs-{self.port}@localhost"
        self.env = {
            **os.environ,
            "HOME": str(directory),  # the Erlang cookie the node and rabbitmqctl share
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            # A private epmd, stopped with the node (a cluster's nodes share one).
            "ERL_EPMD_PORT": str(epmd_port or free_port()),
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

    def url(self, vhost: str = "", *, host: str = "127.0.0.1") -> str:
        return f"amqp://{GUEST[0]}:{GUEST[1]}@{host}:{self.port}/{vhost}"

    def tls_url(self, vhost: str = "", *, host: str = "localhost") -> str:
        """amqps:// to the TLS listener, by the name its certificate carries."""
        assert self.tls_port is not None, "this node has no TLS listener"
        return f"amqps://{GUEST[0]}:{GUEST[1]}@{host}:{self.tls_port}/{vhost}"

    def _write_config(self) -> None:
        (self.directory / "enabled_plugins").write_text("[].\n")
        if self.cookie is not None:  # the Erlang cookie under HOME, owner-only as required
            cookie = self.directory / ".erlang.cookie"
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        lines = []
        if self.tls is not None:
            # The TLS listener beside the plain one (which the fixture's own probe and
            # rabbitmqctl-free checks use). Clients are not asked for a certificate.
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self.tls.ca}",
                f"ssl_options.certfile = {self.tls.certificate}",
                f"ssl_options.keyfile = {self.tls.key}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.directory / "rabbitmq.conf").write_text("".join(f"{line}\n" for line in lines))

    def start(self, timeout: float = 90.0) -> RabbitMQ:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_config()
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

    def kill(self) -> None:
        """kill -9 of the node (its Erlang VM and the VM's helpers); its epmd stays."""
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self, *, epmd: bool = True) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.process = None
        found = shutil.which("epmd")
        if epmd and found is not None:  # the private epmd the node started
            subprocess.run(
                [found, "-kill"], env=self.env, capture_output=True, timeout=10, check=False
            )


class RabbitMQCluster:
    """`size` rabbitmq-server nodes on 127.0.0.1 joined into one RabbitMQ cluster: one
    Erlang cookie and one private epmd for all, each node its own name, ports and data
    directory. The first node is started, then each other one is started, stopped as an
    app, joined to the first and started again (`rabbitmqctl join_cluster`)."""

    def __init__(self, directory: Path, size: int = 3) -> None:
        cookie = uuid.uuid4().hex.upper()
        epmd_port = free_port()
        self.nodes = [
            RabbitMQ(directory / f"node{n}", cookie=cookie, epmd_port=epmd_port)
            for n in range(1, size + 1)
        ]

    @property
    def first(self) -> RabbitMQ:
        return self.nodes[0]

    def start(self, timeout: float = 120.0) -> RabbitMQCluster:
        try:
            self.first.start(timeout)
            for node in self.nodes[1:]:
                node.start(timeout)
                node.ctl("stop_app")
                node.ctl("join_cluster", self.first.node)
                node.ctl("start_app")
            wait_until(
                lambda: len(self.running_nodes()) == len(self.nodes),
                timeout=timeout,
                what="every node running in the cluster",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> list[RabbitMQ]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def ctl(self, *args: str) -> str:
        """rabbitmqctl against the first node still alive."""
        return self.alive()[0].ctl(*args)

    def running_nodes(self) -> list[str]:
        status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        return list(status.get("running_nodes", []))

    def node_named(self, name: str) -> RabbitMQ:
        return next(n for n in self.nodes if n.node == name)

    def url(self, vhost: str = "", nodes: Sequence[RabbitMQ] | None = None) -> str:
        """kombu's failover form: `amqp://...@n1/vhost;amqp://...@n2/vhost;...`."""
        return ";".join(node.url(vhost) for node in (nodes or self.nodes))

    def add_vhost(self) -> str:
        vhost = f"t-{uuid.uuid4().hex[:8]}"
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, GUEST[0], ".*", ".*", ".*")
        return vhost

    def queues(self, vhost: str) -> dict[str, dict[str, Any]]:
        """Each queue of `vhost` by name: type, leader, members, online members, ready and
        unacknowledged counts (rabbitmqctl list_queues on a live node)."""
        out = self.ctl(
            "list_queues", "-p", vhost, "name", "type", "leader", "members", "online",
            "messages_ready", "messages_unacknowledged", "consumers", "--formatter", "json",
        )  # fmt: skip
        rows = json.loads(out[out.index("[") :]) if "[" in out else []
        return {row["name"]: row for row in rows}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop(epmd=node is self.first)
