"""Braze's side of things, set and read through the simulator's control API (`/_sim/...`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


def _url(sim: Any) -> str:
    """A simulator fixture or its base URL."""
    return sim if isinstance(sim, str) else sim.url


def faults(sim: Any, **switches: Any) -> None:
    """Switch the simulator's faults (outage, error_rate, latency, hold, api_keys, ...)."""
    httpx.post(f"{_url(sim)}/_sim/faults", json=switches, timeout=10).raise_for_status()


def sim_stats(sim: Any, *, log: bool = False) -> dict[str, Any]:
    """The simulator's counters; `log`: with every request it received (`requests`)."""
    params = {} if log else {"log": "0"}
    return httpx.get(f"{_url(sim)}/_sim/stats", params=params, timeout=30).json()


def sim_subscriptions(sim: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    """What Braze holds: (group, kind, value) -> the subscription's record."""
    data = httpx.get(f"{_url(sim)}/_sim/state", params={"log": "0"}, timeout=30).json()
    return {(s["group"], s["kind"], s["value"]): s for s in data["subscriptions"]}


def sim_states(sim: Any) -> dict[tuple[str, str, str], str]:
    """What Braze holds: (group, kind, value) -> state."""
    return {key: s["state"] for key, s in sim_subscriptions(sim).items()}
