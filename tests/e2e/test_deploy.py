"""The deployment files agree with each other and with the README."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.settings import INSTANCES, Settings, SettingsError, cluster_seeds, load_settings
from tests.cli_runs import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("worker", "beat", "flower", "metrics")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def podman_stand_in(tmp_path: Path) -> Path:
    """A `podman` that answers its version, records every call and does nothing else: what
    podman-compose would run, where podman is not installed."""
    podman = tmp_path / "podman"
    calls = tmp_path / "podman-calls"
    podman.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        "case \"$1\" in version|--version) echo 'podman version 4.3.1';; esac\n"
    )
    podman.chmod(0o755)
    return podman


def podman_compose(
    tmp_path: Path, environment: dict[str, str], *args: str
) -> subprocess.CompletedProcess:
    """`podman-compose -f docker-compose.yml ARGS` with `environment` as the shell's (no
    BRAZE_* or FLOWER_* of this process's own) and the stand-in podman."""
    tool = Path(sys.executable).parent / "podman-compose"
    if not tool.exists():
        pytest.skip("podman-compose is not installed (the dev extra brings it)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "FLOWER_"))}
    return subprocess.run(
        [str(tool), "--podman-path", str(podman_stand_in(tmp_path)),
         "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**clean, **environment},
    )  # fmt: skip


def rendered(tmp_path: Path, environment: dict[str, str]) -> dict:
    """docker-compose.yml as podman-compose reads it (its own interpolation of ${...}) with
    `environment` as the shell's. `config` never calls the engine except for its version,
    which a stand-in answers, so this runs where podman is not installed."""
    done = podman_compose(
        tmp_path, {"FLOWER_BASIC_AUTH": "admin:secret", **environment}, "--profile", "local",
        "config",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def settings_of(service: dict) -> Settings:
    env = {k.lower(): v for k, v in service["environment"].items() if k != "FLOWER_BASIC_AUTH"}
    return load_settings(**env)


def test_braze_instance_as_the_readme_suggests(tmp_path):
    config = rendered(tmp_path, {"BRAZE_API_KEY": "k-123", "BRAZE_INSTANCE": "US-03"})
    for name in PROCESSES:
        settings = settings_of(config["services"][name])
        assert settings.rest_endpoint == INSTANCES["US-03"], name
    settings_of(config["services"]["worker"]).require_braze()


def test_production_services_never_default_to_the_simulator(tmp_path):
    config = rendered(tmp_path, {})
    for name in PROCESSES:
        environment = config["services"][name]["environment"]
        assert not environment.get("BRAZE_API_KEY") and not environment.get("BRAZE_REST_ENDPOINT")
    # A worker without them stops at start, naming the variable.
    with pytest.raises(SettingsError, match="BRAZE_API_KEY"):
        settings_of(config["services"]["worker"]).require_braze()


def test_a_one_off_import_needs_no_flower_setting(tmp_path):
    """Issue 27: `podman-compose run ... braze-subs import` failed with a traceback when
    FLOWER_BASIC_AUTH was not set again; a one-off command needs only what it uses."""
    done = podman_compose(
        tmp_path, {"BRAZE_INSTANCE": "US-03"},
        "run", "--rm", "--no-deps", "-T", "worker", "braze-subs", "import", "/imports/c.jsonl",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    [run] = [
        call for call in (tmp_path / "podman-calls").read_text().splitlines()
        if call.startswith("run ")
    ]  # fmt: skip
    assert run.endswith("braze-subs:latest braze-subs import /imports/c.jsonl"), run
    assert "FLOWER" not in run


def test_flower_without_basic_auth_stops_in_one_line(tmp_path):
    """Flower itself, not compose's interpolation, refuses to start unauthenticated: its
    command as compose renders it, run by a real shell (a stand-in `celery` on PATH)."""
    command = rendered(tmp_path, {})["services"]["flower"]["command"]
    celery = tmp_path / "bin" / "celery"
    celery.parent.mkdir()
    celery.write_text('#!/bin/sh\necho "celery $*"\n')
    celery.chmod(0o755)
    path = f"{celery.parent}:{os.environ['PATH']}"
    without = subprocess.run(
        command, env={"PATH": path}, capture_output=True, text=True, timeout=30
    )
    assert_one_line_error(without, "FLOWER_BASIC_AUTH", "user:password")
    assert without.stdout == ""  # Flower never started
    with_auth = subprocess.run(
        command, env={"PATH": path, "FLOWER_BASIC_AUTH": "admin:secret"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert with_auth.returncode == 0, with_auth.stderr
    assert with_auth.stdout.split() == command[4:]  # the Procfile's command, run as given


def test_json_logs_hold_no_key_and_no_identifiers(env, sim, processes, tmp_path):
    """A worker with LOG_FORMAT=json: every line is JSON; no key, no email, no phone."""
    import json as jsonlib

    from tasks.producer import enqueue_changes
    from tests.conftest import SIM_KEY, wait_for

    worker = processes.worker("json", extra_env={"LOG_FORMAT": "json"})
    processes.beat()
    enqueue_changes(
        [
            {
                "subscription_group_id": "news",
                "subscription_state": "subscribed",
                "email": "jane.doe@example.com",
            },
            {
                "subscription_group_id": "sms",
                "subscription_state": "subscribed",
                "phone": "+14155550123",
            },
        ]
    )
    log = Path(worker.log_path)
    wait_for(lambda: log.read_text().count("status=delivered") >= 2, timeout=30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    not_json = []
    for line in lines:
        try:
            jsonlib.loads(line)
        except ValueError:
            not_json.append(line[:200])
    assert not not_json, f"{len(not_json)} line(s) are not JSON, first: {not_json[:3]}"
    records = [jsonlib.loads(line) for line in lines]
    batches = [r for r in records if "batch" in r]
    assert len(batches) >= 2 and all(r["batch"]["status"] == "delivered" for r in batches)
    text = log.read_text()
    assert SIM_KEY not in text
    assert "jane.doe@example.com" not in text and "14155550123" not in text


def test_the_rabbitmq_profile_gives_every_process_the_broker(tmp_path):
    """Issue 24: `--profile rabbitmq` with BROKER_URL and RABBITMQ_PASSWORD as the compose
    file's header says: every Celery process takes its broker from BROKER_URL (the state
    stays on REDIS_URL), RabbitMQ keeps its data on a volume; without the profile the
    broker is REDIS_URL's Redis, as before."""
    url = "amqp://braze-subs:pw-123@rabbitmq:5672/"
    done = podman_compose(
        tmp_path,
        {"FLOWER_BASIC_AUTH": "admin:secret", "BROKER_URL": url, "RABBITMQ_PASSWORD": "pw-123"},
        "--profile", "rabbitmq", "config",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    for name in PROCESSES:
        settings = settings_of(config["services"][name])
        assert settings.broker == url and settings.redis_url == "redis://redis:6379/0", name
    rabbitmq = config["services"]["rabbitmq"]
    assert rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"] == "pw-123"
    assert any(volume.endswith(":/var/lib/rabbitmq") for volume in rabbitmq["volumes"])
    plain = rendered(tmp_path, {})
    assert "rabbitmq" not in plain["services"]
    assert settings_of(plain["services"]["worker"]).broker == "redis://redis:6379/0"


def test_rabbitmq_without_a_password_stops_in_one_line(tmp_path):
    """The profile's RabbitMQ never starts with an empty password: its command as compose
    renders it, run by a real shell (a stand-in `docker-entrypoint.sh` on PATH)."""
    done = podman_compose(
        tmp_path, {"FLOWER_BASIC_AUTH": "admin:secret"}, "--profile", "rabbitmq", "config"
    )
    assert done.returncode == 0, done.stderr
    command = yaml.safe_load(done.stdout)["services"]["rabbitmq"]["command"]
    entrypoint = tmp_path / "bin" / "docker-entrypoint.sh"
    entrypoint.parent.mkdir()
    entrypoint.write_text('#!/bin/sh\necho "started $*"\n')
    entrypoint.chmod(0o755)
    path = f"{entrypoint.parent}:{os.environ['PATH']}"
    without = subprocess.run(command, env={"PATH": path}, capture_output=True, text=True)
    assert_one_line_error(without, "RABBITMQ_PASSWORD", "BROKER_URL")
    assert without.stdout == ""
    with_password = subprocess.run(
        command, env={"PATH": path, "RABBITMQ_DEFAULT_PASS": "pw"}, capture_output=True, text=True
    )
    assert with_password.stdout.strip() == "started rabbitmq-server", with_password.stderr


CLUSTER_URL = "redis+cluster://redis-node-1:6379,redis-node-2:6379,redis-node-3:6379"
NODES = [f"redis-node-{n}" for n in range(1, 7)]


def cluster_profile(tmp_path: Path) -> dict:
    """docker-compose.yml rendered with `--profile cluster` and the variables its header
    exports."""
    done = podman_compose(
        tmp_path,
        {
            "FLOWER_BASIC_AUTH": "admin:secret",
            "RABBITMQ_PASSWORD": "pw-123",
            "BROKER_URL": "amqp://braze-subs:pw-123@rabbitmq:5672/",
            "REDIS_URL": CLUSTER_URL,
        },
        "--profile", "cluster", "config",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_the_cluster_profile_puts_the_state_on_six_nodes_and_the_broker_on_rabbitmq(tmp_path):
    """Issue 24: `--profile cluster` with the variables the compose file's header exports:
    every process (the API and the exporter too: a redis+cluster:// REDIS_URL requires
    BROKER_URL of each) loads its settings with the state on the cluster's seeds and the
    broker on RabbitMQ; six nodes, each cluster-enabled, announcing its service name, on
    a volume of its own; the one-shot creation waits for all six; the seeds in the header's
    REDIS_URL are nodes of the profile. Without the profile none of it runs."""
    config = cluster_profile(tmp_path)
    services = config["services"]
    for name in (*PROCESSES, "api"):
        settings = settings_of(services[name])
        assert settings.is_cluster and settings.redis_url == CLUSTER_URL, name
        assert settings.broker == "amqp://braze-subs:pw-123@rabbitmq:5672/", name
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"] == "pw-123"
    volumes = set()
    for name in NODES:
        node = services[name]
        flags = dict(zip(node["command"][1::2], node["command"][2::2], strict=True))
        assert flags["--cluster-enabled"] == "yes", name
        assert flags["--cluster-announce-hostname"] == name, name
        assert flags["--cluster-preferred-endpoint-type"] == "hostname", name
        assert flags["--cluster-config-file"].startswith(flags["--dir"] + "/"), name
        (volume,) = node["volumes"]
        assert volume.endswith(":" + flags["--dir"]), name
        volumes.add(volume.split(":")[0])
    assert len(volumes) == len(NODES)
    create = services["redis-cluster-create"]
    assert {name: dep["condition"] for name, dep in create["depends_on"].items()} == {
        name: "service_healthy" for name in NODES
    }
    assert create["environment"]["REDIS_CLUSTER_NODES"].split() == [f"{n}:6379" for n in NODES]
    seeds, _, _ = cluster_seeds(CLUSTER_URL)
    assert {host for host, _ in seeds} <= set(NODES)
    plain = rendered(tmp_path, {})
    assert (
        not set(NODES) & set(plain["services"]) and "redis-cluster-create" not in plain["services"]
    )


def test_the_cluster_create_service_joins_six_nodes_once(tmp_path):
    """The profile's `redis-cluster-create` command as compose renders it, run by a real
    shell against six fresh `redis-server --cluster-enabled yes` (127.0.0.1 and free ports
    in place of the service names): 3 masters with a replica each, every slot served; run
    again (every later `up`), it exits 0 and leaves the cluster as it was."""
    from devtools.redis_cluster import RedisCluster, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    create = cluster_profile(tmp_path)["services"]["redis-cluster-create"]
    cluster = RedisCluster(tmp_path / "nodes").start(create=False)
    try:
        environment = {
            "PATH": os.environ["PATH"],
            "REDIS_CLUSTER_NODES": " ".join(f"127.0.0.1:{port}" for port in cluster.ports),
        }
        first = subprocess.run(
            create["command"], env=environment, capture_output=True, text=True, timeout=120
        )
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr
        cluster.wait_healthy()
        shards = cluster.shards()
        assert len(shards) == 3 and all(len(replicas) == 1 for replicas in shards.values())
        nodes = cluster.node(cluster.ports[0]).execute_command("CLUSTER NODES")
        again = subprocess.run(
            create["command"], env=environment, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert "nothing to do" in again.stdout
        assert cluster.shards() == shards
        after = cluster.node(cluster.ports[0]).execute_command("CLUSTER NODES")
        assert {row["node_id"] for row in after.values()} == {
            row["node_id"] for row in nodes.values()
        }
    finally:
        cluster.stop()
