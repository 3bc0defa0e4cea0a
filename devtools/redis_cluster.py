"""A private Redis Cluster for the tests and benchmarks: 3 masters and 3 replicas, each a
`redis-server --cluster-enabled yes` on a free port of 127.0.0.1 (its cluster bus on port
+ 10000), joined by `redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`.
Failover helpers (`failover`: CLUSTER FAILOVER on a replica; `kill_master`: SIGKILL;
`kill_master_unreplaced` then `promote`: an outage as long as the test makes it) let a
test move a slot's master mid-run. Stopped, every node, at the end.

The nodes' `cluster-node-timeout` is 2 s (Redis's default 15 s) so a killed master's
replica takes over within a test's patience; everything else is Redis's default, with no
persistence (a node killed here is never restarted with its data).

Dev tooling: not on the product's import path.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

from redis import Redis

from devtools.processes import port_is_free, wait_until

MASTERS = 3
NODE_TIMEOUT_MS = 2000
SLOTS = 16384


def unavailable() -> str | None:
    """Why a private Redis Cluster cannot be started here, or None."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        return "redis-server / redis-cli not installed (./dev install installs them)"
    version = subprocess.run([server, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"v=(\d+)\.", version.stdout)
    if found is None or int(found.group(1)) < 5:
        # Cluster mode is in every redis-server since 3.0; `redis-cli --cluster` since 5.0.
        return f"redis-server {version.stdout.strip()!r} is older than 5 (no redis-cli --cluster)"
    return None


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections (Linux; 32768 else)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, both below the kernel's
    ephemeral range: a port from that range can be taken by any outgoing connection between
    this check and the node's bind (seen: the bus port 48035 taken, the node aborting)."""
    high = _ephemeral_low() - 10000 - 1
    for _ in range(500):
        port = random.randint(max(1024, high - 12000), high)
        if port_is_free(port) and port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


class RedisCluster:
    """The nodes of one private cluster under `directory`; `url` is its REDIS_URL."""

    def __init__(self, directory: Path, masters: int = MASTERS) -> None:
        self.directory = directory
        self.ports = [_cluster_port() for _ in range(masters * 2)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """`redis+cluster://` naming every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def node(self, port: int) -> Redis:
        return Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start(self, timeout: float = 60.0, create: bool = True) -> RedisCluster:
        """Start every node; with `create`, join them (`redis-cli --cluster create`) and
        wait until the cluster is healthy. Without it the nodes answer but know only
        themselves (for a test that joins them its own way, e.g. docker-compose.yml's
        `redis-cluster-create` command)."""
        binary = shutil.which("redis-server")
        assert binary is not None
        for port in self.ports:
            folder = self.directory / str(port)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "redis.log", "ab") as log:
                self.processes[port] = subprocess.Popen(
                    [
                        binary,
                        "--port", str(port),
                        "--bind", "127.0.0.1",
                        "--dir", str(folder),
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                        "--save", "",
                        "--appendonly", "no",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
        try:
            for port in self.ports:
                wait_until(lambda p=port: self._pings(p), timeout=10, what=f"redis-server :{port}")
            if not create:
                return self
            created = subprocess.run(
                [
                    "redis-cli", "--cluster", "create",
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-replicas", "1", "--cluster-yes",
                ],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]}")
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _pings(self, port: int) -> bool:
        process = self.processes[port]
        if process.poll() is not None:
            log = (self.directory / str(port) / "redis.log").read_text(errors="replace")
            raise RuntimeError(f"redis-server :{port} exited: {log[-2000:]}")
        with contextlib.suppress(Exception):
            return bool(self.node(port).ping())
        return False

    def alive_ports(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    def info(self, port: int) -> dict[str, str]:
        info = self.node(port).execute_command("CLUSTER INFO")  # redis-py parses it
        return {str(name): str(value) for name, value in info.items()}

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every live node says `cluster_state:ok` and knows every slot, every live
        node is a master serving slots or a replica of one, and every replica's link to
        its master is up (synchronised: it could be promoted)."""

        def healthy() -> bool:
            try:
                for port in self.alive_ports():
                    info = self.info(port)
                    if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(
                        SLOTS
                    ):
                        return False
                shards = self.shards()
                for replicas in shards.values():
                    for port in replicas:  # synchronised, so a failover can promote it
                        replication = self.node(port).info("replication")
                        if replication.get("master_link_status") != "up":
                            return False
                # Every live node in place: a master per shard, the rest its replicas.
                return sum(1 + len(replicas) for replicas in shards.values()) == len(
                    self.alive_ports()
                ) and all(shards.values()) == (len(self.alive_ports()) >= 2 * len(shards))
            except Exception:
                return False

        wait_until(healthy, timeout=timeout, what="cluster_state:ok on every node")

    def shards(self) -> dict[int, list[int]]:
        """Master port (of each master serving slots) -> its replicas' ports, as a live
        node sees the cluster now; failed nodes left out."""
        nodes = self.node(self.alive_ports()[0]).execute_command("CLUSTER NODES")
        port_of = {row["node_id"]: int(address.split("@")[0].rsplit(":", 1)[1])
                   for address, row in nodes.items()}  # fmt: skip
        shards: dict[int, list[int]] = {}
        live = [row for row in nodes.values() if "fail" not in row["flags"].split(",")]
        for row in live:
            if "master" in row["flags"].split(",") and row["slots"]:
                shards[port_of[row["node_id"]]] = []
        for row in live:
            master = port_of.get(row["master_id"])
            if "slave" in row["flags"].split(",") and master in shards:
                shards[master].append(port_of[row["node_id"]])
        return shards

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot now."""
        port = self.alive_ports()[0]
        slot = int(self.node(port).execute_command("CLUSTER KEYSLOT", key))
        for entry in self.node(port).execute_command("CLUSTER SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                return int(entry[2][1])
        raise LookupError(f"no master serves slot {slot}")

    def failover(self, master: int, timeout: float = 60.0) -> int:
        """CLUSTER FAILOVER on a replica of `master` (a coordinated hand-over: the replica
        catches up first, no write is lost); returns the new master's port."""
        replica = self.shards()[master][0]
        self.node(replica).execute_command("CLUSTER FAILOVER")
        wait_until(
            lambda: replica in self.shards() and master not in self.shards(),
            timeout=timeout,
            what=f"replica :{replica} to take over from :{master}",
        )
        self.wait_healthy(timeout)
        return replica

    def kill_master(self, master: int, timeout: float = 60.0) -> int:
        """SIGKILL `master`; returns the port of the replica the cluster promoted once
        `cluster_state:ok` is back (writes it had not yet passed on are lost)."""
        replicas = self.shards()[master]
        process = self.processes[master]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

        def promoted() -> int | None:
            shards = self.shards()
            return next((port for port in replicas if port in shards), None)

        new = wait_until(promoted, timeout=timeout, what=f"a replica of :{master} promoted")
        self.wait_healthy(timeout)
        return int(new)

    def kill_master_unreplaced(self, master: int) -> list[int]:
        """SIGKILL `master` with its replicas told not to take over by themselves
        (`cluster-replica-no-failover yes`): its slots have no master until `promote`, an
        outage as long as the caller makes it (a slow failover: Redis's default
        cluster-node-timeout is 15 s). Returns the replicas' ports."""
        replicas = self.shards()[master]
        for port in replicas:
            self.node(port).config_set("cluster-replica-no-failover", "yes")
        process = self.processes[master]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        return replicas

    def promote(self, replica: int, timeout: float = 60.0) -> int:
        """End the outage `kill_master_unreplaced` began: CLUSTER FAILOVER FORCE on
        `replica` (its master is gone, so no hand-over), then wait until it serves the
        slots and the cluster is healthy; returns its port."""
        node = self.node(replica)
        node.config_set("cluster-replica-no-failover", "no")
        node.execute_command("CLUSTER FAILOVER", "FORCE")
        wait_until(
            lambda: replica in self.shards(), timeout=timeout, what=f"replica :{replica} promoted"
        )
        self.wait_healthy(timeout)
        return replica

    def flush(self) -> None:
        """FLUSHALL on every master (the replicas follow)."""
        for master in self.shards():
            self.node(master).flushall()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
