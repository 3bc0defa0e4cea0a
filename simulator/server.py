"""Running the simulator: in a background thread (tests, demos) or blocking (the CLI)."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn

from simulator.app import create_app, simulator_workspaces
from simulator.config import SimulatorConfig, WorkspacesConfig
from simulator.state import SimulatorState
from simulator.workspaces import SimulatorWorkspaces

_LOG_LEVEL = "warning"
# UVICORN_OPTIONS: uvicorn runs the simulator with httptools and uvloop (installed with the
# product, so its "auto" picks them) and without its proxy-headers middleware, which would
# rewrite the client's address from X-Forwarded-For for a simulator that never reads it
# (~15 us a request; issue 26).


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SimulatorServer:
    """The simulator on a background thread.

    Usage: `with SimulatorServer(SimulatorConfig(email_groups={"g"})) as sim:` then
    post to `f"{sim.url}/subscription/status/set"` and inspect `sim.state`.

    Given a `WorkspacesConfig`, it serves several workspaces: `sim.workspace(name)` is
    one's state, `sim.state` the first's.

    `port=0` picks a free port; `.url` and `.port` give the one in use once started.
    """

    def __init__(
        self,
        config: SimulatorConfig | WorkspacesConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        state: SimulatorState | None = None,
        log_level: str = _LOG_LEVEL,
    ) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self.host = host
        self._requested_port = port
        self.workspaces: SimulatorWorkspaces = simulator_workspaces(self.config, state)
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None

    @property
    def state(self) -> SimulatorState:
        """The first (with one `SimulatorConfig`, the only) workspace's state."""
        return self.workspaces.first

    def workspace(self, name: str) -> SimulatorState:
        """The state of the workspace named `name` (`UnknownWorkspace` if there is none)."""
        return self.workspaces.get(name)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        return self._port

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    def start(self, timeout: float = 10.0) -> SimulatorServer:
        """Start serving; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the simulator is already started")
        self._socket = _bind(self.host, self._requested_port)
        self._port = self._socket.getsockname()[1]
        app = create_app(self.config, self.workspaces)
        config = uvicorn.Config(
            app,
            log_level=self._log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            proxy_headers=False,  # see UVICORN_OPTIONS
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name=f"braze-simulator-{self._port}",
            daemon=True,
        )
        self._thread.start()
        self._wait_until_ready(timeout)
        return self

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._server is not None and self._thread is not None
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                self._cleanup()
                raise RuntimeError("the simulator failed to start")
            if self._server.started:
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        return
                except OSError:
                    pass
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"the simulator did not accept connections within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (held responses are released first) and wait for the thread."""
        if self._server is None or self._thread is None:
            return
        self.workspaces.release_holds()
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._server = None
        self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    config: SimulatorConfig | WorkspacesConfig,
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    log_level: str = _LOG_LEVEL,
) -> None:
    """Serve the simulator in the foreground until interrupted (for `braze-subs simulate`)."""
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        proxy_headers=False,  # see UVICORN_OPTIONS
    )
