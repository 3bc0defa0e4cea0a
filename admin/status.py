"""Where the work stands, read from Redis in one round trip and without scanning big keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from redis import Redis

from config.settings import Settings
from core.changes import Lane
from stores import counters as metrics
from stores import durability, fleet
from stores.buffer import lane_figures
from stores.clock import server_time_ms
from stores.keys import Keys
from stores.limiter import RateLimiter
from stores.refusals import Refusals, key_refusal


@dataclass(frozen=True, slots=True)
class Status:
    pending: int  # distinct group + identifier pairs waiting, not yet in a batch
    due_now: int  # of those, the ones due now
    due_later: int  # the others: waiting for their delay, or behind an in-flight batch
    oldest_due_age_seconds: float | None  # how long the oldest due change has waited
    in_flight: int  # identifiers in batches not yet acknowledged by Braze
    batches_in_flight: int
    dead_letter: int  # identifiers in the dead-letter store
    dead_letter_entries: int
    enqueued_total: int
    batches_total: int
    delivered_total: int
    dead_lettered_total: int
    dead_letters_expired: int  # entries removed after DEAD_LETTER_RETENTION_DAYS
    # identifiers left out of a post because Braze held them as unsubscribed and their
    # change asked to respect that (respect_opt_out)
    opt_out_skipped: int = 0
    # changes dropped because one that occurred later was already accepted for their group
    # and identifier (pending, in flight or delivered)
    stale: int = 0
    # accepted changes older than the watermark retention (compared with what was held)
    beyond_retention: int = 0
    erased: int = 0  # identifiers erased with `forget`
    tokens_left: int | None = None  # requests the shared budget would grant at once now
    paused: bool | None = False  # posting paused for every worker (after a 429); None:
    # unknown (no budget found: see budget_source)
    paused_until: float | None = None  # epoch seconds
    pause_reason: str | None = None
    credentials_refused: str | None = None  # why posting stopped: Braze refused the key
    credentials_refused_since: float | None = None  # epoch seconds
    requests_last_minute: int = 0
    identifiers_last_minute: int = 0
    throttled_last_minute: int = 0  # 429 answers
    identifiers_per_request: float | None = None  # over the last minute
    # What in Redis's configuration can lose changes (eviction, no persistence); None when
    # the server refuses CONFIG GET (managed services), [] when sound.
    redis_findings: list[str] | None = None
    # Groups Braze refuses as a whole (group, state, kind, detail, since/until epoch
    # seconds): their batches are dead-lettered unsent while the refusal stands.
    refused_groups: list[dict[str, Any]] = field(default_factory=list)
    delivery_errors_total: int = 0  # `errors` in Braze's 2xx answers
    splits_total: int = 0  # batches split to isolate identifiers Braze refused
    # Whose rate budget the RATE BUDGET figures are: the workspace id (REST host + a hash
    # of the key), and how it was found: "BRAZE_API_KEY" (this process has the key),
    # "recorded by a worker" (status runs without the key), or "unknown" (neither: the
    # budget figures are then absent, not made up).
    budget_workspace: str | None = None
    budget_source: str = "unknown"
    # The schedule (stores/fleet.py): batches waiting for their next try, by reason (every
    # reason, zero-filled), and seconds to the soonest due one (negative: overdue by that
    # much; None: nothing waits).
    waiting_batches: int = 0
    waiting_by_reason: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(fleet.WAIT_REASONS, 0)
    )
    waiting_next_due_seconds: float | None = None
    batches_posting: int = 0  # batches a worker holds a claim on now
    # Worker processes whose heartbeat is alive now; those seen in the last day; the ids of
    # the alive ones (sorted, at most 20).
    workers_alive: int = 0
    workers_seen_last_day: int = 0
    workers_alive_ids: list[str] = field(default_factory=list)
    # Per lane ("live", "bulk"): `pending`, changes waiting to be cut (not those behind a
    # batch in flight), and `oldest_seconds`, how long the oldest due one has been due.
    lanes: dict[str, dict[str, int | float]] = field(
        default_factory=lambda: {lane.value: {"pending": 0, "oldest_seconds": 0.0} for lane in Lane}
    )
    # Beat only schedules the coalescer; its ticks run on the workers (their own queue).
    # Seconds since beat's last heartbeat in Redis and since the last finished tick; None:
    # never seen.
    beat_last_seen_seconds: float | None = None
    last_tick_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class BudgetSource:
    workspace: str | None
    how: str  # "BRAZE_API_KEY" | "recorded by a worker" | "unknown"


def find_budget(client: Redis, keys: Keys, settings: Settings) -> BudgetSource:
    """Whose budget to show. With the key, this process's workspace. Without it, the one
    the workers recorded when they started (`Keys.workspaces`), for this endpoint if one
    is set, the most recently started if several; else unknown."""
    if settings.braze_api_key is not None:
        return BudgetSource(settings.workspace_id, "BRAZE_API_KEY")
    host = urlsplit(settings.rest_endpoint or "").netloc
    recorded = {
        workspace.decode(): int(started)
        for workspace, started in client.hgetall(keys.workspaces).items()
    }
    candidates = {
        workspace: started
        for workspace, started in recorded.items()
        if not host or workspace.startswith(f"{host}:")
    }
    if not candidates:
        return BudgetSource(None, "unknown")
    return BudgetSource(max(candidates, key=candidates.__getitem__), "recorded by a worker")


def read_status(
    client: Redis,
    keys: Keys,
    limiter: RateLimiter | None = None,
    source: BudgetSource | None = None,
) -> Status:
    now_ms = server_time_ms(client)
    pipe = client.pipeline(transaction=False)
    pipe.hlen(keys.pending)
    pipe.zcount(keys.due, "-inf", now_ms)
    pipe.zrange(keys.due, 0, 0, withscores=True)
    pipe.hlen(keys.inflight)
    pipe.zcard(keys.batches)
    pipe.get(keys.dead_letter_identifiers)
    pipe.hlen(keys.dead_letters)
    pipe.hgetall(keys.stats)
    pipe.zcount(keys.due_live, "-inf", now_ms)
    pipe.zrange(keys.due_live, 0, 0, withscores=True)
    pipe.zcard(keys.due_live)
    pipe.zcard(keys.due)
    (pending, due_now, oldest, inflight, batches, dlq_ids, dlq_entries, stats, live_now,
     live_oldest, live_count, bulk_count) = pipe.execute()  # fmt: skip
    lanes = {
        Lane.LIVE.value: lane_figures(now_ms, live_count, live_oldest),
        Lane.BULK.value: lane_figures(now_ms, bulk_count, oldest),
    }
    due_now = int(due_now) + int(live_now)
    firsts = [first[0][1] for first in (oldest, live_oldest) if first]
    oldest_age = None
    if firsts and min(firsts) <= now_ms:
        oldest_age = round((now_ms - min(firsts)) / 1000, 3)
    counters = {name.decode(): int(value) for name, value in stats.items()}
    minute = metrics.last_minute(client, keys, now_ms)
    budget = limiter.state() if limiter is not None else None
    # The deployment's credentials circuit, whatever key (if any) this reader holds: a
    # working key seen by any worker clears it for every reader.
    refused_key = key_refusal(client, keys)
    found = fleet.read_fleet(client, keys, now_ms)
    paused_until = budget.paused_until_ms if budget else None
    pause_reason = budget.pause_reason if budget else None
    if refused_key and paused_until is None:  # posting waits for the refused key's probe
        paused_until, pause_reason = refused_key.probe_at_ms, refused_key.reason
    return Status(
        pending=int(pending),
        due_now=int(due_now),
        due_later=int(pending) - int(due_now),
        oldest_due_age_seconds=oldest_age,
        in_flight=int(inflight),
        batches_in_flight=int(batches),
        dead_letter=int(dlq_ids or 0),
        dead_letter_entries=int(dlq_entries),
        enqueued_total=counters.get("enqueued", 0),
        batches_total=counters.get("batches", 0),
        delivered_total=counters.get("delivered", 0),
        dead_lettered_total=counters.get("dead_lettered", 0),
        dead_letters_expired=counters.get("dead_letters_expired", 0),
        opt_out_skipped=counters.get("opt_out_skipped", 0),
        stale=counters.get("stale", 0),
        beyond_retention=counters.get("beyond_retention", 0),
        erased=counters.get("erased", 0),
        tokens_left=budget.tokens_left if budget else None,
        paused=(paused_until is not None) if budget or refused_key else None,
        paused_until=round(paused_until / 1000, 3) if paused_until else None,
        pause_reason=pause_reason,
        credentials_refused=(refused_key.reason or "refused") if refused_key else None,
        credentials_refused_since=round(refused_key.since_ms / 1000, 3) if refused_key else None,
        requests_last_minute=minute.requests,
        identifiers_last_minute=minute.identifiers,
        throttled_last_minute=minute.throttled,
        identifiers_per_request=minute.identifiers_per_request,
        redis_findings=durability.check(client),
        refused_groups=[
            {
                "group": refusal.group,
                "state": refusal.state,
                "kind": refusal.kind,
                "detail": refusal.detail,
                "since": round(refusal.since_ms / 1000, 3),
                "until": round(refusal.until_ms / 1000, 3),
            }
            for refusal in Refusals(client, keys).listing(now_ms)
        ],
        delivery_errors_total=counters.get("delivery_errors", 0),
        budget_workspace=source.workspace if source else None,
        budget_source=source.how if source else ("BRAZE_API_KEY" if limiter else "unknown"),
        splits_total=counters.get("splits", 0),
        waiting_batches=found.waiting.total,
        waiting_by_reason=found.waiting.by_reason,
        waiting_next_due_seconds=found.waiting.next_due_seconds,
        batches_posting=found.posting,
        workers_alive=found.workers.alive,
        workers_seen_last_day=found.workers.seen_last_day,
        workers_alive_ids=found.workers.alive_ids,
        lanes=lanes,
        beat_last_seen_seconds=_age(found.beat_seen_ms, now_ms),
        last_tick_seconds=_age(found.last_tick_ms, now_ms),
    )


def _age(then_ms: int | None, now_ms: int) -> float | None:
    return None if then_ms is None else round(max(now_ms - then_ms, 0) / 1000, 3)


# --- several workspaces (issue 23) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One workspace as `status` and the exporter read it: its keys (its own hash tag), its
    shared budget (None: unknown) and whose budget that is."""

    name: str
    keys: Keys
    limiter: RateLimiter | None = None
    source: BudgetSource | None = None


