"""Issue 10, TLS and high availability: a real redis-server with TLS (a CA and a server
certificate made with openssl here), a real Sentinel (`redis-server --sentinel`) and a
unix socket - for braze-subs' own Redis clients, the Celery broker, and a real worker."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from config.settings import SettingsError, load_settings
from delivery.services import reset_services, services
from devtools.certs import make_ca, openssl
from devtools.processes import free_port, wait_until
from stores.connection import redis_client
from tasks.producer import enqueue_change
from tests.conftest import wait_for
from tests.sim_control import sim_states

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_redis(directory: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", "--save", "", "--appendonly", "no", "--dir", str(directory), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[Server, Path, Path]]:
    """A redis-server answering only TLS; (server, the CA that signed it, another CA)."""
    good = make_ca(tmp_path, "good-ca")
    bad = make_ca(tmp_path, "other-ca")
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost", cwd=tmp_path,
    )  # fmt: skip
    (tmp_path / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "good-ca.crt", "-CAkey", "good-ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.cnf",
        cwd=tmp_path,
    )  # fmt: skip
    port = free_port()
    process = start_redis(
        tmp_path,
        "--port", "0", "--bind", "127.0.0.1", "--tls-port", str(port),
        "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(good), "--tls-auth-clients", "no",
    )  # fmt: skip
    server = Server(process, f"rediss://127.0.0.1:{port}/0")
    probe = Redis.from_url(server.url, ssl_ca_certs=str(good))
    wait_until(lambda: _pings(probe), timeout=10, what="redis-server with TLS")
    yield server, good, bad
    server.stop()


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def test_our_clients_verify_the_certificate(tls_redis):
    server, good, bad = tls_redis
    assert redis_client(load_settings(redis_url=server.url, redis_ca_file=str(good))).ping()
    with pytest.raises(RedisConnectionError, match="certificate verify failed"):
        redis_client(load_settings(redis_url=server.url, redis_ca_file=str(bad))).ping()
    # The URL's own parameter works too.
    assert redis_client(load_settings(redis_url=f"{server.url}?ssl_ca_certs={good}")).ping()


def test_the_broker_verifies_the_certificate(tls_redis):
    # Imported here: importing tasks.celery_app at collection would bind its module-level
    # app to whatever REDIS_URL the collecting process had.
    from tasks.celery_app import create_app

    server, good, bad = tls_redis
    app = create_app(load_settings(redis_url=server.url, redis_ca_file=str(good)))
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        assert connection.connected
    app = create_app(load_settings(redis_url=server.url, redis_ca_file=str(bad)))
    with (
        pytest.raises(Exception, match="certificate verify failed"),
        app.connection_for_write() as connection,
    ):
        connection.ensure_connection(max_retries=1)


def test_verification_cannot_be_turned_off_by_the_url(tls_redis):
    server, _good, _bad = tls_redis
    with pytest.raises(SettingsError, match="REDIS_URL: ssl_cert_reqs must stay 'required'"):
        load_settings(redis_url=f"{server.url}?ssl_cert_reqs=none")


def test_a_worker_over_tls_delivers_and_a_wrong_ca_is_refused(
    tls_redis, env, sim, processes, monkeypatch
):
    server, good, bad = tls_redis
    refused = processes.start(
        "worker", "bad-ca", ["-Q", "celery"], {"REDIS_URL": server.url, "REDIS_CA_FILE": str(bad)}
    )
    tls_env = {"REDIS_URL": server.url, "REDIS_CA_FILE": str(good)}
    for name, value in tls_env.items():
        monkeypatch.setenv(name, value)
    reset_services()
    processes.worker("w1", concurrency=2, extra_env=tls_env)
    processes.start("beat", "beat", extra_env=tls_env)
    enqueue_change(subscription_group_id="news", subscription_state="subscribed", email="a@b.co")
    wait_for(lambda: sim_states(sim), timeout=30, what="the change delivered over TLS")
    assert sim_states(sim) == {("news", "email", "a@b.co"): "subscribed"}
    wait_for(
        lambda: "certificate verify failed" in refused.log(),
        timeout=30,
        what="the worker with the wrong CA to be refused",
    )
    assert not refused.ready()
    services().redis.flushall()
    reset_services()


# --------------------------------------------------------------------------------------
# Sentinel and unix sockets
# --------------------------------------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[str]:
    """A master and one sentinel watching it as `mymaster`; yields the sentinel:// URL."""
    master_port, sentinel_port = free_port(), free_port()
    master = start_redis(tmp_path, "--port", str(master_port), "--bind", "127.0.0.1")
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
    )
    watcher = subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = Redis(port=sentinel_port)

    def knows_master() -> bool:
        try:
            return bool(probe.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster"))
        except Exception:
            return False

    wait_until(knows_master, timeout=15, what="the sentinel to know its master")
    yield f"sentinel://127.0.0.1:{sentinel_port}/0"
    for process in (watcher, master):
        process.terminate()
        process.wait(timeout=10)


def test_sentinel_for_our_clients_and_a_worker(sentinel, env, sim, processes, monkeypatch):
    with pytest.raises(SettingsError, match="REDIS_SENTINEL_MASTER: required"):
        load_settings(redis_url=sentinel)
    ha_env = {"REDIS_URL": sentinel, "REDIS_SENTINEL_MASTER": "mymaster"}
    for name, value in ha_env.items():
        monkeypatch.setenv(name, value)
    reset_services()
    assert services().redis.ping()
    processes.worker("w1", concurrency=2, extra_env=ha_env)
    processes.start("beat", "beat", extra_env=ha_env)
    enqueue_change(subscription_group_id="news", subscription_state="subscribed", email="s@b.co")
    wait_for(lambda: sim_states(sim), timeout=30, what="the change delivered via Sentinel")
    assert sim_states(sim) == {("news", "email", "s@b.co"): "subscribed"}
    reset_services()


def test_unix_socket_for_our_clients_and_a_worker(tmp_path, env, sim, processes, monkeypatch):
    socket = tmp_path / "redis.sock"
    server = start_redis(tmp_path, "--port", "0", "--unixsocket", str(socket))
    try:
        url = f"unix://{socket}?db=0"
        probe = Redis.from_url(url)
        wait_until(lambda: _pings(probe), timeout=10, what="redis-server on a unix socket")
        monkeypatch.setenv("REDIS_URL", url)
        reset_services()
        processes.worker("w1", concurrency=2, extra_env={"REDIS_URL": url})
        processes.start("beat", "beat", extra_env={"REDIS_URL": url})
        enqueue_change(
            subscription_group_id="news", subscription_state="subscribed", email="u@b.co"
        )
        wait_for(lambda: sim_states(sim), timeout=30, what="the change delivered via a socket")
        assert sim_states(sim) == {("news", "email", "u@b.co"): "subscribed"}
        reset_services()
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_a_password_protected_unix_socket_for_our_clients_and_the_broker(tmp_path, form):
    """Issue 21, item 8: the password of a unix:// REDIS_URL reached our clients but not
    the broker (kombu's redis+socket:// takes it only from its userinfo): Celery said
    "Authentication required". Both forms redis-py reads, through a real redis-server."""
    from tasks.celery_app import create_app

    socket = tmp_path / "redis.sock"
    server = start_redis(
        tmp_path, "--port", "0", "--unixsocket", str(socket), "--requirepass", "s3cret-pw"
    )
    try:
        if form == "userinfo":
            url = f"unix://:s3cret-pw@{socket}?db=0"
        else:
            url = f"unix://{socket}?password=s3cret-pw&db=0"
        probe = Redis.from_url(url)
        wait_until(lambda: _pings(probe), timeout=10, what="redis-server on a unix socket")
        settings = load_settings(redis_url=url)
        assert redis_client(settings).ping()
        app = create_app(settings)
        with app.connection_for_write() as connection:
            queue = connection.SimpleQueue("braze-subs-test-socket")
            queue.put({"n": 1})
            assert queue.get(timeout=10).payload == {"n": 1}
            queue.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


# --------------------------------------------------------------------------------------
# The broker on its own (issue 24): BROKER_URL on another Redis, the state on REDIS_URL
# --------------------------------------------------------------------------------------


def _kombu_keys(client: Redis) -> list[bytes]:
    return [key for key in client.scan_iter("_kombu.binding.*")]


def test_a_sentinel_broker_of_its_own_beside_the_state(sentinel, env, sim, processes):
    """BROKER_URL=sentinel://... (REDIS_SENTINEL_MASTER names its master), REDIS_URL the
    session's Redis: a worker and beat deliver, Celery's queues live on the sentinel's
    master and none on REDIS_URL's Redis."""
    broker_env = {"BROKER_URL": sentinel, "REDIS_SENTINEL_MASTER": "mymaster"}
    processes.worker("w1", concurrency=2, extra_env=broker_env)
    processes.start("beat", "beat", extra_env=broker_env)
    enqueue_change(subscription_group_id="news", subscription_state="subscribed", email="t@b.co")
    wait_for(lambda: sim_states(sim), timeout=30, what="the change delivered")
    assert sim_states(sim) == {("news", "email", "t@b.co"): "subscribed"}
    port = int(sentinel.rsplit(":", 1)[1].split("/")[0])
    host, master_port = Redis(port=port).execute_command(
        "SENTINEL", "get-master-addr-by-name", "mymaster"
    )
    assert _kombu_keys(Redis(host=host.decode(), port=int(master_port)))
    assert not _kombu_keys(Redis.from_url(env["REDIS_URL"]))


def test_a_unix_socket_broker_of_its_own_beside_the_state(tmp_path, env, sim, processes):
    """BROKER_URL=unix://...: the `celery` command copies BROKER_URL into CELERY_BROKER_URL,
    which Celery prefers to the app's kombu URL (redis+socket://); the copy is dropped, so
    the worker and beat reach the socket, and the state stays on REDIS_URL."""
    socket = tmp_path / "broker.sock"
    server = start_redis(tmp_path, "--port", "0", "--unixsocket", str(socket))
    try:
        url = f"unix://{socket}?db=0"
        probe = Redis.from_url(url)
        wait_until(lambda: _pings(probe), timeout=10, what="redis-server on a unix socket")
        processes.worker("w1", concurrency=2, extra_env={"BROKER_URL": url})
        processes.start("beat", "beat", extra_env={"BROKER_URL": url})
        enqueue_change(
            subscription_group_id="news", subscription_state="subscribed", email="v@b.co"
        )
        wait_for(lambda: sim_states(sim), timeout=30, what="the change delivered")
        assert sim_states(sim) == {("news", "email", "v@b.co"): "subscribed"}
        assert _kombu_keys(probe)
        assert not _kombu_keys(Redis.from_url(env["REDIS_URL"]))
    finally:
        server.terminate()
        server.wait(timeout=10)
