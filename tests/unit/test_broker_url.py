"""BROKER_URL (issue 24, the broker on its own): the setting's checks and what it makes of
Celery's configuration. Pure: no broker is contacted (tests/e2e/test_rabbitmq.py does)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from config.settings import SettingsError, load_settings
from stores.connection import broker_options, broker_queue_arguments

SECRET = "s3cret-pw"


def test_unset_the_broker_is_redis_url_as_before():
    settings = load_settings(redis_url="redis://r:6379/2")
    assert settings.broker_url is None and settings.broker == "redis://r:6379/2"
    assert broker_options(settings)["broker_url"] == "redis://r:6379/2"
    assert broker_queue_arguments(settings) is None


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://app:{SECRET}@rabbit:5672/braze",
        f"amqps://app:{SECRET}@rabbit.example.com/braze",
        f"redis://:{SECRET}@broker-redis:6379/0",
        "unix:///run/broker.sock?db=1",
    ],
)
def test_a_broker_of_its_own_is_accepted(url):
    settings = load_settings(redis_url="redis://state:6379/0", broker_url=url)
    assert settings.broker == url
    assert settings.redis_url == "redis://state:6379/0"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"http://u:{SECRET}@rabbit/", "must start with amqp://, amqps://, redis://"),
        (f"amqp://u:{SECRET}@:5672/", "amqp:// needs a host"),
        (f"amqp://u:{SECRET}@rabbit:56x2/", "the port is not a number"),
        (f"amqp://u:{SECRET}@a/;amqps://u:{SECRET}@b/", "node 2 of 2: every node must be amqp://"),
        (f"amqp://u:{SECRET}@a/;amqp://u:{SECRET}@/", "node 2 of 2: amqp:// needs a host"),
        (f"amqp://u:{SECRET}@a/;amqp://u:{SECRET}@b:x/;amqp://c/", "node 2 of 3: the port is"),
        (f"rediss://u:{SECRET}@r/0?ssl_cert_reqs=none", "ssl_cert_reqs must stay 'required'"),
        (f"sentinel://:{SECRET}@s:26x79", "a sentinel's port is not a number"),
    ],
)
def test_a_malformed_broker_url_is_one_line_naming_it_without_its_password(url, says):
    with pytest.raises(SettingsError) as caught:
        load_settings(broker_url=url)
    message = str(caught.value)
    assert message.startswith("BROKER_URL: ") and says in message
    assert SECRET not in message and "\n" not in message


def test_a_sentinel_broker_needs_the_master_name():
    with pytest.raises(SettingsError, match="REDIS_SENTINEL_MASTER: required with a sentinel"):
        load_settings(broker_url="sentinel://s1:26379")
    settings = load_settings(broker_url="sentinel://s1:26379", redis_sentinel_master="m")
    assert broker_options(settings)["broker_transport_options"]["master_name"] == "m"


def test_rabbitmq_gets_quorum_queues_and_publisher_confirms():
    settings = load_settings(broker_url="amqp://u:p@rabbit/braze")
    options = broker_options(settings)
    assert options["broker_url"] == "amqp://u:p@rabbit/braze"
    assert options["broker_transport_options"] == {"confirm_publish": True}
    assert options["task_create_missing_queue_type"] == "quorum"
    assert broker_queue_arguments(settings) == {"x-queue-type": "quorum"}
    assert "broker_use_ssl" not in options
    # celery#9512: the prefetch lowered after a reconnection never comes back on quorum
    # queues (per-consumer QoS); tests/e2e/test_rabbitmq_cluster.py measures the stall.
    assert options["worker_enable_prefetch_count_reduction"] is False
    redis = broker_options(load_settings(broker_url="redis://broker/1"))
    assert "worker_enable_prefetch_count_reduction" not in redis


def test_amqps_verifies_the_certificate_and_the_host_name():
    options = broker_options(load_settings(broker_url="amqps://u:p@rabbit.example.com/v"))
    # py-amqp: `context` goes to ssl.create_default_context (CERT_REQUIRED, system CAs);
    # a server_hostname of None is replaced by the URL's host by kombu.
    assert options["broker_use_ssl"] == {
        "context": {"check_hostname": True},
        "server_hostname": None,
    }


def test_amqps_with_broker_ca_file_verifies_against_that_ca_only(tmp_path):
    ca = tmp_path / "rabbit-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    options = broker_options(
        load_settings(broker_url="amqps://u:p@rabbit.example.com/v", broker_ca_file=str(ca))
    )
    assert options["broker_use_ssl"] == {
        "context": {"check_hostname": True, "cafile": str(ca)},
        "server_hostname": None,
    }


@pytest.mark.parametrize(
    ("broker", "says"),
    [
        ("amqp://u:p@rabbit/v", "BROKER_CA_FILE: only for an amqps:// BROKER_URL"),
        (None, "BROKER_CA_FILE: only for an amqps:// BROKER_URL"),
        ("amqps://u:p@rabbit/v", "BROKER_CA_FILE: no such file"),
    ],
)
def test_broker_ca_file_is_checked_in_one_line(tmp_path, broker, says):
    ca = tmp_path / "ca.pem"
    if "no such file" not in says:
        ca.write_text("pem")
    with pytest.raises(SettingsError) as caught:
        load_settings(broker_url=broker, broker_ca_file=str(ca))
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert "p@rabbit" not in str(caught.value)


def test_a_rabbitmq_cluster_is_listed_node_by_node():
    """kombu's failover form: the nodes `;`-joined, whole URLs, spaces around them dropped;
    Celery gets the list as it is (kombu tries the next node when one is lost)."""
    nodes = [f"amqp://u:{SECRET}@rabbit-{n}:5672/braze" for n in range(3)]
    settings = load_settings(broker_url=" ; ".join(nodes))
    assert settings.broker == ";".join(nodes)
    assert broker_options(settings)["broker_url"] == ";".join(nodes)
    assert broker_queue_arguments(settings) == {"x-queue-type": "quorum"}
    tls = load_settings(broker_url=";".join(n.replace("amqp:", "amqps:") for n in nodes))
    assert broker_options(tls)["broker_use_ssl"]["context"]["check_hostname"] is True


def test_a_rediss_broker_is_verified_like_redis_url():
    options = broker_options(
        load_settings(redis_url="redis://state/0", broker_url="rediss://broker:6380/0")
    )
    assert options["broker_use_ssl"]["ssl_check_hostname"] is True


def _app_conf(env: dict[str, str]) -> str:
    """The worker app's broker URL and its queues' arguments, in a fresh interpreter (the
    app is built on import) with `env` as the `celery` command would leave it."""
    code = (
        "from tasks.celery_app import app, QUEUE_ORDER\n"
        "queues = {q.name: q.queue_arguments for q in app.conf.task_queues}\n"
        "assert set(queues) == set(QUEUE_ORDER)\n"
        "print(app.conf.broker_url, sorted(map(str, queues.values())))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_every_queue_of_the_app_is_a_quorum_queue_on_rabbitmq():
    shown = _app_conf({"BROKER_URL": "amqp://u:p@rabbit/braze"})
    assert shown.startswith("amqp://u:p@rabbit/braze ")
    assert shown.count("'x-queue-type': 'quorum'") == 4, shown
    assert "None" in _app_conf({"BROKER_URL": "redis://broker/1"})


def test_the_celery_commands_copy_of_broker_url_does_not_bypass_the_app():
    """`celery` copies BROKER_URL into CELERY_BROKER_URL, which Celery prefers: the unix://
    socket must still reach kombu as redis+socket://."""
    url = "unix:///run/broker.sock?db=3"
    shown = _app_conf({"BROKER_URL": url, "CELERY_BROKER_URL": url})
    assert shown.startswith("redis+socket:///run/broker.sock?virtual_host=3 "), shown


