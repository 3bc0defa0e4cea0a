"""The Celery app: `celery -A worker.app worker` posts batches and runs the coalescer's ticks
(on their own queue), `celery -A worker.app beat` schedules those ticks. Settings are
validated on import, so a bad variable stops the process at start with one line."""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    celeryd_init,
    worker_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from kombu import Queue
from kombu.utils.scheduling import priority_cycle

from config.settings import Settings, SettingsError, get_settings, is_loopback_host
from config.workspaces import get_workspaces
from stores.connection import broker_options, broker_queue_arguments
from tasks.health import Heartbeat, heartbeat_path
from tasks.logs import configure_logging, quiet_banner_for_json, use_json_for_celery
from tasks.masked_messages import MaskingConsumer
from tasks.message_json import register as register_message_json

if TYPE_CHECKING:
    from delivery.liveness import Liveness

# The queue of `subscriptions.record_change` is Celery's default one, because services
# that only share the broker call send_task() without knowing our routes.
RECORD_QUEUE = "celery"
# The coalescer's ticks get their own queue so that a backlog of posts never delays them.
COALESCE_QUEUE = "braze-subs.coalesce"
# Posts, one queue per lane (core/planning.py `batch_lane`): a worker takes a live batch's
# message before any bulk one, so a live change never waits behind a backfill's messages.
# The bulk queue keeps the name of the one queue before lanes (workers of the previous
# version drain it during a rolling deploy).
POST_QUEUE = "braze-subs.post"
LIVE_POST_QUEUE = "braze-subs.post.live"
# The order a worker looks at its queues in (kombu's Redis transport BRPOPs them in one
# call, first non-empty wins): live posts, ticks, producers' record_change, bulk posts.
# Live posts come before ticks: a tick run stays 1.5 beat intervals, so after an outage
# (beat queued up to `expires` of ticks while no worker ran) the tick queue stays non-empty
# for many seconds while the pool drains it, and a live post ranked behind it waited that
# long (11-37 s seen in e2e/test_faults.py::test_worker_killed_mid_tick_does_not_stall_coalescing).
# But live posts can starve the ticks: two workspaces' first cuts put 1,000 live messages in
# the queue (a message waits for its workspace's seat and turn, ~25 s of budget), and the
# ticks queued behind them while the batches in flight ran out: both workspaces sent almost
# nothing for 2-4 s mid-drain (bench/workspaces.py, 0.92 of their budgets). So a tick gets
# the first look once `TICK_TURN_SECONDS` have passed since this process last took one
# (`LanesFirst`): a pile of stale ticks then takes one thread's turn each half second, not
# every thread.
QUEUE_ORDER = (LIVE_POST_QUEUE, COALESCE_QUEUE, RECORD_QUEUE, POST_QUEUE)
# Half a beat (COALESCE_INTERVAL_SECONDS is 1): beat's ticks, one per workspace a beat, are
# taken as they come by a fleet of two processes or more.
TICK_TURN_SECONDS = 0.5


