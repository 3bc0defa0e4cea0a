"""The control API under `/_sim/` (no auth): inspect state, reset, switch faults, read the
applied-states log (`/_sim/applied`), set a state "in Braze" (`/_sim/set_state`).

Every endpoint but `health` and `workspaces` acts on one workspace: `?workspace=NAME`, by
default the first (a simulator given one `SimulatorConfig` has only `default`). `reset`
without `?workspace=` resets every workspace. An unknown name is a 404 naming it.
`GET /_sim/workspaces` lists the names in order.
"""

from __future__ import annotations

import json
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from simulator.faults import parse_fault_update
from simulator.hold import HoldGate
from simulator.model import KINDS, Kind, SubscriptionState
from simulator.state import SimulatorState
from simulator.workspaces import SimulatorWorkspaces


class ControlApi:
    """Handlers of `/_sim/*` bound to the simulator's workspaces (each with its hold gate)."""

    def __init__(self, workspaces: SimulatorWorkspaces, gates: dict[str, HoldGate]) -> None:
        self._workspaces = workspaces
        self._gates = gates

    def _workspace(self, request: Request) -> tuple[str, SimulatorState]:
        """The workspace `?workspace=` names (the first when absent); `UnknownWorkspace`."""
        name = request.query_params.get("workspace")
        state = self._workspaces.get(name)
        return name if name is not None else self._workspaces.names[0], state

    def routes(self) -> list[Route]:
        return [
            Route("/_sim/health", self.health, methods=["GET"]),
            Route("/_sim/workspaces", self.list_workspaces, methods=["GET"]),
            Route("/_sim/state", self.get_state, methods=["GET"]),
            Route("/_sim/stats", self.get_stats, methods=["GET"]),
            Route("/_sim/reset", self.reset, methods=["POST"]),
            Route("/_sim/faults", self.get_faults, methods=["GET"]),
            Route("/_sim/faults", self.set_faults, methods=["POST"]),
            Route("/_sim/applied", self.get_applied, methods=["GET"]),
            Route("/_sim/set_state", self.set_state, methods=["POST"]),
        ]

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_workspaces(self, request: Request) -> Response:
        return JSONResponse({"workspaces": self._workspaces.names})

    async def get_state(self, request: Request) -> Response:
        _, state = self._workspace(request)
        return JSONResponse(state.snapshot(include_log=_wants_log(request)))

    async def get_stats(self, request: Request) -> Response:
        _, state = self._workspace(request)
        return JSONResponse(state.stats(include_log=_wants_log(request)))

    async def reset(self, request: Request) -> Response:
        if "workspace" in request.query_params:
            chosen = [self._workspace(request)]
        else:
            chosen = list(self._workspaces)
        for name, state in chosen:
            state.reset()
            self._workspaces.note_keys(name, state.faults().api_keys)
            self._gates[name].notify()
        return JSONResponse({"message": "reset"})

    async def get_faults(self, request: Request) -> Response:
        _, state = self._workspace(request)
        return JSONResponse(state.faults().to_json())

    async def get_applied(self, request: Request) -> Response:
        """`{"complete": bool, "applied": [{"group", "kind", "value", "states": [{"t",
        "state", "source", "request", "external"}]}]}`; `group`, `kind`, `value` filter."""
        _, state = self._workspace(request)
        params = request.query_params
        kind = params.get("kind")
        if kind is not None and kind not in KINDS:
            return JSONResponse({"message": f"kind must be one of {', '.join(KINDS)}"}, 400)
        document = state.applied_document(
            params.get("group"), cast(Kind | None, kind), params.get("value")
        )
        return JSONResponse(document)

    async def set_state(self, request: Request) -> Response:
        """`{"group", "kind", "value" | "values": [...], "state"}`: set states as Braze's own
        channels would (footer link, STOP reply); logged as external, no budget spent."""
        _, workspace = self._workspace(request)
        body = await _json_body(request)
        if not isinstance(body, dict):
            return JSONResponse({"message": "Body must be a JSON object"}, 400)
        unknown = sorted(set(body) - {"group", "kind", "value", "values", "state"})
        if unknown:
            return JSONResponse({"message": f"Unknown field: {unknown[0]}"}, 400)
        group, kind, state = body.get("group"), body.get("kind"), body.get("state")
        if not isinstance(group, str) or not group:
            return JSONResponse({"message": "group must be a non-empty string"}, 400)
        if ("value" in body) == ("values" in body):
            return JSONResponse({"message": "give one of value or values"}, 400)
        values: Any = [body["value"]] if "value" in body else body["values"]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return JSONResponse({"message": "values must be an array of strings"}, 400)
        try:
            workspace.set_states(group, cast(Kind, kind), values, cast(SubscriptionState, state))
        except ValueError as error:
            return JSONResponse({"message": str(error)}, 400)
        return JSONResponse({"message": "set", "count": len(values)})

    async def set_faults(self, request: Request) -> Response:
        name, state = self._workspace(request)
        body = await _json_body(request)
        if body is _NOT_JSON:
            return JSONResponse({"message": "Body must be valid JSON"}, 400)
        update = parse_fault_update(body)
        if isinstance(update, str):
            return JSONResponse({"message": update}, 400)
        keys = update.changes.get("api_keys")
        if keys is not None:
            other = self._workspaces.accepted_elsewhere(name, keys)
            if other is not None:  # the key would not say which workspace it reaches
                message = f"api_keys: workspace {other} accepts one of these keys already"
                return JSONResponse({"message": message}, 400)
        faults = state.update_faults(update)
        self._workspaces.note_keys(name, faults.api_keys)
        self._gates[name].notify()
        return JSONResponse(faults.to_json())


async def unknown_workspace(request: Request, error: Exception) -> Response:
    """The answer to a control request naming a workspace the simulator does not have."""
    return JSONResponse({"message": str(error)}, 404)


_NOT_JSON = object()


async def _json_body(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON


def _wants_log(request: Request) -> bool:
    return request.query_params.get("log", "1").lower() not in ("0", "false", "no")
