"""The producer API: put subscription changes into the buffer.

    from tasks.producer import enqueue_change
    enqueue_change(subscription_group_id="newsletter", subscription_state="unsubscribed",
                   email="jane@example.com")

Input uses the field names of an import row. Everything is validated before anything is
written: invalid input raises and enqueues nothing. Every change is routed to its Braze
workspace first (core/routing.py: its `workspace`, else its group's in
BRAZE_WORKSPACES_FILE, else the only one), so a change that fits none is refused like any
invalid change, and each workspace's changes go to that workspace's buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from config.workspaces import get_workspaces
from core.changes import Change, InvalidChange, Lane, parse_change, parse_lane
from core.errors import InputRefused
from core.routing import Routes
from stores.services import store_services


class ChangesRejected(InputRefused, ValueError):
    """Some of the changes given to `enqueue_changes` are invalid; none was enqueued."""

    def __init__(self, errors: list[tuple[int, InvalidChange]]) -> None:
        self.errors = errors
        shown = "; ".join(f"item {index}: {error}" for index, error in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} invalid change(s), nothing enqueued: {shown}{more}")


def _without_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def change_from_fields(
    *,
    subscription_group_id: str,
    subscription_state: str,
    external_id: str | None = None,
    email: str | None = None,
    phone: str | None = None,
    use_double_opt_in_logic: bool | None = None,
    delay_seconds: float | None = None,
    occurred_at: str | float | datetime | None = None,
    source: str | None = None,
    respect_opt_out: bool | None = None,
    lane: str | None = None,
    workspace: str | None = None,
) -> Change:
    """`enqueue_change`'s validation alone: the change its keyword arguments describe."""
    return parse_change(
        _without_none(
            {
                "subscription_group_id": subscription_group_id,
                "subscription_state": subscription_state,
                "external_id": external_id,
                "email": email,
                "phone": phone,
                "use_double_opt_in_logic": use_double_opt_in_logic,
                "delay_seconds": delay_seconds,
                "occurred_at": occurred_at,
                "source": source,
                "respect_opt_out": respect_opt_out,
                "lane": lane,
                "workspace": workspace,
            }
        )
    )


def workspace_of(change: Change) -> str:
    """The workspace `change` goes to (core/routing.py); raises `InvalidChange`."""
    return get_workspaces().routes.of(change)


def enqueue_change(
    *,
    subscription_group_id: str,
    subscription_state: str,
    external_id: str | None = None,
    email: str | None = None,
    phone: str | None = None,
    use_double_opt_in_logic: bool | None = None,
    delay_seconds: float | None = None,
    occurred_at: str | float | datetime | None = None,
    source: str | None = None,
    respect_opt_out: bool | None = None,
    lane: str | None = None,
    workspace: str | None = None,
) -> Change:
    """Validate and enqueue one change; returns it normalised. Raises `InvalidChange`.

    `occurred_at` (RFC 3339 with an offset, or epoch seconds) is when the change happened
    at its source: the change that occurred last wins, whatever order changes arrive in.
    `source` says who or what made it (kept in the history); `respect_opt_out` keeps a
    `subscribed` change from being sent for an identifier Braze holds as unsubscribed.
    `lane` is "live" (the default: goes first) or "bulk" (uses what live leaves).
    `workspace` names the Braze workspace (BRAZE_WORKSPACES_FILE); None: the group's, or
    the only one. A change that fits no workspace is refused naming its group."""
    change = change_from_fields(
        subscription_group_id=subscription_group_id,
        subscription_state=subscription_state,
        external_id=external_id,
        email=email,
        phone=phone,
        use_double_opt_in_logic=use_double_opt_in_logic,
        delay_seconds=delay_seconds,
        occurred_at=occurred_at,
        source=source,
        respect_opt_out=respect_opt_out,
        lane=lane,
        workspace=workspace,
    )
    store_services(workspace_of(change)).buffer.enqueue([change], lane=Lane.LIVE)
    return change


def validate_changes(items: Iterable[Mapping[str, Any] | Change]) -> list[Change]:
    """Parse and route every item; raise `ChangesRejected` listing every invalid one (a
    change that fits no workspace among them)."""
    return [change for change, _ in route_changes(items)]


def route_changes(
    items: Iterable[Mapping[str, Any] | Change], routes: Routes | None = None
) -> list[tuple[Change, str]]:
    """Every item parsed, with the workspace it goes to (`routes`, default: the process's
    BRAZE_WORKSPACES_FILE), in order; raises `ChangesRejected` listing every invalid or
    unroutable one (nothing is written)."""
    routes = routes or get_workspaces().routes
    routed: list[tuple[Change, str]] = []
    errors: list[tuple[int, InvalidChange]] = []
    for index, item in enumerate(items):
        try:
            change = item if isinstance(item, Change) else parse_change(_without_none(item))
            routed.append((change, routes.of(change)))
        except InvalidChange as error:
            errors.append((index, error))
    if errors:
        raise ChangesRejected(errors)
    return routed


def by_workspace(routed: Iterable[tuple[Change, str]]) -> dict[str, list[Change]]:
    """The changes of each workspace, in their given order (workspaces in order of first
    appearance): the order that decides between two changes of one identifier is kept,
    and two workspaces never share an identifier's slot anyway."""
    split: dict[str, list[Change]] = {}
    for change, workspace in routed:
        split.setdefault(workspace, []).append(change)
    return split


def enqueue_changes(
    items: Iterable[Mapping[str, Any] | Change], *, lane: str | Lane = Lane.LIVE
) -> int:
    """Validate and route all items, then enqueue them in order (later items win); returns
    the count. `lane` ("live" or "bulk") is the lane of the items that name none.

    One Redis round trip per chunk of changes, per workspace. Raises `ChangesRejected`
    (listing every bad item by index) and enqueues nothing if any item is invalid or fits
    no workspace.
    """
    chosen = parse_lane(lane)  # before anything is read or written
    split = by_workspace(route_changes(items))
    return sum(
        store_services(workspace).buffer.enqueue(changes, lane=chosen)
        for workspace, changes in split.items()
    )
