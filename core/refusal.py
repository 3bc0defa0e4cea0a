"""What to do with a batch Braze refused (a 400), and with the `errors` of a 2xx: pure.

A 400 is either about some identifiers (an invalid email: isolate them, deliver the rest)
or about the whole request (a group Braze does not know, emails sent to an SMS group:
every identifier would be refused). Halving a batch of the second kind down to single
identifiers costs 2n - 1 requests (99 for 50), from a budget the whole workspace shares,
so the whole batch is condemned instead as soon as that is clear:

- Braze's message names the group (`Unknown subscription_group_id: news`) -> condemn;
- Braze's message names one of the batch's identifiers -> isolate it (2 requests);
- the message names nothing: split in halves; if *both* halves are refused too, the
  group is condemned (3 requests in all), otherwise the refused half keeps halving.

A condemned group + state + identifier kind is remembered for a while (a *refusal*, in
Redis): further batches for it are dead-lettered without a request (see `stores.refusals`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from core.outcome import parse_answer

_TOKEN_SEPARATORS = re.compile(r"""[\s,;"'\[\]{}()<>]+""")


def _tokens(message: str) -> set[str]:
    return {token.strip(".:") for token in _TOKEN_SEPARATORS.split(message)} - {""}


def named_identifiers(message: str, values: Sequence[str]) -> list[str]:
    """The identifiers of the batch that `message` names, in batch order."""
    tokens = _tokens(message)
    return [value for value in values if value in tokens]


def named_identifier(message: str, values: Sequence[str]) -> str | None:
    """The one identifier of the batch that Braze's message names, if exactly one."""
    named = named_identifiers(message, values)
    return named[0] if len(named) == 1 else None


def names_group(message: str, group_id: str, values: Sequence[str] = ()) -> bool:
    """Braze's message is about the group itself: it names the group id and speaks of a
    group (`Unknown subscription_group_id: X`, `Subscription group X is an SMS group`).
    A group id that is also one of the identifiers proves nothing."""
    if group_id in values or group_id not in _tokens(message):
        return False
    return "group" in message.lower().replace(group_id.lower(), "")


class Sibling(StrEnum):
    """The other half of an anonymous split, seen from one half refused by Braze."""

    PENDING = "pending"  # not answered yet
    REFUSED = "refused"  # refused too
    GONE = "gone"  # delivered, or already isolated further: the fault is in this half


class Verdict(StrEnum):
    CONDEMN = "condemn"  # the whole batch is refused; remember the refusal of the group
    DEAD_LETTER = "dead_letter"  # a single identifier refused
    ISOLATE = "isolate"  # send the named identifier alone, the rest apart
    SPLIT = "split"  # send two halves
    HOLD = "hold"  # a refused half waits (no request) until its sibling is answered


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    why: str = ""
    isolate: str | None = None


def decide_bad_request(
    message: str, *, group_id: str, values: Sequence[str], sibling: Sibling | None = None
) -> Decision:
    """What to do with one batch (not a v2 pack) Braze answered 400 with `message`.
    `sibling` is None unless the batch is a half of a split that named nobody."""
    if names_group(message, group_id, values):
        return Decision(Verdict.CONDEMN, "Braze's message names the group")
    named = named_identifier(message, values)
    if named is not None:
        if len(values) == 1:
            return Decision(Verdict.DEAD_LETTER, "Braze's message names the identifier")
        return Decision(Verdict.ISOLATE, "Braze's message names one identifier", named)
    if sibling is Sibling.REFUSED:
        return Decision(Verdict.CONDEMN, "both halves of a split were refused")
    if sibling is Sibling.PENDING:
        return Decision(Verdict.HOLD, "waiting for the other half's answer")
    if len(values) == 1:
        return Decision(Verdict.DEAD_LETTER, "the single identifier was refused")
    return Decision(Verdict.SPLIT, "Braze named no identifier")


def delivery_errors(body: str) -> list[str]:
    """The `errors` of a 2xx answer (Braze's non-fatal errors), each as one line of text."""
    data = parse_answer(body)  # bounded in size and depth; None if not JSON
    errors = data.get("errors") if isinstance(data, dict) else None
    if not errors:
        return []
    if not isinstance(errors, list):
        errors = [errors]
    return [
        error if isinstance(error, str) else json.dumps(error, separators=(",", ":"))
        for error in errors
    ]
