"""A real `braze-subs api` process for tests (`python -m worker api`, JSON access lines into
a file), and a client that posts to it the way a producer in another language would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from devtools.processes import free_port
from tests.conftest import BASE_ENV, ROOT, wait_for

TOKEN = "tok-0123456789abcdef"
ROTATED = "tok-fedcba9876543210"
IN_FILE = "tok-from-the-file-0001"


class Api:
    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def post(self, body: object, token: str | None = TOKEN, **kwargs: object) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        headers.update(kwargs.pop("headers", {}))  # type: ignore[arg-type]
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.url}/v1/changes", content=content, headers=headers, timeout=30)


@contextmanager
def running_api(redis_url: str, tmp_path: Path, **extra: str) -> Iterator[Api]:
    tokens_file = tmp_path / "api-tokens"
    tokens_file.write_text(f"# rotated in on Monday\n{IN_FILE}\n")
    port = free_port()
    log = tmp_path / f"api-{port}.log"
    environ = {
        **os.environ,
        **BASE_ENV,
        "REDIS_URL": redis_url,
        "PORT": str(port),
        "API_ADDRESS": "127.0.0.1",
        "API_TOKENS": f"{TOKEN}, {ROTATED}",
        "API_TOKENS_FILE": str(tokens_file),
        "LOG_FORMAT": "json",
        **extra,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "api"], cwd=ROOT, env=environ, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"

    def listening() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(listening, timeout=60, what="the API to listen")
        yield Api(url, log)
    finally:
        process.terminate()
        process.wait(timeout=30)
