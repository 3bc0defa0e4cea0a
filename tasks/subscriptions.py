"""The Celery tasks, by the names other services and Flower see.

- `subscriptions.record_change(**row)`: a producer in another service, sharing only the
  broker, records one change (same keyword arguments as an import row).
- `subscriptions.coalesce(workspace=None)`: the beat task that cuts one workspace's due
  changes into batches (beat has an entry per workspace).
- `subscriptions.post_batch(batch_id, workspace=None)`: posts one batch of a workspace now;
  its message carries only the id and the workspace. There are no countdown (ETA)
  messages: a batch that has to wait waits in the schedule in Redis, and the coalescer's
  tick sends it a message when it is due.
- `subscriptions.post_batches(batch_ids, workspace=None)`: posts several batches of one
  lane, one after the other, as `post_batch` posts each (issue 26: while the budget is far
  from binding, a tick that cuts many batches sends them in fewer messages; see
  `core.planning.message_groups`). A worker of a version before it discards the message
  as unregistered; its batches go out when the sweep re-sends them (BATCH_REDISPATCH_SECONDS).

`workspace=None` is the only workspace, or the one named `default` (issue 23): messages of
a version before workspaces still work.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import time
from dataclasses import asdict
from typing import Any

from amqp.exceptions import MessageNacked
from celery.signals import worker_ready
from kombu.exceptions import OperationalError

from config.workspaces import get_workspaces
from core.changes import InvalidChange, Lane
from core.errors import InputRefused
from core.planning import batch_lane
from core.redaction import mask_identifiers_in
from core.waiting import WaitReason
from delivery.dead_letter_retention import expire_dead_letters
from delivery.services import services, workspace_names
from stores.replication import NotReplicated
from tasks.celery_app import LIVE_POST_QUEUE, POST_QUEUE, app
from tasks.producer import enqueue_change

logger = logging.getLogger("braze_subs.tasks")


class ChangeRefused(InputRefused, ValueError):
    """An invalid change sent to `subscriptions.record_change`. Its message names the field
    and the reason with the identifier masked: it reaches Flower and the ERROR log."""


# The keyword arguments record_change takes: those of the producer API.
FIELDS = tuple(
    name
    for name, parameter in inspect.signature(enqueue_change).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


# `throws`: a refused change is the producer's bad input, not a fault of the worker: Celery
# logs it as one line ("raised expected: ChangeRefused('field: reason')", INFO) without a
# traceback, and the task still ends FAILURE with the reason for the producer and Flower.
# So is `NotReplicated` (REDIS_WAIT_REPLICAS not reached in time: one WARNING line here,
# the task FAILURE with the setting named; sending the change again is safe).
@app.task(
    name="subscriptions.record_change",
    Request="tasks.masked_messages:RedactedRequest",
    throws=(ChangeRefused, NotReplicated),
)
def record_change(*args: Any, **row: Any) -> dict[str, Any]:
    """Validate and enqueue one change. Invalid input fails the task with the reason."""
    if args:
        raise ChangeRefused(f"takes keyword arguments only ({', '.join(FIELDS)}), got {len(args)}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        # Named, never shown with its value: `emial=` may well hold an email.
        suggestions = {name: difflib.get_close_matches(name, FIELDS, n=1) for name in unknown}
        shown = ", ".join(
            f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            for name, hint in suggestions.items()
        )
        raise ChangeRefused(f"unknown field(s): {shown}")
    try:
        change = enqueue_change(**row)
    except InvalidChange as exc:
        # `from None`: the original exception, which quotes the value, is not chained.
        raise ChangeRefused(mask_identifiers_in(str(exc), row)) from None
    except NotReplicated as exc:
        logger.warning("record_change: %s", exc)  # names no identifier
        raise
    # Flower shows the result: keep it free of the identifier itself.
    return {"group": change.group_id, "state": change.state.value, "kind": change.kind.value}


@app.task(name="subscriptions.coalesce")
def coalesce(workspace: str | None = None) -> dict[str, Any]:
    found = services(workspace)
    coalescer = found.coalescer(
        functools.partial(_dispatch, found.workspace),
        functools.partial(_dispatch_many, found.workspace),
    )
    # Stay a little longer than one beat interval, ticking again on a producer's nudge or
    # when a lingering batch becomes ready, so some run is always awake. Overlapping runs
    # are harmless: each tick takes the coalescer lock, and a nudge wakes one run only, so
    # at most two runs wait at once whatever the load (under a backlog: one tick a beat).
    return asdict(coalescer.run(found.settings.coalesce_interval_seconds * 1.5))


@app.task(name="subscriptions.expire_dead_letters")
def expire_dead_letters_task(workspace: str | None = None) -> dict[str, Any]:
    """Beat task: remove one workspace's dead-letter entries past DEAD_LETTER_RETENTION_DAYS."""
    found = services(workspace)
    return {"expired": expire_dead_letters(found.settings, found.dead_letters)}


