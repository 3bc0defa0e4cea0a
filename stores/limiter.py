"""One rate budget for the whole fleet: a Redis-held cell-rate limiter, shared by every worker
process and by v1 and v2, named by the workspace (endpoint + hash of the key).

Why not Celery's `rate_limit`: it is per worker instance, so N containers would spend N
times the budget. Why not the `limits` library: its moving-window and fixed-window
strategies answer only "allowed now?", which leaves callers polling; the budget here
*reserves* a send time, so a worker either sleeps exactly until its turn or re-queues the
batch, and it has to yield to Braze's own count (X-RateLimit-Remaining), which no
general-purpose limiter does. The arithmetic (`Budget`) is pure; the state lives in two
small Lua scripts (`acquire_token.lua`, `observe_rate_limit.lua`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from redis import Redis

from core.changes import Lane
from core.outcome import RateLimit
from stores.clock import exact_ms
from stores.refusals import KEY_REFUSAL_FIELDS, KeyRefusal
from stores.scripts import Scripts, encoded


@dataclass(frozen=True, slots=True)
class Budget:
    """How a limit of `limit` requests per `window_ms` is spent: a burst, then a steady rate.

    In any half-open interval of length W, a cell-rate limiter with burst B and spacing T
    grants at most B - 1 + ceil(W/T) sends. Choosing B + W/T = limit * (1 - headroom)
    keeps every sliding window (and so every fixed window Braze counts) under the limit,
    with `headroom` left for the jitter between our clock and Braze's arrival times; the
    sustained rate is then (1 - headroom) * limit - B per window.
    """

    limit: int
    window_ms: float
    burst: int
    interval_ms: float  # spacing of sends at the sustained rate

    @classmethod
    def for_limit(
        cls, limit: int, window_seconds: float, *, headroom: float, burst_fraction: float
    ) -> Budget:
        if limit < 1 or window_seconds <= 0:
            raise ValueError("the limit and its window must be positive")
        burst = max(1, math.floor(limit * burst_fraction))
        # For tiny limits the formula leaves less than one request a window; spend half a
        # request a window then: under-using a tiny budget beats exceeding it.
        steady = max(limit * (1 - headroom) - burst, 0.5)
        window_ms = window_seconds * 1000
        return cls(limit=limit, window_ms=window_ms, burst=burst, interval_ms=window_ms / steady)

    @property
    def tolerance_ms(self) -> float:
        return (self.burst - 1) * self.interval_ms

    @property
    def sustained_per_window(self) -> float:
        return self.window_ms / self.interval_ms

    @property
    def max_per_window(self) -> int:
        """The most sends any half-open window of `window_ms` can hold: the burst's
        extra requests plus one send per interval."""
        return self.burst - 1 + math.ceil(self.sustained_per_window - 1e-9)


@dataclass(frozen=True, slots=True)
class Grant:
    granted: bool
    wait_seconds: float  # granted: sleep this long, then send; else: try again after it
    send_at_ms: float | None = None  # granted: the reserved send time, Redis clock
    probe: bool = False  # granted as the one probe of an open credentials circuit
    # granted while the circuit names another key: a success with this one closes it
    check: bool = False
    waits_for: str = ""  # not granted: "paused" (a 429), "credentials", "budget"

    @property
    def tests_the_key(self) -> bool:
        """A success of this request tells that a refused key works again (the probe) or
        that the key now deployed works (a rotation): either closes the circuit."""
        return self.probe or self.check


@dataclass(frozen=True, slots=True)
class TurnAsk:
    """One lane's turn of a budget, as a script call asks for it: acquire_token.lua's keys
    and arguments, encoded once (they are the same for every call of a process). A claim
    told to take the batch's turn carries them too (claim_batch.lua KEYS[15..16],
    ARGV[10..18]; issue 26: the claim and the turn in one call)."""

    keys: list[bytes]
    args: list[bytes]


@dataclass(frozen=True, slots=True)
class LimiterState:
    tokens_left: int  # requests that could go at once right now
    paused_until_ms: float | None  # after a 429
    pause_reason: str | None
    # The deployment's credentials circuit (whichever key it names): why posting stopped,
    # since when; None while no key is refused.
    circuit: str | None = None
    circuit_since_ms: float | None = None
    circuit_here: bool = False  # the refused key is this budget's


def grant_of(reply: list[Any]) -> Grant:
    """A turn's answer (acquire_token.lua's reply; the tail of a claim's that took the
    batch's turn, claim_batch.lua) as a `Grant`."""
    granted, wait_ms, send_at, mark, why = reply
    mark = mark.decode() if isinstance(mark, bytes) else mark
    return Grant(
        bool(int(granted)),
        int(wait_ms) / 1000,
        float(send_at) if send_at else None,
        probe=mark == "probe",
        check=mark == "check",
        waits_for=why.decode() if isinstance(why, bytes) else why,
    )


