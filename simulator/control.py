"""The control API under `/_sim/` (no auth): inspect state, reset, switch faults."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from simulator.faults import parse_fault_update
from simulator.hold import HoldGate
from simulator.state import SimulatorState


class ControlApi:
    """Handlers of `/_sim/*` bound to one simulator state."""

    def __init__(self, state: SimulatorState, gate: HoldGate) -> None:
        self._state = state
        self._gate = gate

    def routes(self) -> list[Route]:
        return [
            Route("/_sim/health", self.health, methods=["GET"]),
            Route("/_sim/state", self.get_state, methods=["GET"]),
            Route("/_sim/stats", self.get_stats, methods=["GET"]),
            Route("/_sim/reset", self.reset, methods=["POST"]),
            Route("/_sim/faults", self.get_faults, methods=["GET"]),
            Route("/_sim/faults", self.set_faults, methods=["POST"]),
        ]

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_state(self, request: Request) -> Response:
        return JSONResponse(self._state.snapshot(include_log=_wants_log(request)))

    async def get_stats(self, request: Request) -> Response:
        return JSONResponse(self._state.stats(include_log=_wants_log(request)))

    async def reset(self, request: Request) -> Response:
        self._state.reset()
        self._gate.notify()
        return JSONResponse({"message": "reset"})

    async def get_faults(self, request: Request) -> Response:
        return JSONResponse(self._state.faults().to_json())

    async def set_faults(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"message": "Body must be valid JSON"}, 400)
        update = parse_fault_update(body)
        if isinstance(update, str):
            return JSONResponse({"message": update}, 400)
        faults = self._state.update_faults(update)
        self._gate.notify()
        return JSONResponse(faults.to_json())


def _wants_log(request: Request) -> bool:
    return request.query_params.get("log", "1").lower() not in ("0", "false", "no")
