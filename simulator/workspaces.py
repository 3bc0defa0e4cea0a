"""The simulated workspaces of one simulator, and which one a request's key selects.

Braze serves every workspace of a cluster from one REST endpoint and tells them apart by
the API key; so does the simulator. A key no workspace accepts now (a revoked or rotated
key) is answered 401 by the workspace that accepted it last, so a key rotation's refusals
are counted where they happened; a key never seen anywhere by the first workspace.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from simulator.config import WorkspacesConfig
from simulator.state import SimulatorState


class UnknownWorkspace(LookupError):
    """A control request named a workspace the simulator does not have."""


class SimulatorWorkspaces:
    """Each workspace's `SimulatorState`, in configured order, selected by name or key."""

    def __init__(self, states: dict[str, SimulatorState]) -> None:
        if not states:
            raise ValueError("at least one workspace is needed")
        self._states = dict(states)
        self._first = next(iter(self._states))
        self._lock = threading.Lock()
        # key -> the workspace that accepted it last (configured keys, then fault changes).
        self._last_owner: dict[str, str] = {}
        for name, state in self._states.items():
            self.note_keys(name, state.config.api_keys)

    @classmethod
    def from_config(cls, config: WorkspacesConfig) -> SimulatorWorkspaces:
        return cls({name: SimulatorState(ws) for name, ws in config.workspaces.items()})

    @property
    def names(self) -> list[str]:
        return list(self._states)

    @property
    def first(self) -> SimulatorState:
        return self._states[self._first]

    def __iter__(self) -> Iterator[tuple[str, SimulatorState]]:
        return iter(list(self._states.items()))

    def get(self, name: str | None) -> SimulatorState:
        """The workspace named `name`; None: the first. Raises `UnknownWorkspace`."""
        if name is None:
            return self.first
        try:
            return self._states[name]
        except KeyError:
            known = ", ".join(self._states)
            raise UnknownWorkspace(
                f"Unknown workspace: {name} (this simulator has {known})"
            ) from None

    def name_for_key(self, key: str | None) -> str:
        """The workspace a request sending `key` reaches (see the module's docstring)."""
        if key is not None:
            for name, state in self._states.items():
                if state.authorize(key):
                    return name
            with self._lock:
                owner = self._last_owner.get(key)
            if owner is not None:
                return owner
        return self._first

    def for_key(self, key: str | None) -> SimulatorState:
        return self._states[self.name_for_key(key)]

    def note_keys(self, name: str, keys: Iterable[str]) -> None:
        """Remember that workspace `name` accepts `keys` (after a config or fault change)."""
        with self._lock:
            for key in keys:
                self._last_owner[key] = name

    def accepted_elsewhere(self, name: str, keys: Iterable[str]) -> str | None:
        """Another workspace that accepts one of `keys` now, None when none does."""
        wanted = set(keys)
        for other, state in self._states.items():
            if other != name and wanted & state.faults().api_keys:
                return other
        return None

    def release_holds(self) -> None:
        for state in self._states.values():
            state.release_holds()
