"""The `hold` fault: responses wait while it is on."""

from __future__ import annotations

import asyncio
import contextlib

from simulator.state import SimulatorState

_POLL_SECONDS = 0.05


class HoldGate:
    """Parks responses while `hold` is on; `notify()` wakes them when it is switched off.

    The event gives a prompt wake-up for changes made through the control API; the short
    timeout also catches changes made directly on the state from another thread.
    """

    def __init__(self, state: SimulatorState) -> None:
        self._state = state
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Call after the hold switch may have changed (same event loop)."""
        if self._state.holding():
            self._event.clear()
        else:
            self._event.set()

    async def wait(self) -> None:
        if not self._state.holding():
            return
        self._state.enter_hold()
        try:
            while self._state.holding():
                if self._event.is_set():
                    self._event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), _POLL_SECONDS)
        finally:
            self._state.leave_hold()
