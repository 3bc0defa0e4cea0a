"""The Kubernetes manifests in deploy/k8s, read and checked against the Kubernetes API
schemas: shared by tests/unit and tests/integration test_operations_files.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
# The Kubernetes version the manifests are checked against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.30"


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every document of the manifests (the kustomization aside), by (kind, name)."""
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
