"""Braze's side of things, set and read through the simulator's control API (`/_sim/...`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx


@contextmanager
def control_client(url: str, key: str) -> Iterator[httpx.Client]:
    """A client of the simulator at `url` sending `key`, the simulator reset before and after."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
        assert http.post("/_sim/reset").status_code == 200
        yield http
        http.post("/_sim/reset")


def set_in_braze(url: str, group: str, state: str, values: list[str], kind: str = "email") -> None:
    """What a footer link or a STOP reply does: Braze changes, braze-subs is not told."""
    body = {"group": group, "kind": kind, "values": values, "state": state}
    httpx.post(f"{url}/_sim/set_state", json=body).raise_for_status()


def braze_states(url: str, group: str) -> dict[str, str]:
    """The state Braze holds for each identifier value in `group`."""
    data = httpx.get(f"{url}/_sim/state", params={"log": "0"}).json()
    return {s["value"]: s["state"] for s in data["subscriptions"] if s["group"] == group}