def test_a_rabbitmq_clusters_url_is_shown_with_every_nodes_password_masked():
    """What our own messages would show of a RabbitMQ cluster's BROKER_URL (Celery masks
    its own as `user:**@`, e2e/test_rabbitmq_tls.py reads it in the worker's log)."""
    from core.redaction import redact_url

    url = ";".join(f"amqps://app:{SECRET}@rabbit-{n}:5671/braze" for n in range(3))
    shown = redact_url(url)
    assert SECRET not in shown
    assert shown == ";".join(f"amqps://app:***@rabbit-{n}:5671/braze" for n in range(3))


def _nacked() -> Exception:
    from amqp.exceptions import MessageNacked
    from kombu.exceptions import OperationalError

    error = OperationalError("")
    error.__cause__ = MessageNacked()  # as kombu's _reraise_as_library_errors raises it
    return error


@pytest.mark.parametrize("nacks", [1, 5])
def test_a_post_message_rabbitmq_nacked_is_published_again(monkeypatch, nacks):
    """A quorum queue whose leader died mid-publish nacks the message (seen in
    e2e/test_rabbitmq_cluster.py, where the tick then failed and its batches waited 120 s
    for the sweep): the post message is published again, and once it goes the tick goes on."""
    import tasks.subscriptions as subscriptions

    calls: list[dict] = []

    def publish(**options):
        calls.append(options)
        if len(calls) <= nacks:
            raise _nacked()

    warned: list[str] = []
    monkeypatch.setattr(subscriptions.post_batch, "apply_async", publish)
    monkeypatch.setattr(subscriptions.time, "sleep", lambda _s: None)
    monkeypatch.setattr(
        subscriptions.logger, "warning", lambda text, *args: warned.append(text % args)
    )
    subscriptions._dispatch("default", "live-b1")
    assert len(calls) == nacks + 1
    assert {c["queue"] for c in calls} == {"braze-subs.post.live"}
    assert (
        warned
        == ["the broker refused (nacked) batch live-b1's post message; publishing it again"] * nacks
    )


