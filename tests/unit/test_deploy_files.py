"""The deployment files agree with each other and with the README (files only; rendering
the compose file and a JSON-logging worker: tests/e2e/test_deploy.py)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from config.settings import Settings
from stores.durability import findings

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = ("worker", "beat", "flower", "metrics", "api")


def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = shlex.split(command)
    return entries


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_procfile_has_the_five_processes():
    assert set(procfile()) == set(PROCESSES)


def command_of(service: dict) -> list[str]:
    """The command a service runs: Flower's after its shell check of FLOWER_BASIC_AUTH
    (`sh -c CHECK flower COMMAND...`, tests/e2e/test_deploy.py runs it)."""
    command = service["command"]
    if command[:2] == ["sh", "-c"]:
        assert command[3] == "flower" and 'exec "$$@"' in command[2], command
        return command[4:]
    return command


def test_compose_runs_the_procfile_commands():
    services = compose()["services"]
    for name in PROCESSES:
        assert command_of(services[name]) == procfile()[name], name


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


def test_procfile_names_commands_on_path_not_a_virtualenv():
    for name, command in procfile().items():
        assert command[0] in ("celery", "braze-subs"), name
        assert not any(".venv" in word or "/" in word for word in command), name


def test_compose_redis_has_a_memory_cap_and_a_pinned_image():
    redis = compose()["services"]["redis"]
    flags = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    # Without maxmemory, noeviction never refuses a write: the OOM killer comes first.
    assert re.fullmatch(r"\$\{REDIS_MAXMEMORY:-\d+[kmg]b\}", flags["--maxmemory"])
    assert re.fullmatch(r"\$\{REDIS_IMAGE:-redis:\d+\.\d+\.\d+[-\w]*\}", redis["image"])


def test_the_image_is_pinned_non_root_and_health_checked():
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base.group(1))
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*probe\W+live\W+--role\W+worker", dockerfile, re.M)


def test_the_image_copies_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top = {name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]}
    copied = set(re.findall(r"^COPY (\w+) /tmp/build/\1$", dockerfile, re.M))
    assert copied == top


def test_every_long_running_service_has_a_health_check():
    """The image's HEALTHCHECK probes a worker; every other service brings its own, but a
    one-shot (`restart: "no"`, the cluster profile's `redis-cluster-create`)."""
    services = compose()["services"]
    one_shot = {name for name, service in services.items() if service.get("restart") == "no"}
    assert one_shot == {"redis-cluster-create"}
    for name, service in services.items():
        if name != "worker" and name not in one_shot:
            assert "healthcheck" in service, name


def test_compose_cluster_nodes_persist_and_differ_only_by_name():
    """The `cluster` profile's six nodes keep every change as `redis` does, each announcing
    its own service name and keeping its data (and nodes.conf) on a volume of its own."""
    services = compose()["services"]
    nodes = {name: service for name, service in services.items() if name.startswith("redis-node-")}
    assert sorted(nodes) == [f"redis-node-{n}" for n in range(1, 7)]
    redis = services["redis"]["command"]
    redis_flags = dict(zip(redis[1::2], redis[2::2], strict=True))
    for name, node in nodes.items():
        assert node["profiles"] == ["cluster"] and "healthcheck" in node, name
        assert node["image"] == services["redis"]["image"], name
        flags = dict(zip(node["command"][1::2], node["command"][2::2], strict=True))
        assert findings({flag.lstrip("-"): value for flag, value in flags.items()}) == []
        assert {flag: value for flag, value in flags.items() if flag in redis_flags} == redis_flags
        assert flags["--cluster-announce-hostname"] == name
        assert node["volumes"] == [f"{name}-data:/data"]
    assert set(services["rabbitmq"]["profiles"]) == {"rabbitmq", "cluster"}


def test_published_ports_are_loopback_by_default():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            default = re.fullmatch(r"\$\{[A-Z_]+_PUBLISH:-(127\.0\.0\.1:\d+)\}:\d+", port)
            assert default, f"{name}: {port}"


def test_worker_grace_outlasts_the_longest_post():
    worker = compose()["services"]["worker"]
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    settings = Settings()
    longest_post = settings.token_wait_max_seconds + settings.http_timeout_seconds
    assert grace and int(grace.group(1)) >= 2 * longest_post


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


def test_no_readme_link_leaves_the_repository():
    """Issue 27: README linked ../shared/braze-api/SPEC.md, outside the repository. Every
    link resolves to a file of the repository (or a section of README), and no path in
    backticks points outside it."""
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if target.startswith("#"):
            continue
        assert "://" not in target, f"README links outside the repository: {target}"
        path = (ROOT / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), target
    assert re.findall(r"`\.\./[^`]*`", readme) == []