# How long after a bulk request live still keeps to its share of the budget: bulk asks
# continuously while it has work (fresh batches every beat, refused ones again within
# their reach), so a gap this long means no bulk waits.
BULK_SEEN_MS = 2000


class RateLimiter:
    def __init__(
        self,
        client: Redis,
        key: str,
        budget: Budget,
        *,
        max_wait_seconds: float,
        probe_interval_seconds: float = 60.0,
        scripts: Scripts | None = None,
        credentials_key: str | None = None,
        workspace: str | None = None,
        bulk_max_wait_seconds: float | None = None,
        bulk_floor_share: float = 0.0,
    ) -> None:
        """`credentials_key`: the deployment's credentials circuit (`Keys.credentials`);
        `workspace`: the id of the key this budget spends for (both default to names
        private to `key`, for budgets that never see a refused key)."""
        self.client = client
        self.key = key
        self.credentials_key = credentials_key or f"{key}:credentials"
        self.workspace = workspace or key
        self.budget = budget
        self.max_wait_ms = max_wait_seconds * 1000
        # Lanes: bulk reserves turns at most this far ahead (live takes the next one after
        # them); live alone spends at most 1 - `bulk_floor_share` of the budget, through a
        # second cell-rate limit of its own in the same hash ("live_tat").
        self.bulk_max_wait_ms = (
            self.max_wait_ms
            if bulk_max_wait_seconds is None
            else min(self.max_wait_ms, bulk_max_wait_seconds * 1000)
        )
        self.live_interval_ms = budget.interval_ms / (1 - bulk_floor_share)
        # While bulk asks, live reserves its own share's turns at most this far ahead, so
        # the shared budget is never promised past bulk's reach and a bulk caller gets the
        # turns live leaves (a live turn ends one interval after its own: hence the minus).
        self.live_floor_reach_ms = max(
            0.0, self.bulk_max_wait_ms - budget.interval_ms + budget.tolerance_ms
        )
        self.probe_interval_ms = round(probe_interval_seconds * 1000)
        self.scripts = scripts or Scripts(client)
        self._asks = {lane: self._ask(lane) for lane in Lane}

    def _ask(self, lane: Lane) -> TurnAsk:
        budget = self.budget
        live = lane is Lane.LIVE
        return TurnAsk(
            encoded([self.key, self.credentials_key]),
            encoded(
                [
                    budget.interval_ms,
                    budget.tolerance_ms,
                    self.max_wait_ms if live else self.bulk_max_wait_ms,
                    round(budget.window_ms * 2),
                    self.probe_interval_ms,
                    self.workspace,
                    self.live_interval_ms if live else 0,
                    BULK_SEEN_MS,
                    self.live_floor_reach_ms,
                ]
            ),
        )

    def turn_ask(self, lane: Lane = Lane.LIVE) -> TurnAsk:
        """The keys and arguments of a turn in `lane`, for a script that takes it in its own
        call (`acquire`, or a claim told to take its batch's turn: `BatchStore.claim`)."""
        return self._asks[lane]

    def acquire(self, lane: Lane = Lane.LIVE) -> Grant:
        """Reserve one request. Granted only if its turn comes within `max_wait_seconds`
        (bulk: `bulk_max_wait_seconds`; live: also within its share of the budget)."""
        ask = self._asks[lane]
        return grant_of(self.scripts.acquire_token(keys=ask.keys, args=ask.args))

    def open_circuit(self, reason: str) -> bool:
        """Braze refused this budget's key: every worker holding it stops, but for one probe
        per interval; every reader sees it (circuit.lua)."""
        return bool(
            self.scripts.circuit(
                keys=[self.credentials_key],
                args=["open", reason, self.probe_interval_ms, self.workspace],
            )
        )

    def close_circuit(self) -> bool:
        """A key works (the probe, or the key deployed since): posting resumes everywhere."""
        return bool(self.scripts.circuit(keys=[self.credentials_key], args=["close", "", 0, ""]))

    def _observe(self, remaining: int, reset_epoch: float, mode: str, reason: str) -> bool:
        budget = self.budget
        return bool(
            self.scripts.observe_rate_limit(
                keys=[self.key],
                args=[
                    remaining,
                    round(reset_epoch * 1000),
                    budget.interval_ms,
                    budget.tolerance_ms,
                    budget.burst,
                    budget.window_ms,
                    mode,
                    reason,
                ],
            )
        )

    def observe(self, rate: RateLimit, *, sent_at_ms: float | None = None) -> bool:
        """Yield to Braze's count when it says less is left than we would still spend.

        `sent_at_ms`: the send time the grant of the request that brought these headers
        reserved (Redis's clock, `Grant.send_at_ms`). The script cannot yield then unless
        its floor lies beyond it (`may_yield`): without that, it is not called (a round
        trip of the worker's CPU a post, issue 26)."""
        if rate.remaining is None or rate.reset_epoch is None:
            return False
        if sent_at_ms is not None and not self.may_yield(
            rate.remaining, rate.reset_epoch, sent_at_ms
        ):
            return False
        return self._observe(rate.remaining, rate.reset_epoch, "observe", "")

    def may_yield(self, remaining: int, reset_epoch: float, sent_at_ms: float) -> bool:
        """Whether observe_rate_limit.lua could move the budget for these headers, read
        after a request granted for `sent_at_ms`: the script moves it only to a floor
        (`reset - (remaining - burst) * interval + tolerance`) beyond both the budget's
        "tat" and Redis's now, and its now is past that send time by then (the request
        was sent after it and answered). The same arithmetic, on the script's rounding."""
        budget = self.budget
        floor = (
            round(reset_epoch * 1000)
            - (remaining - budget.burst) * budget.interval_ms
            + budget.tolerance_ms
        )
        return floor > sent_at_ms

    def pause_until(self, reset_epoch: float, reason: str) -> bool:
        """Pause every worker sharing this budget until `reset_epoch` (after a 429)."""
        return self._observe(0, reset_epoch, "pause", reason)

    def paused_for(self) -> float:
        """Seconds left of a pause every worker must respect now (0 if none)."""
        return self.pause_after_turn()[0]

    def pause_after_turn(self) -> tuple[float, str]:
        """Seconds left of a pause every worker must respect now, and why: "paused" (a
        429), "credentials" (this budget's key is refused: its next probe), or (0, "")."""
        clock, (paused,), refusal_fields = self._read("paused_until")
        now = exact_ms(clock)
        refusal = KeyRefusal.from_fields(refusal_fields)
        if paused and float(paused) > now:
            return (float(paused) - now) / 1000, "paused"
        if refusal is not None and refusal.workspace == self.workspace:
            return max(0.0, (refusal.probe_at_ms - now) / 1000), "credentials"
        return 0.0, ""

    def _read(self, *fields: str) -> tuple[tuple[int, int], list[Any], list[Any]]:
        """Redis's clock, `fields` of the budget and the credentials circuit's fields, at
        one instant in one round trip (limiter_state.lua: a script, so that on a Redis
        Cluster the clock is that of the node holding the budget)."""
        seconds, micros, values, refusal_fields = self.scripts.limiter_state(
            keys=[self.key, self.credentials_key], args=[*fields, "|", *KEY_REFUSAL_FIELDS]
        )
        return (int(seconds), int(micros)), values, refusal_fields

    def committed_ahead_ms(self, now_ms: float) -> float:
        """How far into the future the shared budget is already promised at `now_ms` (Redis
        clock): our reservations, and what Braze's headers said others spent."""
        tat = self.client.hget(self.key, "tat")
        return max(float(tat or 0) - now_ms, 0.0)

    @property
    def requests_per_second(self) -> float:
        """The budget's sustained rate."""
        return 1000 / self.budget.interval_ms

    def state(self) -> LimiterState:
        clock, (tat, paused, reason), refusal_fields = self._read(
            "tat", "paused_until", "pause_reason"
        )
        refusal = KeyRefusal.from_fields(refusal_fields)
        here = refusal is not None and refusal.workspace == self.workspace
        now = exact_ms(clock)  # the scripts' precision, not whole ms
        budget = self.budget
        ahead = max(float(tat or 0) - now, 0.0)  # how far the budget is spent into the future
        free = math.floor((budget.tolerance_ms - ahead) / budget.interval_ms + 1e-6) + 1
        paused_ms = float(paused) if paused and float(paused) > now else None
        return LimiterState(
            tokens_left=0 if paused_ms or here else max(0, min(budget.burst, free)),
            paused_until_ms=paused_ms,
            pause_reason=reason.decode() if paused_ms and reason else None,
            circuit=(refusal.reason or "refused") if refusal else None,
            circuit_since_ms=refusal.since_ms if refusal else None,
            circuit_here=here,
        )
