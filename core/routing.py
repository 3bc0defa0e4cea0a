"""Which Braze workspace a change goes to (issue 23): pure, so every way in routes alike.

A change may name its workspace; else its group's workspace from BRAZE_WORKSPACES_FILE;
else, with one workspace, that one; else it is refused naming the group. Every way in (the
producer API, `record_change`, `enqueue`, `import`, the HTTP API) routes every change before
anything is written, so a change that fits no workspace never enters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from core.changes import (
    WORKSPACE_NAME,
    WORKSPACE_NAME_RULE,
    Change,
    InvalidChange,
    is_workspace_name,
    parse_workspace_name,
)

__all__ = [
    "DEFAULT_WORKSPACE",
    "WORKSPACE_NAME",
    "WORKSPACE_NAME_RULE",
    "Routes",
    "is_workspace_name",
    "parse_workspace_name",
]

# The workspace a deployment without BRAZE_WORKSPACES_FILE serves, whose keys are exactly
# those of before workspaces (a file naming a workspace `default` keeps them too).
DEFAULT_WORKSPACE = "default"


@dataclass(frozen=True, slots=True)
class Routes:
    """The workspaces' names (in the file's order) and which one owns each listed group."""

    names: tuple[str, ...] = (DEFAULT_WORKSPACE,)
    groups: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("Routes needs at least one workspace")
        unknown = set(self.groups.values()) - set(self.names)
        if unknown:
            raise ValueError(f"groups routed to unknown workspaces: {sorted(unknown)}")

    def route(self, group_id: str, named: str | None = None, fallback: str | None = None) -> str:
        """The workspace of a change for `group_id` that names `named` (or none);
        `fallback` (a command's `--workspace` for the rows of a file) stands in after the
        group's workspace, before "the only one".

        Raises `InvalidChange`: `workspace` when a name is unknown or the file gives the
        group to another workspace; `subscription_group_id` when nothing decides."""
        if fallback is not None and fallback not in self.names:
            raise InvalidChange(
                "workspace",
                f"no workspace {fallback!r} in BRAZE_WORKSPACES_FILE "
                f"(known: {', '.join(self.names)})",
            )
        owner = self.groups.get(group_id)
        if named is not None:
            if named not in self.names:
                raise InvalidChange(
                    "workspace",
                    f"no workspace {named!r} in BRAZE_WORKSPACES_FILE "
                    f"(known: {', '.join(self.names)})",
                )
            if owner is not None and owner != named:
                raise InvalidChange(
                    "workspace",
                    f"group {group_id!r} belongs to workspace {owner!r} in "
                    f"BRAZE_WORKSPACES_FILE, not {named!r}",
                )
            return named
        if owner is not None:
            return owner
        if fallback is not None:
            return fallback
        if len(self.names) == 1:
            return self.names[0]
        raise InvalidChange(
            "subscription_group_id",
            f"group {group_id!r} belongs to no workspace in BRAZE_WORKSPACES_FILE "
            "(name one with workspace=)",
        )

    def of(self, change: Change) -> str:
        """The workspace of `change` (its own `workspace`, else by its group)."""
        return self.route(change.group_id, change.workspace)
