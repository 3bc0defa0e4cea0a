"""The simulator for benchmarks, and when each identifier arrived in which state.

The simulator records the states it applied per identifier (`SimulatorState.applied`, the
order oracle's log); per-identifier latency and "did the last write arrive" read it here.
"""

from __future__ import annotations

from simulator import SimulatorConfig, SimulatorServer, SimulatorState

Key = tuple[str, str, str]  # group, identifier kind, value
Arrival = tuple[float, str]  # simulator time, state


def arrivals(state: SimulatorState) -> dict[Key, list[Arrival]]:
    """Per identifier, (arrival time, state) of every state a post applied, in order."""
    return {
        key: [(entry.t, entry.state) for entry in entries if not entry.external]
        for key, entries in state.applied().items()
    }


def start_simulator(
    limit: int, window: float, api_key: str
) -> tuple[SimulatorServer, SimulatorState]:
    config = SimulatorConfig(
        api_keys={api_key}, auto_groups=True, rate_limit=limit, window_seconds=window
    )
    server = SimulatorServer(config)
    server.start()
    return server, server.state
