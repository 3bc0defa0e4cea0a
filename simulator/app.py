"""The simulator's ASGI application."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware

from simulator.braze_api import BrazeApi, BrazePosts
from simulator.config import SimulatorConfig, WorkspacesConfig, as_workspaces
from simulator.control import ControlApi, unknown_workspace
from simulator.hold import HoldGate
from simulator.state import SimulatorState
from simulator.workspaces import SimulatorWorkspaces, UnknownWorkspace


def simulator_workspaces(
    config: SimulatorConfig | WorkspacesConfig,
    state: SimulatorState | SimulatorWorkspaces | None = None,
) -> SimulatorWorkspaces:
    """The workspaces to serve: `state` when given (one state is workspace `default`), else
    fresh ones from `config`."""
    if isinstance(state, SimulatorWorkspaces):
        return state
    if isinstance(state, SimulatorState):
        return SimulatorWorkspaces({as_workspaces(config).names[0]: state})
    return SimulatorWorkspaces.from_config(as_workspaces(config))


def create_app(
    config: SimulatorConfig | WorkspacesConfig,
    state: SimulatorState | SimulatorWorkspaces | None = None,
) -> Starlette:
    """A Starlette app serving the Braze endpoints and the `/_sim/` control API for one
    workspace (a `SimulatorConfig`) or several (`WorkspacesConfig`).

    `app.state.simulator` is the first workspace's `SimulatorState`,
    `app.state.workspaces` every workspace's (`SimulatorWorkspaces`).
    """
    workspaces = simulator_workspaces(config, state)
    gates = {name: HoldGate(ws_state) for name, ws_state in workspaces}
    braze = BrazeApi(workspaces, gates)
    routes = [*braze.routes(), *ControlApi(workspaces, gates).routes()]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BrazePosts, api=braze)],  # the posts, without the routing
        exception_handlers={UnknownWorkspace: unknown_workspace},
    )
    app.state.simulator = workspaces.first
    app.state.workspaces = workspaces
    return app