def test_a_message_nacked_every_time_or_a_lost_connection_still_fails_the_tick(monkeypatch):
    """Past NACKED_PUBLISH_RETRIES, and for any other broker error (kombu has already
    retried and failed over), the error goes up as before: the batch's message is then
    sent again by the sweep."""
    from kombu.exceptions import OperationalError

    import tasks.subscriptions as subscriptions

    calls = 0

    def nacked(**_options):
        nonlocal calls
        calls += 1
        raise _nacked()

    monkeypatch.setattr(subscriptions.time, "sleep", lambda _s: None)
    monkeypatch.setattr(subscriptions.post_batch, "apply_async", nacked)
    with pytest.raises(OperationalError):
        subscriptions._dispatch("default", "b2")
    assert calls == subscriptions.NACKED_PUBLISH_RETRIES + 1

    def lost(**_options):
        nonlocal calls
        calls += 1
        raise OperationalError("connection lost")

    calls = 0
    monkeypatch.setattr(subscriptions.post_batch, "apply_async", lost)
    with pytest.raises(OperationalError, match="connection lost"):
        subscriptions._dispatch("default", "b3")
    assert calls == 1


def test_kombu_checks_a_later_amqps_node_against_the_first_nodes_name():
    """README "A RabbitMQ cluster" (amqps and several host names) rests on this kombu
    behaviour: the TLS options are shared by every node of the failover list, and the
    first connection writes its host name into them, so the next node is verified against
    the first one's name. Pinned here (no broker: the py-amqp connection is replaced); if
    kombu fixes it, this fails and the README's caveat can go."""
    import kombu

    options = broker_options(
        load_settings(broker_url="amqps://u:p@rabbit-a:5671/v;amqps://u:p@rabbit-b:5671/v")
    )
    connection = kombu.Connection(options["broker_url"], ssl=options["broker_use_ssl"])
    seen: list[tuple[str, str]] = []

    class Refused:
        def __init__(self, **params: Any) -> None:
            seen.append((params["host"], params["ssl"]["server_hostname"]))
            raise OSError("no broker in a unit test")

    for _node in range(2):
        transport = connection.transport
        transport.Connection = Refused
        with pytest.raises(OSError):
            transport.establish_connection()
        connection.maybe_switch_next()
    assert seen == [("rabbit-a:5671", "rabbit-a"), ("rabbit-b:5671", "rabbit-a")]
