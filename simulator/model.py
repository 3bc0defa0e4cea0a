"""Value types shared by the simulator's modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["external_id", "email", "phone"]
Channel = Literal["email", "sms"]
SubscriptionState = Literal["subscribed", "unsubscribed"]
Endpoint = Literal["v1", "v2"]

SUBSCRIPTION_STATES: tuple[SubscriptionState, ...] = ("subscribed", "unsubscribed")


@dataclass(frozen=True, slots=True)
class Update:
    """One identifier's new state in one subscription group."""

    group: str
    state: SubscriptionState
    kind: Kind
    value: str
    double_opt_in: bool


@dataclass(frozen=True, slots=True)
class ValidatedRequest:
    """A request body that passed validation, normalised.

    `learned_groups` holds the channels fixed by this request for groups unknown so far
    (auto-groups mode only); they are recorded when the request is applied.
    """

    updates: tuple[Update, ...]
    identifiers: int
    entries: int
    learned_groups: dict[str, Channel] = field(default_factory=dict)
