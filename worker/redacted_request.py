"""What a worker reports about `subscriptions.record_change` to Flower and its logs.

Celery sends each task's arguments in its events (Flower shows them) as the producer
rendered them. A producer in another service sends identifiers (an email, a phone) there,
so the worker reports a masked rendering instead: group, state and the identifier's kind
with a mask of its value, never the value itself.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request

from worker.redaction import mask_identifier

IDENTIFIER_FIELDS = ("external_id", "email", "phone")


def redact_row(kwargs: dict[str, Any]) -> dict[str, Any]:
    redacted = dict(kwargs)
    for name in IDENTIFIER_FIELDS:
        value = redacted.get(name)
        if isinstance(value, str):
            redacted[name] = mask_identifier(name, value)
        elif value is not None:
            redacted[name] = "***"
    return redacted


class RedactedRequest(Request):
    @property
    def argsrepr(self) -> str:
        return f"<{len(self.args or ())} positional>" if self.args else "()"

    @property
    def kwargsrepr(self) -> str:
        return repr(redact_row(self.kwargs or {}))
