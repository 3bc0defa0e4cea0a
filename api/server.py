"""`braze-subs api`: the HTTP ingest API on uvicorn (the Procfile's `api:` line)."""

from __future__ import annotations

import logging

import uvicorn

from config.settings import Settings
from tasks.logs import configure_logging

logger = logging.getLogger("braze_subs.api")


def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn finishes the requests in progress). Settings
    are checked first: no bearer token stops the process at start, in one line."""
    settings.require_api_tokens()
    configure_logging(settings)
    host = host or settings.api_address
    port = port or settings.port
    logger.info("braze-subs api on http://%s:%d (%d processes)", host, port, settings.api_workers)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=settings.api_workers,
        # Our own access line (api/app.py: no client address, JSON with LOG_FORMAT=json);
        # uvicorn's logging config would replace the process's handlers.
        access_log=False,
        log_config=None,
        server_header=False,
    )
