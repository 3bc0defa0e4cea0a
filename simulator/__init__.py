"""A local Braze stand-in: the subscription endpoints, their rules and rate limit, and faults.

Users develop and demo without a Braze account; the test suite runs against it over HTTP.
"""

from simulator.app import create_app
from simulator.config import DEFAULT_API_KEY, SimulatorConfig
from simulator.server import SimulatorServer, serve
from simulator.state import SimulatorState

__all__ = [
    "DEFAULT_API_KEY",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorState",
    "create_app",
    "serve",
]