class LanesFirst(priority_cycle):
    """kombu's `queue_order_strategy` (Redis transport) for our workers: the queues in
    `QUEUE_ORDER`, any other after them. kombu's own "priority" keeps the order of a set
    (arbitrary per process) and its default round robin gives a backfill's post queue the
    same turn as live's, so neither serves.

    A floor share for bulk (issue 22): the limiter keeps `BULK_FLOOR_SHARE` of the budget for
    bulk only while bulk asks for turns, and bulk asks only from a bulk message a thread took;
    under a live flood whose turns keep every thread busy the live queue is never empty, so
    live-first alone would never hand one out. (With the limiter sending a flood's extra live
    batches back to the schedule, threads free up: the default fleet's e2e flood gave bulk 0.112
    without this too, but 1 worker of 2 threads gave bulk 0 without it, 0.099 with it.) So after
    every `1 / BULK_FLOOR_SHARE - 1` live posts taken in a row, the next read looks at the bulk
    queue first (an empty one costs nothing: the same BRPOP falls through to the others). kombu
    calls `rotate` with each message's queue."""

    live_in_a_row = 0
    _bulk_every: int | None = None
    clock: Callable[[], float] = staticmethod(time.monotonic)
    _tick_taken_at: float | None = None

    def update(self, it: Iterable[str]) -> None:
        rank = {name: index for index, name in enumerate(QUEUE_ORDER)}
        self.items[:] = sorted(it, key=lambda name: (rank.get(name, len(rank)), name))

    def _bulk_turn_after(self) -> int:
        if self._bulk_every is None:
            share = get_settings().bulk_floor_share
            # 0: no floor, bulk only after everything else, as before.
            self._bulk_every = 0 if share <= 0 else max(1, round(1 / share) - 1)
        return self._bulk_every

    def consume(self, n: int) -> list[str]:
        items = list(self.items[:n])
        every = self._bulk_turn_after()
        if every and self.live_in_a_row >= every and POST_QUEUE in items:
            items = [POST_QUEUE, *(name for name in items if name != POST_QUEUE)]
        if COALESCE_QUEUE in items and self._ticks_turn():
            items = [COALESCE_QUEUE, *(name for name in items if name != COALESCE_QUEUE)]
        return items

    def _ticks_turn(self) -> bool:
        now = self.clock()
        if self._tick_taken_at is None:
            self._tick_taken_at = now  # the start: the first tick was just sent
        return now - self._tick_taken_at >= TICK_TURN_SECONDS

    def rotate(self, last_used: str) -> None:
        if last_used == LIVE_POST_QUEUE:
            self.live_in_a_row += 1
        elif last_used == POST_QUEUE:
            self.live_in_a_row = 0
        elif last_used == COALESCE_QUEUE:
            self._tick_taken_at = self.clock()


class WorkerConsumer(MaskingConsumer):  # type: ignore[misc]
    """The worker's consumer (tasks/masked_messages.py) without Celery's native delayed
    delivery, which Celery adds on RabbitMQ quorum queues for ETA/countdown messages.
    braze-subs sends none (a waiting batch waits in Redis's schedule), and the step would
    only bind our queues to exchanges of its own and warn, on every start, that our direct
    exchange cannot take delayed messages."""

    class Blueprint(MaskingConsumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            step
            for step in MaskingConsumer.Blueprint.default_steps
            if not step.endswith(":DelayedDelivery")
        ]


def _settings_or_exit() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        sys.exit(f"braze-subs: {exc}")


def _guard_flower() -> None:
    """`celery -A worker.app flower`: bind loopback unless an address is given, and refuse
    to listen elsewhere without authentication (Flower can revoke tasks and stop workers).

    Flower reads its options (FLOWER_* variables, a config file, the command line) after
    this app is loaded, into tornado's options; a parse callback sees the result before
    Flower binds. `celery` imports Flower's command (a plugin) before loading the app, so
    `flower.options` is already imported when Flower is installed; other processes never
    parse tornado options, so the callback never runs there."""
    if "flower.options" not in sys.modules:
        return
    from tornado.options import options

    def check() -> None:
        if options.unix_socket:
            return
        if not options.address:  # Flower's default is every interface
            options.address = "127.0.0.1"
        authenticated = any(options.basic_auth or ()) or bool(options.auth)
        if not authenticated and not is_loopback_host(options.address):
            raise SystemExit(
                f"braze-subs: FLOWER_BASIC_AUTH: required for Flower on {options.address} "
                "(not a loopback address): set FLOWER_BASIC_AUTH=user:password, or leave "
                "the address unset (127.0.0.1)"
            )

    options.add_parse_callback(check)


