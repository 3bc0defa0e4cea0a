"""A local Braze stand-in: the subscription endpoints, their rules and rate limit, and faults.

Users develop and demo without a Braze account; the test suite runs against it over HTTP.
One simulator serves one workspace or several (`WorkspacesConfig`), told apart by API key.
"""

from simulator.app import create_app
from simulator.config import DEFAULT_API_KEY, SimulatorConfig, WorkspacesConfig
from simulator.server import SimulatorServer, serve
from simulator.state import SimulatorState
from simulator.workspaces import SimulatorWorkspaces

__all__ = [
    "DEFAULT_API_KEY",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorState",
    "SimulatorWorkspaces",
    "WorkspacesConfig",
    "create_app",
    "serve",
]
