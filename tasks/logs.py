"""Logging for every braze-subs process: text for people, JSON (LOG_FORMAT=json) for shippers."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from config.settings import Settings

LOGGER_NAME = "braze_subs"


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def use_json_for_celery(logger: logging.Logger, **_: object) -> None:
    """Celery's `after_setup_logger` hook: its own lines in JSON too."""
    for handler in logger.handlers:
        handler.setFormatter(json_formatter())


def configure_logging(settings: Settings) -> None:
    """Give our `braze_subs.*` loggers one handler on stderr, in the configured format."""
    logger = logging.getLogger(LOGGER_NAME)
    if any(getattr(handler, "_braze_subs", False) for handler in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._braze_subs = True  # type: ignore[attr-defined]
    if settings.log_format == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(settings.log_level)
    logger.propagate = False
    if settings.log_format == "json":
        # Python warnings (Celery's SecurityWarning among them) are written before Celery
        # sets up its logging, as plain text: route them through a JSON handler too.
        logging.captureWarnings(True)
        warnings_logger = logging.getLogger("py.warnings")
        warnings_logger.addHandler(handler)
        warnings_logger.propagate = False


def quiet_banner_for_json(instance: object, **_: object) -> None:
    """Celery's `celeryd_init` hook under LOG_FORMAT=json: no plain-text startup banner (its
    facts are in the JSON lines), so every line a worker writes is JSON."""
    instance.quiet = True  # type: ignore[attr-defined]