@dataclass(frozen=True, slots=True)
class Overview:
    """Every workspace's status and their totals: `status --json` is the totals' keys (as
    before workspaces) and `workspaces: {NAME: {...}}`, always present."""

    total: Status
    workspaces: dict[str, Status]

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.total.as_dict(),
            "workspaces": {name: status.as_dict() for name, status in self.workspaces.items()},
        }


def read_overview(client: Redis, targets: Sequence[Target], deployment: Keys) -> Overview:
    """Each workspace's status (one `read_status` each) and their totals. Beat's heartbeat
    is the deployment's (`deployment`: the default tag's keys), one for every workspace."""
    seen = client.get(deployment.beat_seen)
    beat = _age(int(float(seen)), server_time_ms(client)) if seen else None
    per = {
        target.name: replace(
            read_status(client, target.keys, target.limiter, target.source),
            beat_last_seen_seconds=beat,
        )
        for target in targets
    }
    return Overview(combine(per), per)


# Figures that add up over workspaces (the rest: see `combine`).
_SUMMED = (
    "pending", "due_now", "due_later", "in_flight", "batches_in_flight", "dead_letter",
    "dead_letter_entries", "enqueued_total", "batches_total", "delivered_total",
    "dead_lettered_total", "dead_letters_expired", "opt_out_skipped", "stale",
    "beyond_retention", "erased", "requests_last_minute", "identifiers_last_minute",
    "throttled_last_minute", "delivery_errors_total", "splits_total", "waiting_batches",
    "batches_posting",
)  # fmt: skip


