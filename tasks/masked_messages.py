"""How the arguments of `subscriptions.record_change` are shown in Flower and the logs.

Celery puts a rendering of each task's arguments in the message and in its events, which
Flower shows. For record_change those arguments hold an identifier (an email, a phone), so
both sides render them masked — group, state, and the identifier's kind with a mask of its
value, never the value itself:

- `RedactedRequest`: the worker's own rendering (task-received, task-started… events and
  its log lines), whatever the producer sent;
- `MaskingAMQP`: this project's app as a producer, for the message headers and the
  task-sent event (sent before any worker sees the task, and merged by Flower in whatever
  order the events arrive). A service with its own Celery app should pass
  `kwargsrepr=` itself if it enables `task_send_sent_event`.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP
from celery.worker.request import Request

from core.changes import IDENTIFIER_FIELDS
from core.redaction import mask_identifier

RECORD_CHANGE = "subscriptions.record_change"


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


class MaskingAMQP(AMQP):
    """Celery's message factory, rendering record_change's arguments masked."""

    def as_task_v2(  # type: ignore[override]
        self,
        task_id: str,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        *rest: Any,
        **options: Any,
    ) -> Any:
        if name == RECORD_CHANGE and isinstance(kwargs, dict):
            if options.get("kwargsrepr") is None:
                options["kwargsrepr"] = repr(redact_row(kwargs))
            if options.get("argsrepr") is None:
                options["argsrepr"] = f"<{len(args)} positional>" if args else "()"
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)
