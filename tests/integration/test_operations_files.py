"""The operations files agree with the code: alert rules pass `promtool check rules` and
their unit tests, the Grafana dashboard uses only metrics the exporter exports, and the
Kubernetes manifests pass the Kubernetes API schemas (kubernetes-validate, strict) and
keep the promises the README makes about them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.core import Metric

from admin.exporter import registry_for
from delivery.services import services
from stores.durability import findings
from tests.k8s_manifests import K8S, manifests, validate

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "braze-subs.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (./dev install installs prometheus)"
)


def exported_names(env: dict[str, str]) -> set[str]:
    """Every sample name the exporter exports, read from a real Redis."""
    found = services()
    names = set()
    family: Metric
    for family in registry_for(found.redis, found.keys, found.limiter).collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        if family.type == "histogram":  # queried by its series: _bucket, _sum, _count
            names |= {sample.name for sample in family.samples}
    return names


# --- alert rules ----------------------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool_check():
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 12 rules found" in result.stdout


@needs_promtool
def test_alert_rules_fire_as_their_unit_tests_say():
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts.test.yml"],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_catches_a_broken_rule(tmp_path):
    broken = yaml.safe_load(RULES.read_text())
    broken["groups"][0]["rules"][0]["expr"] = "rate(braze_subs_buffer_due[5m]"
    path = tmp_path / "alerts.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True)
    assert result.returncode != 0


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bbraze_subs_[a-z0-9_]+", expr))


def test_alert_rules_use_exported_metrics_and_name_a_runbook_entry(env):
    exported = exported_names(env)
    readme = (ROOT / "README.md").read_text()
    for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]:
        assert _metric_names(rule["expr"]) <= exported, rule["alert"]
        # "README.md, Runbook: <entry>" or "README.md, <section>"
        entry = rule["annotations"]["runbook"].split(", ", 1)[1].removeprefix("Runbook: ")
        assert entry in readme, (rule["alert"], entry)
        assert rule["labels"]["severity"] in ("warning", "critical")
    assert "deploy/prometheus/alerts.yml" in readme


# --- dashboard ------------------------------------------------------------------------


def test_dashboard_parses_and_uses_only_exported_metrics(env):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 10
    used = set().union(*(_metric_names(expr) for expr in exprs))
    exported = exported_names(env)
    assert used <= exported, used - exported
    # The figures an on-call engineer pages on are all on it.
    assert {
        "braze_subs_buffer_due",
        "braze_subs_buffer_oldest_due_age_seconds",
        "braze_subs_dead_letter_entries",
        "braze_subs_credentials_circuit_open",
        "braze_subs_braze_throttled_total",
        "braze_subs_braze_requests_total",
        "braze_subs_budget_tokens",
    } <= used
    assert "deploy/grafana/braze-subs.json" in (ROOT / "README.md").read_text()


def test_exported_names_follow_prometheus_conventions(env):
    for name in exported_names(env):
        assert re.fullmatch(r"braze_subs_[a-z0-9_]+", name), name
        assert not name.endswith("_ms"), name


# --- Kubernetes manifests -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_build_passes_the_schema():
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(built) if doc]
    assert len(docs) == 12  # the api Deployment and Service among them
    for doc in docs:
        assert doc["metadata"].get("namespace", "braze-subs") == "braze-subs"
        validate(doc)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_rabbitmq_overlay_gives_the_celery_processes_the_broker():
    """Issue 24: deploy/k8s-rabbitmq builds on the base, passes the schema, adds a RabbitMQ
    StatefulSet on a volume, and BROKER_URL from the Secret braze-subs-broker to the
    worker, beat and Flower, each keeping its own variables."""
    overlay = K8S.parent / "k8s-rabbitmq"
    built = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built) if d}
    for doc in docs.values():
        assert doc["metadata"].get("namespace", "braze-subs") == "braze-subs"
        validate(doc)
    base = manifests()
    for name in ("braze-subs-worker", "braze-subs-beat", "braze-subs-flower"):
        (only,) = docs[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item for item in only.get("env", [])}
        assert env["BROKER_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "braze-subs-broker",
            "key": "BROKER_URL",
        }, name
        (before,) = base[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        assert {item["name"] for item in before.get("env", [])} <= set(env), name
    for name in ("braze-subs-metrics", "braze-subs-api"):
        (only,) = docs[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        assert "BROKER_URL" not in {item["name"] for item in only.get("env", [])}
    rabbitmq = docs[("StatefulSet", "rabbitmq")]["spec"]
    (node,) = rabbitmq["template"]["spec"]["containers"]
    mount = node["volumeMounts"][0]
    assert mount["mountPath"] == "/var/lib/rabbitmq"
    assert rabbitmq["volumeClaimTemplates"][0]["metadata"]["name"] == mount["name"]
    assert ("Service", "rabbitmq") in docs


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_cluster_overlay_puts_the_state_on_a_redis_cluster_and_the_broker_on_rabbitmq():
    """Issue 24: deploy/k8s-cluster builds on k8s-rabbitmq and passes the schema; the base's
    single Redis is gone; six cluster nodes behind a headless Service, each persisted,
    announcing its own name under it; a Job joining them with --cluster-replicas 1 by the
    compose profile's own script; REDIS_URL names nodes of the StatefulSet as seeds; every
    Deployment (the exporter and the API too) gets BROKER_URL from the broker's Secret, and
    loads its settings with the amqp:// URL the kustomization says to put there."""
    from config.settings import cluster_seeds, load_settings

    overlay = K8S.parent / "k8s-cluster"
    built = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built) if d}
    for doc in docs.values():
        assert doc["metadata"].get("namespace", "braze-subs") == "braze-subs"
        validate(doc)
    assert ("StatefulSet", "redis") not in docs and ("Service", "redis") not in docs
    assert ("StatefulSet", "rabbitmq") in docs and ("Service", "rabbitmq") in docs

    nodes = docs[("StatefulSet", "redis-cluster")]["spec"]
    service = docs[("Service", "redis-cluster")]["spec"]
    assert service["clusterIP"] == "None" and nodes["serviceName"] == "redis-cluster"
    labels = nodes["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert nodes["replicas"] == 6
    (node,) = nodes["template"]["spec"]["containers"]
    flags = dict(zip(node["args"][0::2], node["args"][1::2], strict=True))
    assert findings({name.lstrip("-"): value for name, value in flags.items()}) == []
    assert flags["--cluster-enabled"] == "yes"
    assert flags["--cluster-preferred-endpoint-type"] == "hostname"
    assert flags["--cluster-announce-hostname"] == "$(POD_NAME).redis-cluster"
    env = {item["name"]: item for item in node["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    mount = node["volumeMounts"][0]
    assert mount["mountPath"] == flags["--dir"] and flags["--cluster-config-file"].startswith(
        flags["--dir"] + "/"
    )
    assert nodes["volumeClaimTemplates"][0]["metadata"]["name"] == mount["name"]
    ports = {port["name"]: port["containerPort"] for port in node["ports"]}
    names = [f"redis-cluster-{i}.redis-cluster" for i in range(nodes["replicas"])]

    (create,) = docs[("Job", "redis-cluster-create")]["spec"]["template"]["spec"]["containers"]
    members = {item["name"]: item["value"] for item in create["env"]}["REDIS_CLUSTER_NODES"]
    assert members.split() == [f"{name}:{ports['redis']}" for name in names]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    script = compose["services"]["redis-cluster-create"]["command"][2].replace("$$", "$")
    assert create["command"] == ["sh", "-c", script]
    assert "--cluster-replicas 1 --cluster-yes" in script

    config = docs[("ConfigMap", "braze-subs")]["data"]
    seeds, _, _ = cluster_seeds(config["REDIS_URL"])
    assert seeds and all(host in names and port == ports["redis"] for host, port in seeds)
    kustomization = (overlay / "kustomization.yaml").read_text()
    broker = "amqp://braze-subs:pw-123@rabbitmq:5672/"
    assert "BROKER_URL=amqp://braze-subs:$PW@rabbitmq:5672/" in kustomization
    deployments = [name for kind, name in docs if kind == "Deployment"]
    assert len(deployments) == 5
    for name in deployments:
        (only,) = docs[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item for item in only.get("env", [])}
        assert env["BROKER_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "braze-subs-broker",
            "key": "BROKER_URL",
        }, name
        plain = {key: item["value"] for key, item in env.items() if "value" in item}
        values = {**config, **plain, "BROKER_URL": broker}
        settings = load_settings(**{key.lower(): value for key, value in values.items()})
        assert settings.is_cluster and settings.broker == broker, name


def container(name: str) -> dict[str, Any]:
    docs = manifests()
    kind = "StatefulSet" if name == "redis" else "Deployment"
    (only,) = docs[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return only


def test_redis_persists_and_never_evicts():
    statefulset = manifests()[("StatefulSet", "redis")]["spec"]
    args = container("redis")["args"]
    flags = dict(zip(args[0::2], args[1::2], strict=True))
    assert findings({name.lstrip("-"): value for name, value in flags.items()}) == []
    assert flags["--appendonly"] == "yes"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert flags["--maxmemory"]  # bounded below the container's memory limit
    claim = statefulset["volumeClaimTemplates"][0]
    mount = container("redis")["volumeMounts"][0]
    assert mount["name"] == claim["metadata"]["name"]
    assert mount["mountPath"] == flags["--dir"]
