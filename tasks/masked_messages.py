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
  `kwargsrepr=` itself if it enables `task_send_sent_event`;
- `MaskingConsumer`: the worker's consumer, for a message it cannot run — a misspelled
  task name (`subscriptions.record_chnage`), an invalid or undecodable message. Celery
  logs "the full contents of the message body" and its headers (a foreign producer's raw
  `kwargsrepr`), in text and JSON logs alike; here both are masked first, and the rest
  (reject, the task-failed event, the signals) is Celery's.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP
from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
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
        elif (
            name != RECORD_CHANGE  # its texts may hold an identifier: Celery's, as before
            and options.get("argsrepr") is None
            and options.get("kwargsrepr") is None
        ):
            shown = _shown_plainly(args, kwargs, self.argsrepr_maxsize, self.kwargsrepr_maxsize)
            if shown is not None:
                options["argsrepr"], options["kwargsrepr"] = shown
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)


def _plain_text(value: Any) -> bool:
    """A text `repr` and `saferepr` render alike: printable, no quote, no backslash."""
    return (
        type(value) is str
        and value.isprintable()
        and "'" not in value
        and '"' not in value
        and "\\" not in value
    )


def _is_text_or_texts(value: Any) -> bool:
    return _plain_text(value) or (
        type(value) in (list, tuple) and all(_plain_text(item) for item in value)
    )


def _shown_plainly(
    args: Any, kwargs: Any, args_most: int, kwargs_most: int
) -> tuple[str, str] | None:
    """A message's arguments rendered by `repr`, when they are plain texts or lists of them
    (the post messages': batch ids, the workspace) and the renderings fit Celery's sizes: the
    text Celery's `saferepr` would give (the message's headers and the task-sent event
    Flower shows), without its walk token by token (~55 us a message of ten batch ids
    against ~2 us; issue 26, the seventh step). Anything else is left to Celery (None)."""
    args, kwargs = args or (), kwargs or {}  # as Celery's `as_task_v2` takes them
    if (
        type(args) not in (list, tuple)
        or type(kwargs) is not dict
        or not all(_is_text_or_texts(arg) for arg in args)
        or not all(_plain_text(key) and _is_text_or_texts(v) for key, v in kwargs.items())
    ):
        return None
    args_shown, kwargs_shown = repr(args), repr(kwargs)
    if len(args_shown) > args_most or len(kwargs_shown) > kwargs_most:
        return None
    return args_shown, kwargs_shown


def _masked_payload(message: Any, body: Any) -> Any:
    """What Celery would print of a message's body, arguments masked: positional ones
    counted, keyword ones through `redact_row`; callbacks and the rest not shown."""
    try:
        payload = body if body is not None else message.decode()
    except Exception:  # undecodable: nothing of it is shown
        return f"<{len(message.body or b'')} bytes, not decodable>"
    if isinstance(payload, dict):  # protocol 1
        args, kwargs = payload.get("args") or (), payload.get("kwargs") or {}
    elif isinstance(payload, list | tuple) and len(payload) >= 2:  # protocol 2
        args, kwargs = payload[0] or (), payload[1] or {}
    else:
        return f"<{type(payload).__name__}, not shown>"
    shown_args = f"<{len(args)} positional>" if isinstance(args, list | tuple) else "***"
    shown_kwargs = redact_row(kwargs) if isinstance(kwargs, dict) else "***"
    return (shown_args, shown_kwargs, "<embed not shown>")


def _mask_headers(message: Any, masked: Any) -> None:
    """The headers Celery prints with the body: its renderings of the arguments (a plain
    producer fills them raw) replaced by the masked ones."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict):
        return
    if isinstance(masked, tuple):
        headers["argsrepr"], headers["kwargsrepr"] = masked[0], repr(masked[1])
    else:
        for name in ("argsrepr", "kwargsrepr"):
            if name in headers:
                headers[name] = "***"


class MaskingConsumer(Consumer):  # type: ignore[misc]
    """The worker's consumer, logging the messages it cannot run without personal data."""

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        masked = _masked_payload(message, body)
        _mask_headers(message, masked)
        super().on_unknown_task(masked, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        masked = _masked_payload(message, body)
        _mask_headers(message, masked)
        super().on_invalid_task(masked, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        masked = _masked_payload(message, body)
        _mask_headers(message, masked)
        super().on_unknown_message(masked, message)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        # Celery prints the undecodable body whole: here only its size.
        _logger.critical(
            "Can't decode message body: %r [type:%r encoding:%r] (%d bytes, not shown)",
            exc,
            message.content_type,
            message.content_encoding,
            len(message.body or b""),
            exc_info=True,
        )
        message.ack()


_logger = get_logger("celery.worker.consumer")
