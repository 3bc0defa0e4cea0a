"""The simulator, plus a record of when each identifier arrived in which state.

The simulator's request log holds a time, status and identifier count per request, not the
identifiers themselves; per-identifier latency and "did the last write arrive" need them,
so this subclass of its state keeps them as accepted requests are applied.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from simulator import SimulatorConfig, SimulatorServer
from simulator.model import ValidatedRequest
from simulator.state import Outcome, RequestRecord, SimulatorState

Key = tuple[str, str, str]  # group, identifier kind, value
Arrival = tuple[float, str]  # simulator time, state


class RecordingState(SimulatorState):
    def __init__(self, config: SimulatorConfig) -> None:
        super().__init__(config)
        self._arrivals_lock = threading.Lock()
        self._arrivals: dict[Key, list[Arrival]] = defaultdict(list)

    def finish(
        self, record: RequestRecord, outcome: Outcome, request: ValidatedRequest | None = None
    ) -> None:
        super().finish(record, outcome, request)
        if outcome is not Outcome.OK or request is None:
            return
        with self._arrivals_lock:
            for update in request.updates:
                self._arrivals[(update.group, update.kind, update.value)].append(
                    (record.t, update.state)
                )

    def arrivals(self) -> dict[Key, list[Arrival]]:
        with self._arrivals_lock:
            return {key: list(values) for key, values in self._arrivals.items()}

    def arrived_keys(self) -> int:
        with self._arrivals_lock:
            return len(self._arrivals)


def start_simulator(
    limit: int, window: float, api_key: str
) -> tuple[SimulatorServer, RecordingState]:
    config = SimulatorConfig(
        api_keys={api_key}, auto_groups=True, rate_limit=limit, window_seconds=window
    )
    state = RecordingState(config)
    server = SimulatorServer(config, state=state)
    server.start()
    return server, state
