"""Value types shared by the simulator's modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["external_id", "email", "phone"]
Channel = Literal["email", "sms"]
SubscriptionState = Literal["subscribed", "unsubscribed"]
Endpoint = Literal["v1", "v2"]
ReadEndpoint = Literal["status_get", "user_status"]
# Where an applied state came from: a post to v1 or v2, or `/_sim/set_state` ("external":
# a change made in Braze itself, e.g. a footer-link opt-out, not by braze-subs).
Source = Literal["v1", "v2", "external"]

SUBSCRIPTION_STATES: tuple[SubscriptionState, ...] = ("subscribed", "unsubscribed")
KINDS: tuple[Kind, ...] = ("external_id", "email", "phone")


@dataclass(frozen=True, slots=True)
class Update:
    """One identifier's new state in one subscription group."""

    group: str
    state: SubscriptionState
    kind: Kind
    value: str
    double_opt_in: bool


@dataclass(frozen=True, slots=True)
class UpdateList:
    """The identifiers of one kind a request sets to one state in one group, each once,
    in the order posted: a request's updates kept per list rather than one `Update` an
    identifier (a v1 request sets 50; issue 26)."""

    group: str
    state: SubscriptionState
    kind: Kind
    values: tuple[str, ...]
    double_opt_in: bool

    def updates(self) -> tuple[Update, ...]:
        return tuple(
            Update(self.group, self.state, self.kind, value, self.double_opt_in)
            for value in self.values
        )


@dataclass(frozen=True, slots=True)
class ValidatedRequest:
    """A request body that passed validation, normalised.

    `lists` are its updates, list by list in the order posted (`updates` one by one).
    `learned_groups` holds the channels fixed by this request for groups unknown so far
    (auto-groups mode only); they are recorded when the request is applied.
    """

    lists: tuple[UpdateList, ...]
    identifiers: int
    entries: int
    learned_groups: dict[str, Channel] = field(default_factory=dict)

    @property
    def updates(self) -> tuple[Update, ...]:
        """Every update, one an identifier and list, in the order posted."""
        return tuple(update for lst in self.lists for update in lst.updates())


@dataclass(frozen=True, slots=True)
class Applied:
    """One state applied to one (group, kind, value), in the order the simulator applied it.

    `t` is the simulator's clock when the request arrived; `request` the position of that
    post in the request log since the last reset (None for an external change).
    """

    t: float
    state: SubscriptionState
    source: Source
    request: int | None

    @property
    def external(self) -> bool:
        return self.source == "external"

    def to_json(self) -> dict[str, object]:
        return {
            "t": self.t,
            "state": self.state,
            "source": self.source,
            "request": self.request,
            "external": self.external,
        }
