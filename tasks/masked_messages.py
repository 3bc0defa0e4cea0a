"""How the arguments of `subscriptions.record_change` are shown in Flower and the logs.

Celery puts a rendering of each task's arguments in the message and in its events, which
Flower shows. For record_change those arguments hold an identifier (an email, a phone), so
both sides render them masked — group, state, and the identifier's kind with a mask of its
value, never the value itself:

- `RedactedRequest`: the worker's own rendering (task-received, task-started… events and
  its log lines), whatever the producer sent. It also replaces the `argsrepr`/`kwargsrepr`
  of the message's headers before the task runs: Celery's own success and failure records
  carry them (`data.kwargs` with LOG_FORMAT=json), and a plain Celery app in another
  service fills them with the raw email or phone;
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
from core.redaction import mask_identifier, mask_text

RECORD_CHANGE = "subscriptions.record_change"


# Arguments of record_change that hold no personal data; any other (an identifier, or a
# misspelled name such as `emial`, which may hold one) is shown masked.
PLAIN_FIELDS = frozenset(
    (
        "subscription_group_id",
        "subscription_state",
        "use_double_opt_in_logic",
        "delay_seconds",
        "occurred_at",
        "source",
        "respect_opt_out",
    )
)


def redact_row(kwargs: dict[str, Any]) -> dict[str, Any]:
    redacted = dict(kwargs)
    for name, value in kwargs.items():
        if name in PLAIN_FIELDS or value is None:
            continue
        if name in IDENTIFIER_FIELDS and isinstance(value, str):
            redacted[name] = mask_identifier(name, value)
        elif isinstance(value, str):
            redacted[name] = mask_text(value)
        else:
            redacted[name] = "***"
    return redacted


class RedactedRequest(Request):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What Celery's tracer logs on success and failure comes from these headers.
        request = self._request_dict
        request["argsrepr"] = self._argsrepr = self.argsrepr
        request["kwargsrepr"] = self._kwargsrepr = self.kwargsrepr

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
