"""The simulator's ASGI application."""

from __future__ import annotations

from starlette.applications import Starlette

from simulator.braze_api import BrazeApi
from simulator.config import SimulatorConfig
from simulator.control import ControlApi
from simulator.hold import HoldGate
from simulator.state import SimulatorState


def create_app(config: SimulatorConfig, state: SimulatorState | None = None) -> Starlette:
    """A Starlette app serving the Braze endpoints and the `/_sim/` control API.

    `app.state.simulator` is the `SimulatorState` it serves.
    """
    sim_state = state if state is not None else SimulatorState(config)
    gate = HoldGate(sim_state)
    routes = [*BrazeApi(sim_state, gate).routes(), *ControlApi(sim_state, gate).routes()]
    app = Starlette(routes=routes)
    app.state.simulator = sim_state
    return app
