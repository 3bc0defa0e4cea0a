"""The deployment files agree with each other and with the README."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from config.settings import Settings
from stores.durability import findings

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("worker", "beat", "flower", "metrics")


def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = shlex.split(command)
    return entries


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_procfile_has_the_four_processes():
    assert set(procfile()) == set(PROCESSES)


def test_compose_runs_the_procfile_commands():
    services = compose()["services"]
    for name in PROCESSES:
        assert services[name]["command"] == procfile()[name], name


def test_compose_redis_persists_and_is_health_checked():
    redis = compose()["services"]["redis"]
    flags = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    # The same rules `status` and the worker's start-up check apply to a live server.
    assert findings({name.lstrip("-"): value for name, value in flags.items()}) == []
    assert flags["--appendonly"] == "yes"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert "healthcheck" in redis
    for name in PROCESSES:
        depends = compose()["services"][name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"


def test_flower_is_behind_basic_auth():
    flower = compose()["services"]["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]


def test_the_worker_scales_without_a_fixed_name_or_port():
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_every_variable_is_documented():
    readme = (ROOT / "README.md").read_text()
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    for service in compose()["services"].values():
        used |= set(service.get("environment") or {})
    used |= {name.upper() for name in Settings.model_fields}
    missing = sorted(name for name in used if f"`{name}`" not in readme)
    assert not missing, f"not documented in README.md: {missing}"


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
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    records = [jsonlib.loads(line) for line in lines]
    batches = [r for r in records if "batch" in r]
    assert len(batches) >= 2 and all(r["batch"]["status"] == "delivered" for r in batches)
    text = log.read_text()
    assert SIM_KEY not in text
    assert "jane.doe@example.com" not in text and "14155550123" not in text