@worker_ready.connect
def _coalesce_at_start(**_: Any) -> None:
    """A worker that has just started ticks at once, in every workspace, rather than at
    beat's next interval: after a deploy or a restart, changes already waiting do not wait
    for the schedule.

    Batches that waited for the next probe of a refused key go at once too, unless this
    worker's key is the refused one: after the runbook's key rotation (a working key
    deployed, workers restarted) the backlog goes out within seconds, not a probe later,
    and the first success with the new key closes the circuit for every reader. Each
    workspace has its own key and circuit, so each decides for itself."""
    for workspace in workspace_names():
        found = services(workspace)
        if not found.limiter.state().circuit_here:
            released = found.batches.release_waiting(WaitReason.CREDENTIALS)
            if released:
                logger.warning(
                    "workspace %s: %d batches waited for a refused API key: due now with "
                    "this worker's key",
                    workspace,
                    released,
                )
        interval = found.settings.coalesce_interval_seconds
        coalesce.apply_async(kwargs=workspace_kwargs(workspace), expires=max(interval * 5, 5.0))


def workspace_kwargs(workspace: str) -> dict[str, Any]:
    """A task's kwargs for `workspace`: none for the workspace a task naming none stands
    for (a deployment without the file: the messages of before workspaces, which any
    version runs)."""
    return {} if workspace == get_workspaces().default else {"workspace": workspace}


# RabbitMQ nacks a publish that a quorum queue could not commit, e.g. its leader's node
# died mid-publish (seen in tests/e2e/test_rabbitmq_cluster.py): the message may or may not
# be in the queue. kombu retries a lost connection (and fails over to the next node) but
# not a nack, so the tick failed and the batch waited for the sweep
# (BATCH_REDISPATCH_SECONDS, 120 s). Published again after the new leader's election
# (well under a second): a second message for the batch posts nothing (one claim wins).
NACKED_PUBLISH_RETRIES = 5
NACKED_PUBLISH_PAUSE_SECONDS = 0.5


def _dispatch(workspace: str, batch_id: str) -> None:
    """The one kind of post message: "post this batch of this workspace now" (no
    countdown), into the queue of the batch's lane."""
    _publish(post_batch, (batch_id,), workspace, batch_id, f"batch {batch_id}'s")


def _dispatch_many(workspace: str, batch_ids: list[str]) -> None:
    """One message for several batches of one lane (a cut's: `Coalescer._send_cut`)."""
    _publish(
        post_batches,
        (list(batch_ids),),
        workspace,
        batch_ids[0],
        f"{len(batch_ids)} batches' ({batch_ids[0]}, ...)",
    )


def _publish(task: Any, args: tuple[Any, ...], workspace: str, lead: str, whose: str) -> None:
    """A post message into the queue of its batches' lane (read off `lead`), published
    again while the broker nacks it (see NACKED_PUBLISH_RETRIES)."""
    queue = LIVE_POST_QUEUE if batch_lane(lead) is Lane.LIVE else POST_QUEUE
    for attempt in range(NACKED_PUBLISH_RETRIES + 1):
        try:
            task.apply_async(args=args, kwargs=workspace_kwargs(workspace), queue=queue)
            return
        except OperationalError as exc:
            if not isinstance(exc.__cause__, MessageNacked) or attempt == NACKED_PUBLISH_RETRIES:
                raise
            logger.warning(
                "the broker refused (nacked) %s post message; publishing it again", whose
            )
            time.sleep(NACKED_PUBLISH_PAUSE_SECONDS)


class Shown:
    """A post task's result (plain data: a report's dict, or a list of them), shown by its
    own `repr`. Celery renders a task's result for the task-succeeded event (Flower) and
    the success log line with its `saferepr`, which walks a dict or list token by token and
    renders every key with a `saferepr` call of its own: ~0.45 ms of a worker's CPU for a
    message's ten reports in a drain, ~12x what `repr` of the same data costs (issue 26).
    An object that is no dict, list or tuple is rendered by its `repr`, cut to the same
    length (`resultrepr_maxsize`): the same text, as plain data holds nothing `repr` shows
    otherwise. Equal to the value it holds."""

    __slots__ = ("value",)

    def __init__(self, value: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)

    def __eq__(self, other: object) -> bool:
        return self.value == (other.value if isinstance(other, Shown) else other)

    __hash__ = None  # type: ignore[assignment]


@app.task(name="subscriptions.post_batch")
def post_batch(batch_id: str, workspace: str | None = None) -> Shown:
    # Whatever has to wait is put into the schedule by the poster; nothing is retried here.
    return Shown(services(workspace).poster().post(batch_id).as_dict())


@app.task(name="subscriptions.post_batches")
def post_batches(batch_ids: list[str], workspace: str | None = None) -> Shown:
    """Each batch as `post_batch` posts it, in the message's order. A batch whose post
    fails (its batches were given back to the schedule: `Poster.post`) does not keep the
    others from going; the first error is raised once all had their turn. On SIGTERM the
    batches not yet sent are handed back (the poster does it, batch by batch)."""
    if not isinstance(batch_ids, list) or not all(isinstance(b, str) for b in batch_ids):
        raise ValueError("batch_ids: a list of batch ids (strings) is required")
    poster = services(workspace).poster()
    reports: list[dict[str, Any]] = []
    failed: Exception | None = None
    for batch_id in batch_ids:
        try:
            reports.append(poster.post(batch_id).as_dict())
        except Exception as exc:  # the others still go; raised below
            logger.error("batch %s: post failed: %s: %s", batch_id, type(exc).__name__, exc)
            failed = failed or exc
    if failed is not None:
        raise failed
    return Shown(reports)
