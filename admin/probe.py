"""`braze-subs probe live --role worker|beat` and `braze-subs probe ready`: exec probes.

Kubernetes runs an exec probe every few seconds in every pod, so this path imports only
the settings, the heartbeat check and (for readiness) redis-py: ~0.25 s of CPU instead of
the full CLI's ~1 s. `admin/launcher.py` routes `braze-subs probe ...` here before the
full CLI is imported. Exit 0: healthy; 1: not (one line on stderr); 2: bad usage or
invalid settings (also "not ready").
"""

from __future__ import annotations

import argparse
import sys

from config.settings import SettingsError, get_settings
from core.redaction import redact_url
from tasks.health import ROLES, check_live, heartbeat_path

EXIT_OK = 0
EXIT_PROBE_FAILED = 1
EXIT_USAGE = 2


def live(role: str) -> tuple[int, str]:
    settings = get_settings()
    verdict = check_live(
        heartbeat_path(settings.health_dir, role), settings.liveness_max_age_seconds
    )
    if verdict.ok:
        return EXIT_OK, f"{role} {verdict.message}"
    return EXIT_PROBE_FAILED, f"{role} not live: {verdict.message}"


def ready(timeout: float) -> tuple[int, str]:
    from redis.exceptions import RedisError

    from stores.connection import redis_client

    settings = get_settings()
    client = redis_client(settings, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except RedisError as exc:
        url = redact_url(settings.redis_url)
        return EXIT_PROBE_FAILED, f"not ready: cannot reach Redis at {url}: {exc}"
    finally:
        client.close()
    return EXIT_OK, "ready"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="braze-subs probe", description="Health probes: exit 0 healthy, 1 not."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    live_parser = commands.add_parser("live", help="the ROLE process here beats its heartbeat")
    live_parser.add_argument("--role", required=True, choices=ROLES)
    ready_parser = commands.add_parser("ready", help="the settings are valid and Redis answers")
    ready_parser.add_argument("--timeout", type=float, default=2.0, help="seconds for Redis")
    args = parser.parse_args(argv)
    try:
        code, message = live(args.role) if args.command == "live" else ready(args.timeout)
    except SettingsError as exc:
        code, message = EXIT_USAGE, f"not ready: {exc}"
    print(
        message if code == EXIT_OK else f"braze-subs: {message}",
        file=sys.stdout if code == EXIT_OK else sys.stderr,
    )
    return code
