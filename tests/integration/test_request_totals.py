"""Requests are counted in Redis by endpoint and HTTP status, fleet-wide, for the exporter:
the reads of opt-out checks and `verify`/`lookup` as well as the posts."""

from __future__ import annotations

import httpx
import pytest

from admin.exporter import read_extras
from delivery.braze_reads import STATUS_PATH, BrazeReadError
from delivery.services import services


def totals() -> dict[tuple[str, str], int]:
    found = services()
    return {(c.endpoint, c.status): c.total for c in read_extras(found.redis, found.keys).requests}


def test_reads_are_counted_by_endpoint_and_status(env, sim):
    reader = services().reader(max_wait_seconds=None)
    reader.statuses("news", "email", ["a@example.com", "b@example.com"])
    reader.statuses("news", "email", ["c@example.com"])
    assert totals() == {(STATUS_PATH, "200"): 2}
    httpx.post(f"{sim.url}/_sim/faults", json={"api_keys": ["other"]}).raise_for_status()
    with pytest.raises(BrazeReadError):
        reader.statuses("news", "email", ["a@example.com"])
    assert totals() == {(STATUS_PATH, "200"): 2, (STATUS_PATH, "401"): 1}
