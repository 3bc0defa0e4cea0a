"""The deployment files agree with each other and with the README."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.settings import INSTANCES, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("worker", "beat", "flower", "metrics")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def rendered(tmp_path: Path, environment: dict[str, str]) -> dict:
    """docker-compose.yml as podman-compose reads it (its own interpolation of ${...}) with
    `environment` as the shell's. `config` never calls the engine except for its version,
    which a stand-in answers, so this runs where podman is not installed."""
    podman = tmp_path / "podman"
    podman.write_text("#!/bin/sh\necho 'podman version 4.3.1'\n")
    podman.chmod(0o755)
    tool = Path(sys.executable).parent / "podman-compose"
    if not tool.exists():
        pytest.skip("podman-compose is not installed (the dev extra brings it)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "FLOWER_"))}
    done = subprocess.run(
        [str(tool), "--podman-path", str(podman), "-f", str(ROOT / "docker-compose.yml"),
         "--profile", "local", "config"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**clean, "FLOWER_BASIC_AUTH": "admin:secret", **environment},
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
