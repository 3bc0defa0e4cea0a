"""Issue 24, RabbitMQ over TLS for real: a private rabbitmq-server with a TLS listener
(`listeners.ssl.default`, a CA and server certificate made here with openssl), a worker and
beat on `amqps://` verified against BROKER_CA_FILE, the simulator over HTTP, default
timings. A certificate from another CA, and plain amqp:// to the TLS port, are refused in
one line each, with no traceback and no password; the password is in no log.

The node is this module's own (started once, ~6 s), in the `rabbitmq` xdist group
(`tls_rabbitmq` in tests/conftest.py's XDIST_GROUP_FIXTURES) so it never runs beside
another RabbitMQ test.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from admin.status import read_status
from delivery.services import reset_services, services
from devtools.certs import make_ca, make_server
from devtools.rabbitmq import RabbitMQ
from devtools.rabbitmq import unavailable as rabbitmq_unavailable
from tasks.celery_app import QUEUE_ORDER
from tasks.producer import enqueue_changes
from tests.conftest import EnqueuedLog, assert_applied_in_order, email, wait_for
from tests.sim_control import sim_states

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
]

USER = "braze-subs"


@dataclass
class TlsNode:
    server: RabbitMQ
    good_ca: Path
    other_ca: Path
    password: str


@pytest.fixture(scope="module")
def tls_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    """A rabbitmq-server answering AMQP over TLS (and plain AMQP on another port, for the
    fixture's own checks), its certificate signed by `good_ca`; a user with a password of
    its own (guest's would be indistinguishable from its user name in the logs)."""
    reason = rabbitmq_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("rabbitmq-tls")
    good = make_ca(directory / "certs", "good-ca")
    other = make_ca(directory / "certs", "other-ca")
    server = RabbitMQ(directory / "node", tls=make_server(directory / "certs", good)).start()
    password = f"pw-{uuid.uuid4().hex}"
    try:
        server.ctl("add_user", USER, password)
        yield TlsNode(server, good, other, password)
    finally:
        server.stop()


@pytest.fixture
def amqps(
    tls_rabbitmq: TlsNode, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """`env` with BROKER_URL=amqps://braze-subs:PASSWORD@localhost:TLS_PORT/VHOST (a fresh
    virtual host) and BROKER_CA_FILE the CA that signed the node. Request it before
    `processes`."""
    server = tls_rabbitmq.server
    vhost = f"t-{uuid.uuid4().hex[:8]}"
    server.ctl("add_vhost", vhost)
    server.ctl("set_permissions", "-p", vhost, USER, ".*", ".*", ".*")
    values = {
        "BROKER_URL": (
            f"amqps://{USER}:{tls_rabbitmq.password}@localhost:{server.tls_port}/{vhost}"
        ),
        "BROKER_CA_FILE": str(tls_rabbitmq.good_ca),
    }
    env.update(values)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    reset_services()
    yield values
    server.delete_vhost(vhost)


def rows(count: int, state: str) -> list[dict[str, Any]]:
    return [
        {"subscription_group_id": "news", "subscription_state": state, "email": email(n)}
        for n in range(count)
    ]


def drained() -> bool:
    found = services()
    status = read_status(found.redis, found.keys)
    return status.pending == 0 and status.in_flight == 0 and status.batches_in_flight == 0


def connections(server: RabbitMQ, vhost: str) -> list[dict[str, Any]]:
    import json

    out = server.ctl("list_connections", "vhost", "user", "ssl", "--formatter", "json")
    listed = json.loads(out[out.index("[") :]) if "[" in out else []
    return [c for c in listed if c["vhost"] == vhost]


def test_a_worker_and_beat_over_amqps_drain_in_order(tls_rabbitmq, amqps, sim, processes):
    """amqps:// with BROKER_CA_FILE: a worker and beat connect over TLS (every connection
    of the virtual host is `ssl`), declare the quorum queues, and deliver every change in
    its last-written state (order oracle). The password is in no process's log (Celery
    shows the URL as `user:**@host`)."""
    sent = EnqueuedLog()
    worker = processes.worker("w1", concurrency=4)
    beat = processes.beat()
    enqueue_changes(sent.add(rows(150, "subscribed")))
    enqueue_changes(sent.add(rows(50, "unsubscribed")), lane="bulk")
    wait_for(drained, timeout=90, interval=0.1, what="everything to drain over amqps")

    states = sim_states(sim)
    assert len(states) == 150
    assert {states[("news", "email", email(n))] for n in range(50)} == {"unsubscribed"}
    assert {states[("news", "email", email(n))] for n in range(50, 150)} == {"subscribed"}
    assert_applied_in_order(sim.url, sent)

    vhost = amqps["BROKER_URL"].rsplit("/", 1)[1]
    seen = connections(tls_rabbitmq.server, vhost)
    assert seen and all(c["ssl"] is True and c["user"] == USER for c in seen), seen
    queues = tls_rabbitmq.server.queues(vhost)
    assert {queues[name]["type"] for name in QUEUE_ORDER} == {"quorum"}
    assert f"amqps://{USER}:**@localhost:{tls_rabbitmq.server.tls_port}/{vhost}" in worker.log()
    for process in (worker, beat):
        assert tls_rabbitmq.password not in process.log()


def refusal_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Cannot connect to" in line]


@pytest.mark.parametrize("wrong", ["other-ca", "plain-amqp-to-the-tls-port"])
def test_a_wrong_ca_or_plain_amqp_to_the_tls_port_is_refused_in_one_line(
    tls_rabbitmq, amqps, processes, wrong
):
    """A worker whose BROKER_CA_FILE is another CA's, or whose BROKER_URL is amqp:// to the
    TLS port, is not let in: each attempt is one line naming the broker with its password
    masked and why (`certificate verify failed`; the connection closed), no traceback,
    the password nowhere, and the worker never ready."""
    if wrong == "other-ca":
        extra = {"BROKER_CA_FILE": str(tls_rabbitmq.other_ca)}
        why: tuple[str, ...] = ("certificate verify failed",)
    else:
        extra = {
            "BROKER_URL": amqps["BROKER_URL"].replace("amqps://", "amqp://", 1),
            "BROKER_CA_FILE": "",
        }
        # The TLS listener drops a connection that does not start a handshake.
        why = ("Connection reset by peer", "Socket closed", "Server unexpectedly closed")
    refused = processes.start("worker", "refused", ["--without-mingle"], extra)
    lines = wait_for(
        lambda: len(found := refusal_lines(refused.log())) >= 2 and found,
        timeout=60,
        what="the worker refused twice",
    )
    log = refused.log()
    assert any(reason in lines[0] for reason in why), lines[0]
    assert f"amqp{'s' if wrong == 'other-ca' else ''}://{USER}:**@" in lines[0], lines[0]
    assert "Traceback" not in log, log[-3000:]
    assert tls_rabbitmq.password not in log
    assert not refused.ready()
    assert refused.alive()  # it keeps trying, as with an unreachable broker