# Messages whose integers are too long for Python to convert are decoded, not refused whole
# (a CRITICAL with a traceback and the raw body): their task refuses the field instead.
register_message_json()


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat's entries: a coalescer tick and the dead letters' expiry for every workspace
    (kwargs `workspace`; the workspace a task naming none stands for keeps the entries and
    messages of before workspaces)."""
    interval = settings.coalesce_interval_seconds
    expiry = settings.dead_letter_expiry_interval_seconds
    workspaces = get_workspaces(settings)
    schedule: dict[str, dict[str, Any]] = {}
    for name in workspaces.names:
        plain = name == workspaces.default
        kwargs = {} if plain else {"workspace": name}
        suffix = "" if plain else f":{name}"
        schedule[f"coalesce{suffix}"] = {
            "task": "subscriptions.coalesce",
            "schedule": interval,
            "kwargs": kwargs,
            # A tick that could not run in time is replaced by the next one.
            "options": {"expires": max(interval * 5, 5.0)},
        }
        schedule[f"expire-dead-letters{suffix}"] = {
            "task": "subscriptions.expire_dead_letters",
            "schedule": expiry,
            "kwargs": kwargs,
            "options": {"expires": expiry},
        }
    return schedule


def create_app(settings: Settings) -> Celery:
    # The broker's URL (BROKER_URL, else REDIS_URL), TLS (certificate verified) and
    # Sentinel master, as for our own Redis clients; on RabbitMQ, publisher confirms and
    # every queue declared a quorum queue (stores/connection.py).
    broker = broker_options(settings)
    queue_arguments = broker_queue_arguments(settings)
    # The `celery` command copies a BROKER_URL variable into CELERY_BROKER_URL (its `-b`
    # option's variable), which Celery prefers to the app's configuration: that copy would
    # bypass the URL built here (a unix:// socket is kombu's redis+socket://). Dropped when
    # it is that copy; a different CELERY_BROKER_URL (`-b URL`) still wins, as documented.
    copied = os.environ.get("CELERY_BROKER_URL", "").strip()
    if settings.broker_url and copied == settings.broker_url:
        del os.environ["CELERY_BROKER_URL"]
    app = Celery(
        "braze-subs",
        broker=broker.pop("broker_url"),
        include=["tasks.subscriptions"],
        amqp="tasks.masked_messages:MaskingAMQP",
        events="tasks.celery_events:Events",  # no task event lost between pool threads
    )
    app.conf.update(
        # At-least-once: a message is acknowledged after its task ran, and redelivered if
        # the worker died. Batches are idempotent to resend; order is kept by the buffer's
        # per-identifier locks, not by message order.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # Redelivery of an unacknowledged message. No batch message waits (no countdowns:
        # waiting batches wait in Redis's schedule), and a dead worker's batches come back
        # within seconds through its heartbeat, so this only bounds a late duplicate, which
        # posts nothing (one claim wins; a batch waiting in the schedule is not claimable).
        broker_transport_options={
            "visibility_timeout": max(3600, int(settings.retry_backoff_max_seconds * 2)),
            "queue_order_strategy": "tasks.celery_app:LanesFirst",
            **broker.pop("broker_transport_options"),
        },
        **broker,
        worker_pool="threads",
        # Messages the worker cannot run (a misspelled task name, an invalid body) are
        # logged with their arguments masked, not whole (tasks/masked_messages.py).
        worker_consumer="tasks.celery_app:WorkerConsumer",
        worker_concurrency=settings.worker_concurrency,
        # SIGTERM is a warm shutdown: posts not yet sent hand their batches back at once
        # (`worker_shutting_down` below) and requests on the wire finish, within
        # HTTP_TIMEOUT_SECONDS. A cold shutdown (SIGQUIT, a second SIGTERM) still gives
        # them that long (Celery's soft shutdown) before it cuts them off.
        worker_soft_shutdown_timeout=settings.http_timeout_seconds + 2,
        # Task events for Flower.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_queues=tuple(Queue(name, queue_arguments=queue_arguments) for name in QUEUE_ORDER),
        task_default_queue=RECORD_QUEUE,
        task_routes={
            "subscriptions.coalesce": {"queue": COALESCE_QUEUE},
            "subscriptions.expire_dead_letters": {"queue": COALESCE_QUEUE},
            "subscriptions.post_batch": {"queue": POST_QUEUE},
        },
        # In-memory schedule: no shelve file to share or lock, so two beats can run (by
        # mistake) side by side; the coalescer's own lock and scripts keep that harmless.
        beat_scheduler="celery.beat:Scheduler",
        beat_schedule=beat_schedule(settings),
    )
    return app


settings = _settings_or_exit()
configure_logging(settings)
app = create_app(settings)
_guard_flower()
if settings.log_format == "json":
    celeryd_init.connect(quiet_banner_for_json, weak=False)
    after_setup_logger.connect(use_json_for_celery, weak=False)
    after_setup_task_logger.connect(use_json_for_celery, weak=False)


@worker_init.connect
def _require_braze(sender: Any = None, **_: Any) -> None:
    """A worker that cannot reach Braze stops at start, not on its first batch: every
    workspace's key and endpoint must be there (one line naming the variable, or the
    table and field of BRAZE_WORKSPACES_FILE). Then, per workspace: the workspace id it
    posts for is recorded, and its heartbeat (in that workspace's keys, where the claim
    scripts read it) beats before the first message is received."""
    try:
        for name in _workspace_names():
            _services(name).settings.require_braze()
    except SettingsError as exc:
        raise SystemExit(f"braze-subs: {exc}") from None
    _refuse_stranded_work()
    # The pool's real size (`--concurrency` wins over WORKER_CONCURRENCY): each workspace's
    # share of the threads is counted from it (delivery/thread_share.py).
    from delivery.thread_share import set_pool_size

    set_pool_size(getattr(sender, "concurrency", None))
    # The process is alive whether or not Redis answers yet; the steps that need Redis wait
    # for it (a Redis Cluster still being created beside the worker, in compose's
    # `cluster` profile: e2e/test_containers_cluster.py).
    _start_heartbeat("worker")
    _when_redis_answers("worker", _worker_steps_on_redis)


@worker_ready.connect
def freeze_start_up_heap(**_: Any) -> None:
    """The objects a worker holds once started (the modules, Celery's and kombu's
    machinery, each workspace's services and clients) are left out of the cyclic garbage
    collector's full collections from here on (`gc.freeze`, after one last collection).
    Objects without a cycle are freed by their reference counts as before; what is frozen
    lives as long as the process anyway.

    Issue 26, the tick: a tick's cut turns every change it reads into objects the
    collector tracks (10,000-20,000 a tick under a backlog), which survive the tick's
    young collections and so start full collections: each walked the whole start-up heap
    (~70,000 objects, ~50-70 ms of one core, the GIL held) where it now walks only what
    came since. Measured with `bench.tick_cpu` and `bench.worker_split` (README, the
    ceiling's seventh step). Not a higher threshold (`gc.set_threshold`): it would make
    every collection rarer, but each full one as long."""
    gc.collect()
    gc.freeze()


def _worker_steps_on_redis() -> None:
    _warn_if_redis_can_lose_changes()
    _record_workspace()
    for liveness in _every_liveness():
        liveness.ensure_started()  # known alive before the first message is received


def _when_redis_answers(role: str, steps: Any) -> None:
    """Run `steps` (idempotent) now, or, while Redis does not answer (not started yet, a
    cluster whose slots are not assigned yet), again every second in a thread of its own
    until they pass. Not in line: Celery logs an exception raised by a start-up signal's
    handler and goes on without the rest of it, which left a worker started before its
    Redis without the liveness heartbeat for good (its probe failing while it posted)."""
    from redis.exceptions import RedisClusterException, RedisError

    unanswered = (RedisError, RedisClusterException)
    try:
        steps()
        return
    except unanswered as exc:
        logging.getLogger(f"braze_subs.{role}").warning(
            "Redis does not answer yet (%s): its start-up checks wait for it", exc
        )

    def retry() -> None:
        while True:
            time.sleep(1.0)
            try:
                steps()
            except unanswered:
                continue
            logging.getLogger(f"braze_subs.{role}").info("Redis answers: start-up checks done")
            return

    threading.Thread(target=retry, name="braze-subs-start-on-redis", daemon=True).start()


def _refuse_stranded_work() -> None:
    """A worker does not start while work waits in the key space of a workspace the file
    does not serve (renamed, taken out, or the `default` of a deployment moved to the file
    under another name): no tick, post or `dlq` command would ever look there, so its
    unsubscribes would wait forever, unseen (stores/served.py). One line naming it and the
    way out. Redis unreachable: the check waits for the next start (it is not what keeps
    the worker from posting)."""
    from redis.exceptions import RedisError

    from stores.served import record_served, stranded_work

    names = _workspace_names()
    found = _services(names[0])
    try:
        stranded = stranded_work(found.redis, settings.redis_key_prefix, names)
        if not stranded:
            record_served(found.redis, settings.redis_key_prefix, names)
    except RedisError as exc:
        logging.getLogger("braze_subs.worker").warning(
            "could not check Redis for work of workspaces no longer served: %s", exc
        )
        return
    if stranded:
        held = "; ".join(entry.describe() for entry in stranded)
        raise SystemExit(
            f"braze-subs: Redis holds work of a workspace BRAZE_WORKSPACES_FILE does not "
            f"serve: {held}. Put its [workspaces.NAME] table back (a deployment moving to "
            "the file names its workspace `default`) and let it drain, or purge its dead "
            "letters (dlq purge --all --workspace NAME), before taking it out"
        )


@beat_init.connect
def _check_redis_at_beat_start(**_: Any) -> None:
    _start_heartbeat("beat")
    _when_redis_answers("beat", _warn_if_redis_can_lose_changes)
    threading.Thread(target=_beat_in_redis, name="braze-subs-beat-seen", daemon=True).start()


def _beat_in_redis() -> None:
    """Beat says it runs, in Redis, every HEARTBEAT_INTERVAL_SECONDS, for `status`, the
    exporter and the alerts: the coalescer's ticks run on the workers, so only this tells
    "beat is not running" from "no worker runs the ticks". A Redis outage is logged once
    and retried (a cluster with no slots yet fails already as its client is made); the
    thread dies with the process."""
    from redis.exceptions import RedisClusterException, RedisError

    from stores.heartbeats import beat_alive

    failing = False
    while True:
        try:
            found = _services(_workspace_names()[0])
            beat_alive(found.redis, found.keys.deployment)
            failing = False
        except (RedisError, RedisClusterException) as exc:
            if not failing:
                logging.getLogger("braze_subs.beat").warning(
                    "beat cannot write its heartbeat to Redis: %s", exc
                )
            failing = True
        time.sleep(settings.heartbeat_interval_seconds)


_heartbeats: list[Heartbeat] = []


def _start_heartbeat(role: str) -> None:
    """The liveness heartbeat `braze-subs probe live --role ROLE` reads (tasks/health.py)."""
    _heartbeats.append(
        Heartbeat(
            heartbeat_path(settings.health_dir, role), settings.liveness_max_age_seconds / 5
        ).start()
    )


@worker_shutting_down.connect
def _hand_back_on_stop(**_: Any) -> None:
    """SIGTERM (warm shutdown): requests on the wire finish; every post that has not sent
    yet hands its batches back to the schedule, due now, instead of waiting for its turn."""
    for liveness in _every_liveness():
        liveness.begin_stop()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    while _heartbeats:
        _heartbeats.pop().stop()
    # Without a heartbeat, anything still held (a prefetched message) goes to other
    # workers on the next tick, not after the heartbeat's expiry.
    for liveness in _every_liveness():
        liveness.stop()


def _workspace_names() -> tuple[str, ...]:
    return get_workspaces().names


def _every_liveness() -> list[Liveness]:
    """This process's heartbeat in every workspace (each workspace's claims are fenced by
    the heartbeats in its own keys)."""
    return [_services(name).liveness for name in _workspace_names()]


def _record_workspace() -> None:
    """Tell `status`, which may run without the API key, whose budget the fleet spends in
    each workspace: the workspace id (endpoint host + a hash of the key, never the key)
    and when."""
    for name in _workspace_names():
        _services(name).record_workspace()


def _services(workspace: str | None = None) -> Any:
    from delivery.services import services

    return services(workspace)


def _warn_if_redis_can_lose_changes() -> None:
    from stores import durability

    durability.warn_if_unsafe(_services(_workspace_names()[0]).redis)
