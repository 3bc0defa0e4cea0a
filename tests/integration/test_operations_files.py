"""The operations files agree with the code: alert rules pass `promtool check rules` and
their unit tests, the Grafana dashboard uses only metrics the exporter exports, and the
Kubernetes manifests pass the Kubernetes API schemas (kubernetes-validate, strict) and
keep the promises the README makes about them."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.core import Metric

from admin.exporter import registry_for
from config.settings import Settings
from delivery.services import services
from stores.durability import findings

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "braze-subs.json"
K8S = ROOT / "deploy" / "k8s"
# The Kubernetes version the manifests are checked against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.30"
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
    return names


# --- alert rules ----------------------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool_check():
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


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


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_manifest_passes_the_kubernetes_schema():
    docs = manifests()
    assert {kind for kind, _ in docs} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Service",
        "StatefulSet",
        "Deployment",
    }
    for doc in docs.values():
        validate(doc)


def test_the_schema_check_can_fail():
    worker = copy.deepcopy(manifests()[("Deployment", "braze-subs-worker")])
    worker["spec"]["replica"] = 2  # a typo strict validation rejects
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(worker)


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_build_passes_the_schema():
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(built) if doc]
    assert len(docs) == 10
    for doc in docs:
        assert doc["metadata"].get("namespace", "braze-subs") == "braze-subs"
        validate(doc)


def container(name: str) -> dict[str, Any]:
    docs = manifests()
    kind = "StatefulSet" if name == "redis" else "Deployment"
    (only,) = docs[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return only


def command_of(probe: dict[str, Any]) -> list[str]:
    return probe["exec"]["command"]


def test_worker_and_beat_probe_their_heartbeat_and_readiness():
    for name, role in (("braze-subs-worker", "worker"), ("braze-subs-beat", "beat")):
        spec = container(name)
        live = ["braze-subs", "probe", "live", "--role", role]
        assert command_of(spec["livenessProbe"]) == live
        assert command_of(spec["startupProbe"]) == live
        assert command_of(spec["readinessProbe"]) == ["braze-subs", "probe", "ready"]
        # The heartbeat folder is a writable volume (the root filesystem is read-only).
        mounts = {mount["mountPath"] for mount in spec["volumeMounts"]}
        config = manifests()[("ConfigMap", "braze-subs")]["data"]
        assert config["HEALTH_DIR"] in mounts
        # Failing the probe takes at least the heartbeat's own limit (no false restarts).
        live_probe = spec["livenessProbe"]
        max_age = Settings.model_fields["liveness_max_age_seconds"].default
        assert live_probe["periodSeconds"] * live_probe["failureThreshold"] >= max_age


def test_processes_run_the_procfile_commands():
    procfile = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            procfile[name.strip()] = [Path(word).name for word in shlex.split(command)]
    for process, deployment in (
        ("worker", "braze-subs-worker"),
        ("beat", "braze-subs-beat"),
        ("flower", "braze-subs-flower"),
        ("metrics", "braze-subs-metrics"),
    ):
        assert container(deployment)["command"] == procfile[process], process


def test_exactly_one_beat_and_never_two_during_a_rollout():
    beat = manifests()[("Deployment", "braze-subs-beat")]["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"]["type"] == "Recreate"


def test_worker_grace_outlasts_the_longest_post():
    settings = Settings()
    worker = manifests()[("Deployment", "braze-subs-worker")]["spec"]["template"]["spec"]
    longest_post = settings.token_wait_max_seconds + settings.http_timeout_seconds
    assert worker["terminationGracePeriodSeconds"] >= 2 * longest_post
    assert "limits" in container("braze-subs-worker")["resources"]


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


def test_flower_is_behind_basic_auth_from_the_secret():
    env = {item["name"]: item for item in container("braze-subs-flower")["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "braze-subs"
    service = manifests()[("Service", "braze-subs-flower")]["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"


def test_exporter_serves_the_default_metrics_port_and_shares_the_key():
    spec = container("braze-subs-metrics")
    port = Settings.model_fields["metrics_port"].default
    assert spec["ports"][0]["containerPort"] == port
    config = manifests()[("ConfigMap", "braze-subs")]["data"]
    assert int(config["METRICS_PORT"]) == port
    env = {item["name"]: item for item in spec["env"]}
    worker_env = {item["name"]: item for item in container("braze-subs-worker")["env"]}
    assert env["BRAZE_API_KEY"] == worker_env["BRAZE_API_KEY"]
    assert spec["livenessProbe"]["httpGet"]["path"] == "/metrics"
