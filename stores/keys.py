"""The Redis key names braze-subs uses, in one place.

Every key carries the configured prefix inside a hash tag (`{prefix}:...`), so that on a
Redis Cluster all of them live in one slot and the Lua scripts may touch any of them.
No key name ever contains the API key: the workspace is named by `Settings.workspace_id`.

Each Braze workspace of BRAZE_WORKSPACES_FILE (issue 23) is a whole pipeline in a key space
of its own: the hash tag is `{prefix/NAME}`, except for the workspace named `default`, whose
tag stays `{prefix}`, exactly the keys of before workspaces (a deployment without the file,
or a file naming a workspace `default`, keeps what is in flight). The Lua scripts derive
their keys from a declared key's `{tag}:` (`_prelude.lua key_prefix`), so they need no
change; one workspace's scripts touch one slot. REDIS_KEY_PREFIX and workspace names hold no
`/`, `{` or `}`, so no two (prefix, workspace) pairs share a tag.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from core.routing import DEFAULT_WORKSPACE, is_workspace_name

# Separates group, identifier kind and value in a buffer field. Validation refuses control
# characters in group ids and external ids, and emails and E.164 phones cannot hold them,
# so the separator never occurs inside a part.
FIELD_SEPARATOR = "\x1f"


def buffer_field(group_id: str, kind: str, value: str) -> str:
    """The buffer slot of one identifier in one group: its last change lives here."""
    return f"{group_id}{FIELD_SEPARATOR}{kind}{FIELD_SEPARATOR}{value}"


def identity_digest(kind: str, value: str) -> str:
    """SHA-1 of "kind \x1f value": names an identifier's own keys without holding it (the
    Lua scripts compute the same, see `_prelude.lua`)."""
    return hashlib.sha1(f"{kind}{FIELD_SEPARATOR}{value}".encode()).hexdigest()


def split_field(field: str) -> tuple[str, str, str]:
    group_id, kind, value = field.split(FIELD_SEPARATOR, 2)
    return group_id, kind, value


def workspace_tag(prefix: str, workspace: str = DEFAULT_WORKSPACE) -> str:
    """The hash tag of a workspace's keys, braces included: `{prefix}` for `default`,
    `{prefix/NAME}` for any other."""
    if workspace == DEFAULT_WORKSPACE:
        return f"{{{prefix}}}"
    return f"{{{prefix}/{workspace}}}"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix, in one workspace's key space."""

    prefix: str
    workspace: str = DEFAULT_WORKSPACE

    def __post_init__(self) -> None:
        # Settings and the routing check names first; this guards the key space itself.
        if not is_workspace_name(self.workspace):
            raise ValueError(f"not a workspace name: {self.workspace!r}")

    @property
    def tag(self) -> str:
        """This workspace's hash tag, braces included (`{prefix}` or `{prefix/NAME}`)."""
        return workspace_tag(self.prefix, self.workspace)

    @property
    def deployment(self) -> Keys:
        """The keys of the default tag: where deployment-wide keys live."""
        return self if self.workspace == DEFAULT_WORKSPACE else Keys(self.prefix)

    def _key(self, name: str) -> str:
        return f"{self.tag}:{name}"

    @property
    def seq(self) -> str:
        """STRING counter: the sequence number of every enqueued change."""
        return self._key("seq")

    @property
    def pending(self) -> str:
        """HASH buffer field -> the newest change for it not yet taken into a batch."""
        return self._key("pending")

    @property
    def due(self) -> str:
        """ZSET buffer field -> due time (ms); holds exactly the pending fields not locked."""
        return self._key("due")

    @property
    def due_live(self) -> str:
        """ZSET like `due` for the live lane's fields (pending changes with "l": 1); `due`
        holds the bulk lane's. Scripts that are not given it name it `due` .. ":live"
        (_prelude.lua `lane_due`)."""
        return self._key("due:live")

    @property
    def inflight(self) -> str:
        """HASH buffer field -> id of the one unacknowledged batch that holds it."""
        return self._key("inflight")

    @property
    def batches(self) -> str:
        """ZSET batch id -> sweep deadline (ms): every batch cut and not yet finished; one
        neither claimed nor waiting in the schedule past its deadline gets another message."""
        return self._key("batches")

    @property
    def short_batches(self) -> str:
        """ZSET (all scored 0, read by prefix) "group SEP state SEP kind SEP doi SEP cut at
        ms SEP batch id" of every batch travelling alone (short or full) that no one has
        claimed yet: a claim of a batch of the same kind that is short takes their members
        in, the last cut first (issue 26, _prelude.lua `absorb`; an entry of the previous
        release, without the cut time, is read alike). Added by the cut's take, removed by
        the batch's claim; an entry whose batch ended unclaimed is dropped when a look
        finds it."""
        return self._key("batches:short")

    def batch(self, batch_id: str) -> str:
        """STRING JSON record of one batch, written when its changes leave the buffer."""
        return self._key(f"batch:{batch_id}")

    @property
    def claims(self) -> str:
        """ZSET batch id -> end of its claim's lease (ms): the batches a worker holds now.
        The holder's heartbeat extends the lease while its post is in progress."""
        return self._key("claims")

    @property
    def claim_tokens(self) -> str:
        """HASH batch id -> token of the claim's holder, `<worker id>/<random>`: the worker
        id names the heartbeat that keeps the claim alive."""
        return self._key("claims:token")

    @property
    def fences(self) -> str:
        """HASH batch id -> time (ms) its holder passed the fence and sent the request:
        while present, the request's outcome is not known yet."""
        return self._key("claims:sent")

    @property
    def schedule(self) -> str:
        """ZSET batch id -> due time (ms) of a batch waiting for its next try: the one place
        waiting batches wait (no countdown messages). The coalescer's tick sends a message
        for each entry when it is due."""
        return self._key("schedule")

    @property
    def schedule_reasons(self) -> str:
        """HASH batch id -> what its schedule entry waits for (see `WaitReason`)."""
        return self._key("schedule:reason")

    def handed(self, call_id: str) -> str:
        """STRING JSON list of the batch ids one call of dispatch_due.lua or
        sweep_batches.lua handed its caller to send messages for, kept a short while
        (`stores.batch_records.HANDED_KEEP_MS`): the same call sent again after its reply
        was lost (redis-py's resend after a ConnectionError) answers the same ids."""
        return self._key(f"handed:{call_id}")

    def heartbeat(self, worker_id: str) -> str:
        """STRING present while the worker process `worker_id` is alive (a short expiry,
        renewed every HEARTBEAT_INTERVAL_SECONDS)."""
        return self._key(f"heartbeat:{worker_id}")

    @property
    def workers(self) -> str:
        """ZSET worker id -> time (ms) of its last heartbeat, for listing (a day kept);
        liveness itself is the heartbeat key."""
        return self._key("workers")

    @property
    def dead_letters(self) -> str:
        """HASH dead-letter entry id -> JSON entry."""
        return self._key("dlq")

    @property
    def dead_letter_index(self) -> str:
        """ZSET dead-letter entry id -> time it was dead-lettered (ms)."""
        return self._key("dlq:index")

    @property
    def dead_letter_fields(self) -> str:
        """HASH buffer field -> the dead-letter entry holding its latest change; a newer
        change removes the field (the dead letter is superseded and must not be replayed)."""
        return self._key("dlq:fields")

    @property
    def dead_letter_identifiers(self) -> str:
        """STRING count of identifiers held in the dead-letter store."""
        return self._key("dlq:identifiers")

    def subject(self, kind: str, value: str) -> str:
        """HASH of one identifier across groups: "w\x1f<group>" -> occurred at (ms) of the
        latest accepted change (watermark); "d\x1f<entry id>" -> group, per dead letter
        holding it. Named by a hash of the identifier; expires (WATERMARK_RETENTION_DAYS)."""
        return self._key(f"subject:{identity_digest(kind, value)}")

    def history(self, kind: str, value: str) -> str:
        """LIST of one identifier's consent history, oldest first: "<ms>\x1f<JSON event>".
        Named by a hash of the identifier; bounded by HISTORY_RETENTION_DAYS and
        HISTORY_MAX_EVENTS."""
        return self._key(f"history:{identity_digest(kind, value)}")

    @property
    def groups(self) -> str:
        """SET of every group id a change was enqueued for: where erasure looks for an
        identifier's pending changes without scanning the buffer."""
        return self._key("groups")

    @property
    def stats(self) -> str:
        """HASH counters since start: enqueued, batches, identifiers_sent, requests..."""
        return self._key("stats")

    def limiter(self, workspace_id: str) -> str:
        """HASH the workspace's shared rate budget (see acquire_token.lua)."""
        return self._key(f"limiter:{workspace_id}")

    def read_limiter(self, workspace_id: str) -> str:
        """HASH the workspace's shared budget for the read endpoints (same layout as
        `limiter`; a budget of its own, so reads never take turns from posting)."""
        return self._key(f"limiter:read:{workspace_id}")

    def opt_out_read(self, batch_id: str) -> str:
        """STRING JSON: the opt-out check of a batch read ahead with another batch's
        (read time, identifiers read, those Braze holds as unsubscribed); expires."""
        return self._key(f"optout:{batch_id}")

    def metrics(self, epoch_second: int) -> str:
        """HASH counters of one second: requests, identifiers, throttled (429s); expires."""
        return self._key(f"metrics:{epoch_second}")

    @property
    def refusals(self) -> str:
        """HASH group/state/kind field -> JSON refusal (detail, since, until): an index of
        the standing refusals below, read by `status` (never scanned for)."""
        return self._key("refused")

    def refusal(self, field: str) -> str:
        """STRING JSON refusal of one group + state + identifier kind: Braze refused a whole
        batch of it; further batches are dead-lettered unsent. Expires with the refusal."""
        return self._key(f"refused:{field}")

    def refused_half(self, batch_id: str) -> str:
        """STRING Braze's message for a half of an anonymous split that was refused, while
        its sibling's answer is awaited; expires."""
        return self._key(f"refused-half:{batch_id}")

    def turn(self, batch_id: str) -> str:
        """STRING the rate budget's answer to the claim of a batch that took its turn in the
        same call ("token SEP granted SEP time SEP mark SEP why", claim_batch.lua), for a
        renewal by the same token; expires after the claim's lease. Named by the script."""
        return self._key(f"turn:{batch_id}")

    @property
    def credentials(self) -> str:
        """HASH the workspace's credentials circuit (circuit.lua): the workspace id of the
        key Braze refuses (host + a hash of the key, never the key), why, since when, its
        next probe. Absent while no key is refused; any working key deletes it."""
        return self._key("credentials")

    @property
    def workspaces(self) -> str:
        """HASH workspace id -> last time (ms) a worker posting for it started: lets `status`
        find the budget without the API key."""
        return self._key("workspaces")

    @property
    def request_totals(self) -> str:
        """HASH "<endpoint> <HTTP status>" -> requests sent since start (status "none": no
        answer); monotonic, fleet-wide, read by the Prometheus exporter."""
        return self._key("requests")

    @property
    def api_requests(self) -> str:
        """HASH the HTTP API's totals since start, fleet-wide (`stores/api_metrics.py`):
        "status <code>", "changes <accepted|stale>", "duration <bucket>", "duration sum".
        Deployment-wide: always in the default tag `{prefix}`, whichever workspace's keys
        name it."""
        return self.deployment._key("api:requests")

    @property
    def coalesce_last_tick(self) -> str:
        """STRING Redis time (ms) at which the last coalescer tick finished."""
        return self._key("coalesce:last_tick")

    @property
    def arrival_samples(self) -> str:
        """LIST of "ms total" samples of the buffer's `enqueued` counter, newest first, at
        least half a second apart, a few seconds' worth: the fleet's recent arrival rate."""
        return self._key("coalesce:arrivals")

    @property
    def served_workspaces(self) -> str:
        """SET of the names of every workspace a worker has served (`stores/served.py`):
        where a worker's start looks for work left in a key space the file no longer
        serves. Deployment-wide: always in the default tag."""
        return self.deployment._key("workspaces:served")

    @property
    def beat_seen(self) -> str:
        """STRING Redis time (ms) of beat's last heartbeat (every HEARTBEAT_INTERVAL_SECONDS):
        tells "beat is not running" apart from "no worker runs the coalescer's ticks".
        Deployment-wide (one beat schedules every workspace): always in the default tag."""
        return self.deployment._key("beat:seen")

    @property
    def coalesce_nudge(self) -> str:
        """LIST of at most one item, pushed by producers after an enqueue: wakes a coalescer
        waiting for work (BLPOP) so an idle pipeline does not wait for the next beat."""
        return self._key("coalesce:nudge")

    @property
    def coalesce_nudge_live(self) -> str:
        """LIST like `coalesce_nudge`, pushed only for live changes: a coalescer draining a
        backlog waits on this one alone, so a live change is cut at once, bulk at the beat."""
        return self._key("coalesce:nudge:live")

    @property
    def coalesce_lock(self) -> str:
        """STRING held by the coalescer tick in progress (saves duplicate work)."""
        return self._key("coalesce:lock")

    @property
    def coalesce_lock_live(self) -> str:
        """STRING held by the live-only tick in progress: it cuts live beside a full tick
        (the take script keeps a change in one batch), never beside another live one."""
        return self._key("coalesce:lock:live")