def combine(per: Mapping[str, Status]) -> Status:
    """The deployment's totals over its workspaces (pure). One workspace: its status as it
    is (exactly what `status` showed before workspaces). Several: counts summed; ages the
    largest (the workspace furthest behind), the next due time the soonest; the budget's
    tokens summed (unknown if any is), paused if any workspace is, each pause reason and
    refused key named by its workspace; workers the most any workspace sees (one worker
    process serves every workspace); Redis's findings and beat are the deployment's."""
    statuses = list(per.values())
    if len(statuses) == 1:
        return statuses[0]
    first = statuses[0]
    sums = {name: sum(getattr(s, name) for s in statuses) for name in _SUMMED}
    lanes: dict[str, dict[str, int | float]] = {}
    for status in statuses:
        for lane, figures in status.lanes.items():
            into = lanes.setdefault(lane, {"pending": 0, "oldest_seconds": 0.0})
            into["pending"] = int(into["pending"]) + int(figures["pending"])
            into["oldest_seconds"] = max(
                float(into["oldest_seconds"]), float(figures["oldest_seconds"])
            )
    by_reason: dict[str, int] = {}
    for status in statuses:
        for reason, waiting in status.waiting_by_reason.items():
            by_reason[reason] = by_reason.get(reason, 0) + waiting
    tokens = [s.tokens_left for s in statuses]
    paused = [s.paused for s in statuses]
    named = [(name, s) for name, s in per.items()]
    requests, identifiers = sums["requests_last_minute"], sums["identifiers_last_minute"]
    sources = {s.budget_source for s in statuses}
    refused = [(name, s) for name, s in named if s.credentials_refused]
    alive_ids = sorted({worker for s in statuses for worker in s.workers_alive_ids})
    ticks = [s.last_tick_seconds for s in statuses]
    return replace(
        first,
        **sums,
        oldest_due_age_seconds=_largest(s.oldest_due_age_seconds for s in statuses),
        tokens_left=None if None in tokens else sum(t for t in tokens if t is not None),
        paused=True if True in paused else (None if None in paused else False),
        paused_until=_largest(s.paused_until for s in statuses),
        pause_reason=_joined((name, s.pause_reason) for name, s in named),
        credentials_refused=_joined((name, s.credentials_refused) for name, s in refused),
        credentials_refused_since=min(
            (s.credentials_refused_since for _, s in refused if s.credentials_refused_since),
            default=None,
        ),
        identifiers_per_request=round(identifiers / requests, 1) if requests else None,
        refused_groups=[
            {**refusal, "workspace": name} for name, s in named for refusal in s.refused_groups
        ],
        budget_workspace=_joined((name, s.budget_workspace) for name, s in named),
        budget_source=first.budget_source if len(sources) == 1 else "per workspace",
        waiting_by_reason=by_reason,
        waiting_next_due_seconds=_smallest(s.waiting_next_due_seconds for s in statuses),
        workers_alive=max(s.workers_alive for s in statuses),
        workers_seen_last_day=max(s.workers_seen_last_day for s in statuses),
        workers_alive_ids=alive_ids[: fleet.ALIVE_IDS_SHOWN],
        lanes=lanes,
        last_tick_seconds=None if None in ticks else max(t for t in ticks if t is not None),
    )


def _largest(values: Any) -> Any:
    return max((v for v in values if v is not None), default=None)


def _smallest(values: Any) -> Any:
    return min((v for v in values if v is not None), default=None)


def _joined(pairs: Any) -> str | None:
    """ "NAME: text; NAME: text" of the workspaces that have a text; None if none has."""
    found = [f"{name}: {text}" for name, text in pairs if text]
    return "; ".join(found) if found else None
