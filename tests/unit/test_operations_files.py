"""The Kubernetes manifests pass the Kubernetes API schemas (kubernetes-validate, strict) and
keep the promises the README makes about them: files only. promtool, kustomize and the
exporter's metrics: tests/integration/test_operations_files.py."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from config.settings import Settings
from tests.k8s_manifests import K8S, manifests, validate

ROOT = Path(__file__).resolve().parents[2]


# --- Kubernetes manifests -------------------------------------------------------------


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
        ("api", "braze-subs-api"),
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


def test_the_configmap_names_no_braze_instance_or_endpoint():
    """Issue 27: a shipped BRAZE_INSTANCE made a forgotten edit look like a refused key;
    compose has no default on purpose, and neither has the ConfigMap."""
    data = manifests()[("ConfigMap", "braze-subs")]["data"]
    assert "BRAZE_INSTANCE" not in data and "BRAZE_REST_ENDPOINT" not in data
    assert "BRAZE_INSTANCE" in (K8S / "config.yaml").read_text()  # where to add it, said


def test_redis_image_is_pinned_as_in_compose():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    default = compose["services"]["redis"]["image"]  # ${REDIS_IMAGE:-redis:X.Y.Z-alpine}
    pinned = default.removeprefix("${REDIS_IMAGE:-").removesuffix("}")
    assert pinned != default and pinned.count(".") == 2, default
    assert container("redis")["image"] == pinned


def test_wheels_are_not_tracked_by_git():
    """deploy/wheels.sh writes the wheelhouse to wheels/ (README: Without a registry)."""
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", "wheels/celery-5.4.0-py3-none-any.whl"],
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 0, "wheels/ is not in .gitignore"


def rotation_row(where: str) -> list[str]:
    """The cells of README's key-rotation table row for `where` (compose, Kubernetes)."""
    readme = (ROOT / "README.md").read_text()
    [row] = [line for line in readme.splitlines() if line.startswith(f"| {where} |")]
    return [cell.strip() for cell in row.strip("|").split(" | ")]


def holds_the_key(container: dict[str, Any]) -> bool:
    named = [item.get("name") for item in container.get("env", [])]
    from_secret = [ref for ref in container.get("envFrom", []) if "secretRef" in ref]
    return "BRAZE_API_KEY" in named or bool(from_secret)


def test_the_rotation_runbook_restarts_every_deployment_holding_the_key():
    """Issue 27: the runbook said "restart the workers" while the exporter held the key
    too. The Kubernetes row names, and its rollout restarts, exactly those Deployments."""
    holding = {
        name
        for (kind, name), doc in manifests().items()
        if kind in ("Deployment", "StatefulSet")
        and any(holds_the_key(c) for c in doc["spec"]["template"]["spec"]["containers"])
    }
    _, named, command = rotation_row("Kubernetes")
    assert set(re.findall(r"`([\w-]+)`", named)) == holding
    restarted = set(re.findall(r"deployment/([\w-]+)", command))
    assert restarted == holding
    assert "secret generic braze-subs" in command and "--from-literal=BRAZE_API_KEY=" in command


def test_the_rotation_runbook_recreates_every_compose_service_holding_the_key():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    holding = {
        name
        for name, service in compose["services"].items()
        if "BRAZE_API_KEY" in (service.get("environment") or {})
    }
    _, named, command = rotation_row("compose")
    assert set(re.findall(r"`(\w+)`", named)) == holding
    # `up -d` recreates every service whose environment changed: no service list that
    # could leave one out.
    assert "docker compose up -d --scale worker=N" in command
