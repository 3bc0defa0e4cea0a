"""`braze-subs metrics` run as the Procfile runs it, and its exposition parsed as Prometheus
parses it: shared by the tests that scrape the exporter."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from devtools.processes import free_port
from tests.conftest import ROOT, wait_for

# name -> {sorted labels: value}
Scraped = dict[str, dict[tuple[tuple[str, str], ...], float]]


@contextlib.contextmanager
def metrics_exporter(log: Path, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """`braze-subs metrics` on a free loopback port, this process's environment with `env`
    over it, its output in `log`; yields the port's host:port once it serves /metrics, and
    stops it at the end."""
    port = free_port()
    command = [sys.executable, "-m", "worker", "metrics", "--host", "127.0.0.1", "--port"]
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [*command, str(port)],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    target = f"127.0.0.1:{port}"

    def serving() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"http://{target}/metrics", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(serving, timeout=30, what="the exporter to serve /metrics")
        yield target
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def parse_exposition(text: str) -> Scraped:
    """Prometheus's text format, as Prometheus reads it: name -> {labels: value}."""
    parsed: Scraped = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return parsed


def scrape(url: str) -> Scraped:
    """One scrape of `url` (…/metrics), parsed."""
    return parse_exposition(httpx.get(url, timeout=10).text)
