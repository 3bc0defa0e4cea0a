"""Braze's side of things, set and read through the simulator's control API (`/_sim/...`).

`workspace=` names one workspace of a simulator serving several (default: its first)."""

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


def _workspace(workspace: str | None) -> dict[str, str]:
    return {} if workspace is None else {"workspace": workspace}


def set_in_braze(
    url: str,
    group: str,
    state: str,
    values: list[str],
    kind: str = "email",
    *,
    workspace: str | None = None,
) -> None:
    """What a footer link or a STOP reply does: Braze changes, braze-subs is not told."""
    body = {"group": group, "kind": kind, "values": values, "state": state}
    params = _workspace(workspace)
    httpx.post(f"{url}/_sim/set_state", json=body, params=params).raise_for_status()


def braze_states(url: str, group: str, *, workspace: str | None = None) -> dict[str, str]:
    """The state Braze holds for each identifier value in `group`."""
    params = {"log": "0", **_workspace(workspace)}
    data = httpx.get(f"{url}/_sim/state", params=params).json()
    return {s["value"]: s["state"] for s in data["subscriptions"] if s["group"] == group}


def _url(sim: Any) -> str:
    """A simulator fixture or its base URL."""
    return sim if isinstance(sim, str) else sim.url


def faults(sim: Any, *, workspace: str | None = None, **switches: Any) -> None:
    """Switch the simulator's faults (outage, error_rate, latency, hold, api_keys, ...)."""
    url = f"{_url(sim)}/_sim/faults"
    httpx.post(url, json=switches, params=_workspace(workspace), timeout=10).raise_for_status()


def sim_stats(sim: Any, *, log: bool = False, workspace: str | None = None) -> dict[str, Any]:
    """The simulator's counters; `log`: with every request it received (`requests`)."""
    params = {**({} if log else {"log": "0"}), **_workspace(workspace)}
    return httpx.get(f"{_url(sim)}/_sim/stats", params=params, timeout=30).json()


def sim_subscriptions(
    sim: Any, *, workspace: str | None = None
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """What Braze holds: (group, kind, value) -> the subscription's record."""
    params = {"log": "0", **_workspace(workspace)}
    data = httpx.get(f"{_url(sim)}/_sim/state", params=params, timeout=30).json()
    return {(s["group"], s["kind"], s["value"]): s for s in data["subscriptions"]}


def sim_states(sim: Any, *, workspace: str | None = None) -> dict[tuple[str, str, str], str]:
    """What Braze holds: (group, kind, value) -> state."""
    return {key: s["state"] for key, s in sim_subscriptions(sim, workspace=workspace).items()}
