"""REDIS_URL=redis+cluster:// (issue 24, state on a Redis Cluster): the setting's checks
and the client it makes. Pure: no node is contacted (tests/integration/test_redis_cluster.py
and tests/e2e/test_redis_cluster.py run on a real cluster)."""

from __future__ import annotations

import pytest

from config.settings import SettingsError, cluster_seeds, load_settings

SECRET = "s3cret-pw"
BROKER = "redis://broker:6379/0"


def test_seed_nodes_user_and_password_are_read_off_the_url():
    seeds, user, password = cluster_seeds(f"redis+cluster://app:{SECRET}@n1:7000,n2:7001,n3")
    assert seeds == [("n1", 7000), ("n2", 7001), ("n3", 6379)]
    assert (user, password) == ("app", SECRET)
    assert cluster_seeds("redis+cluster://n1:7000/0") == ([("n1", 7000)], None, None)


def test_a_cluster_url_with_a_broker_is_accepted():
    settings = load_settings(redis_url="redis+cluster://n1:7000,n2:7000", broker_url=BROKER)
    assert settings.is_cluster and settings.broker == BROKER
    assert not load_settings(redis_url="redis://r:6379/0").is_cluster


def test_a_cluster_needs_a_broker_of_its_own():
    """Celery's Redis transport does not speak the cluster protocol."""
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url=f"redis+cluster://:{SECRET}@n1:7000")
    message = str(caught.value)
    assert message.startswith("BROKER_URL: required with a redis+cluster:// REDIS_URL")
    assert SECRET not in message and "\n" not in message


@pytest.mark.parametrize(
    ("redis_url", "broker_url", "says"),
    [
        (f"redis+cluster://:{SECRET}@n1:70x0", BROKER, "REDIS_URL: a seed node's port is not"),
        (f"redis+cluster://:{SECRET}@n1:7000,,n2:7000", BROKER, "REDIS_URL: redis+cluster:// "),
        (f"redis+cluster://:{SECRET}@n1:7000/3", BROKER, "REDIS_URL: a Redis Cluster has only"),
        (
            f"rediss+cluster://:{SECRET}@n1:7000?ssl_cert_reqs=none",
            BROKER,
            "REDIS_URL: ssl_cert_reqs must stay 'required'",
        ),
        (
            "redis://state:6379/0",
            f"redis+cluster://:{SECRET}@n1:7000",
            "BROKER_URL: Celery's broker cannot be a Redis Cluster",
        ),
    ],
)
def test_a_malformed_cluster_url_is_one_line_without_its_password(redis_url, broker_url, says):
    with pytest.raises(SettingsError) as caught:
        load_settings(redis_url=redis_url, broker_url=broker_url)
    message = str(caught.value)
    assert message.startswith(says), message
    assert SECRET not in message and "\n" not in message


def test_rediss_cluster_verifies_every_node_like_rediss(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    settings = load_settings(
        redis_url="rediss+cluster://n1:7000", broker_url=BROKER, redis_ca_file=str(ca)
    )
    verify = {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": str(ca)}
    assert settings.redis_tls() == verify
