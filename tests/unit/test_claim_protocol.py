"""A model of the claim protocol, checked over every interleaving (pure, no Redis).

Two worker processes post batches for one identifier while the coalescer's tick takes
claims back from workers whose heartbeat is gone, sends due batches from the schedule and
sweeps lost messages, and a producer writes a newer state for the identifier. Any worker
may freeze (SIGSTOP: its heartbeat expires) at any step and thaw later; a request may fail.
Each step is one Lua script (or one request) of the real system:

- claim_batch.lua: a message claims a batch only if it is neither claimed nor scheduled,
  and a batch whose member is superseded by a pending newer change ends empty; a batch of
  other identifiers ("h", the host) that lost members at its claim is topped up in the same
  step with the identifier's due change, if no batch locks it (issue 26), and a newer
  change supersedes the identifier in the host as in any batch;
- top_up_batch.lua: between its claim and its fence (while it waited for its turn), a
  worker holding the host may top it up again with the identifier's due change, by the
  claim's rules, and only while it still holds the claim (issue 26); at its claim and
  there, the host may also absorb the identifier's batch (any batch of its kind, short or
  full, lends its members one by one), if no one has claimed that batch and the
  identifier's member in it was not superseded (`absorb`, issue 26);
- fence_batch.lua + the request: the fence runs right before the first byte is written
  (httpcore's trace hook, delivery/braze_client.py), so the model treats fence-and-write as
  one step (the limit of any fencing without Braze's help: README, guarantees);
- with `Rules.claim_fences` (issue 26's eighth step), any claim may also fence its batch
  (its turn was for now, nothing left before the request): the request is a step of its
  own after it. A worker frozen between the two may find its claim gone when it thaws;
  then its request sends no byte, since the exchange's deadline counts from before the
  claim was sent: a take-back of a dead holder's fenced batch waits for its mark plus the
  HTTP timeout and a lease outlasts that, so a claim gone means the deadline has passed
  (`fenced_deadline`; without it the checker finds the stale state). `forget` leaves a
  fenced batch's claim alone (the mark says its request may be on the wire): a request
  its claim fenced before the erasure may carry the identifier after it, as one fenced
  right before its first byte may;
- finish_batch.lua / defer_batch.lua: only the claim's holder ends or defers;
- take_back.lua: only from a holder whose heartbeat is gone (for a request already sent,
  only once it has timed out; the model takes it back at once, which is harsher);
- dispatch_due.lua, sweep_batches.lua, and the buffer's lock (finish unlocks, the tick cuts
  the newer change into a batch of its own).

A worker may also die right after fetching a message, before reading it: the message is
lost with it. take_back.lua's answer, the first time it finds a worker dead, is to schedule
every batch between message and claim (a duplicate message is harmless).

A worker may also crash once after its answer arrived: before it recorded the outcome
(the answer could not be read: it gives the batch back with an attempt counted, the outcome
unknown), or in the bookkeeping after it (counters, rate-limit headers: logged, nothing
else; the batch had ended or waits already). As it was before issue 21, the bookkeeping ran
before the outcome was recorded, and its failure gave the batch back with no attempt
counted, though Braze had accepted it: the checker finds that re-send too.

Checked in every reachable state: no request is sent without a live claim; Braze never
receives an older state after a newer one; a batch is sent again only when its earlier
request failed or its outcome is unknown (the sender died or froze after sending): never
because of a duplicate message; and every run that can go no further has delivered the
newest state. The same checker, run on the protocol as it was before (no fence, unchecked
finish, leases that expire under a frozen worker), finds the stale state of issue 9,
with a top-up that ignored the in-flight lock, an older state sent after a newer one, and
with a top-up before the send into a batch its worker no longer holds, a change lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


def replace(obj: T, **changes: Any) -> T:
    """`dataclasses.replace` for the model's frozen dataclasses, without its per-call field
    introspection (60 % of the checker's time): a copy of the instance's fields with
    `changes`; no `__init__` runs, and the model's classes define no `__post_init__`."""
    new = object.__new__(type(obj))
    fields = obj.__dict__.copy()
    fields.update(changes)
    object.__setattr__(new, "__dict__", fields)
    return new


OLD, NEW = 1, 2  # the identifier's states, in the order they were written (3: a third)
HOST = "h"  # a batch of other identifiers, which may take the identifier in at its claim


@dataclass(frozen=True)
class Rules:
    """Switches between the protocol as built and as it was."""

    fence: bool = True  # the claim is checked right before the send
    checked_finish: bool = True  # finish/defer only by the claim's holder
    take_back_live: bool = False  # a claim can be lost by a live-but-frozen holder's lease
    # expiring with no heartbeat known: the old lease-only protocol
    outcome_first: bool = True  # the outcome is recorded before the bookkeeping (issue 21)
    forget_ends_claims: bool = True  # forget.lua ends the claims not yet sent (issue 21)
    top_up_checks_lock: bool = True  # a top-up takes only a change no batch locks (issue 26)
    # The second top-up, right before the request (top_up_batch.lua), only into a batch
    # its worker still holds (issue 26).
    send_top_up_checks_claim: bool = True
    # Issue 26, the eighth step: a claim may fence its batch too (phase "f"), the request a
    # step after it; its deadline counts from before the claim, so a claim taken from a
    # frozen worker meanwhile (after the mark's timeout, or the lease) leaves it no time to
    # send: False is a request that goes whenever its worker thaws.
    claim_fences: bool = False
    fenced_deadline: bool = True


@dataclass(frozen=True)
class Worker:
    alive: bool = True
    # None (idle), or (batch, token, phase, outcome) with phase "claimed" or "sent"
    job: tuple[str, int, str, str] | None = None
    death_handled: bool = False  # take_back.lua has seen it dead (once per death)
    # Killed, not frozen: it comes back only as a new process (a new worker id), so its
    # old id is dead for good and the tick does see it dead first.
    killed: bool = False


@dataclass(frozen=True)
class State:
    batches: frozenset[tuple[str, int]]  # (batch id, state it carries; 0: none of it)
    claims: frozenset[tuple[str, int, int]]  # (batch id, token, holder worker index)
    schedule: frozenset[str]
    messages: tuple[str, ...]  # sorted multiset of "post this batch now" messages
    locked_by: str | None  # the batch that locks the identifier
    pending: int | None  # a newer change waiting in the buffer
    braze: int | None  # the state Braze holds
    sends: frozenset[tuple[str, str]]  # (batch id, its last request: inflight|failed|...)
    workers: tuple[Worker, Worker]
    next_token: int = 1
    freezes: int = 2
    sweeps: int = 2
    failures: int = 1
    crashes: int = 0  # a worker's error after its answer arrived (bounded like freezes)
    forgets: int = 0  # `forget` of the identifier may run (once)
    # The first token claimed after `forget` ran (0: it has not): a worker holding an older
    # token read the identifier into memory with its batch before the erasure.
    erased_token: int = 0
    written: int = 0  # newer states written so far (the producer's steps)
    writes: int = 1  # newer states the producer writes in all (NEW, then 3, ...)
    violation: str | None = None


def start(
    *,
    freezes: int = 2,
    crashes: int = 0,
    forget: bool = False,
    writes: int = 1,
    host: bool = False,
    sweeps: int = 2,
) -> State:
    """`host`: a batch of other identifiers is cut too, which may take the identifier in
    at its claim (a top-up)."""
    return State(
        freezes=freezes,
        crashes=crashes,
        forgets=int(forget),
        writes=writes,
        sweeps=sweeps,
        batches=frozenset({("b1", OLD), *((HOST, 0),) * host}),
        claims=frozenset(),
        schedule=frozenset(),
        messages=("b1", HOST) if host else ("b1",),
        locked_by="b1",
        pending=None,
        braze=None,
        sends=frozenset(),
        workers=(Worker(), Worker()),
    )


def _holder(state: State, batch: str) -> tuple[int, int] | None:
    for b, token, worker in state.claims:
        if b == batch:
            return token, worker
    return None


def _version(state: State, batch: str) -> int | None:
    return next((v for b, v in state.batches if b == batch), None)


def _send_status(state: State, batch: str) -> str:
    return next((s for b, s in state.sends if b == batch), "none")


def _with_send(state: State, batch: str, status: str) -> frozenset[tuple[str, str]]:
    return frozenset({(b, s) for b, s in state.sends if b != batch} | {(batch, status)})


def _set_worker(state: State, index: int, worker: Worker) -> tuple[Worker, Worker]:
    workers = list(state.workers)
    workers[index] = worker
    return (workers[0], workers[1])


def _end_batch(state: State, batch: str) -> State:
    """finish_batch.lua's effect: the record goes, the lock is released."""
    return replace(
        state,
        batches=frozenset(x for x in state.batches if x[0] != batch),
        claims=frozenset(c for c in state.claims if c[0] != batch),
        schedule=state.schedule - {batch},
        locked_by=None if state.locked_by == batch else state.locked_by,
    )


def steps(state: State, rules: Rules) -> Iterator[tuple[str, State]]:
    """Every step that can happen next."""
    # --- the producer writes each newer state in turn --------------------------------------
    if state.written < state.writes:
        yield "enqueue", replace(state, pending=NEW + state.written, written=state.written + 1)
    # --- an operator runs `forget` (forget.lua) --------------------------------------------
    if state.forgets:
        # Claims whose holder has not sent (no fence yet), told by the token: a frozen
        # worker's stale job may name a batch that another worker has claimed and sent since.
        unsent = {
            worker.job[1]
            for worker in state.workers
            if worker.job is not None and worker.job[2] == "c"
        }
        stopped = {c for c in state.claims if c[1] in unsent} if rules.forget_ends_claims else set()
        yield (
            "forget",
            replace(
                state,
                forgets=0,
                erased_token=state.next_token,
                pending=None,
                locked_by=None,
                # Every batch record loses its member: version 0, nothing to send.
                batches=frozenset((b, 0) for b, _v in state.batches),
                claims=state.claims - stopped,
                schedule=state.schedule | {c[0] for c in stopped},
            ),
        )
    # --- the tick ----------------------------------------------------------------------------
    if state.locked_by is None and state.pending is not None:  # cut the newer change
        cut = f"b{state.pending}"
        yield (
            "cut",
            replace(
                state,
                batches=state.batches | {(cut, state.pending)},
                locked_by=cut,
                pending=None,
                messages=tuple(sorted((*state.messages, cut))),
            ),
        )
    for batch in sorted(state.schedule):  # dispatch_due.lua
        yield (
            f"due {batch}",
            replace(
                state,
                schedule=state.schedule - {batch},
                messages=tuple(sorted((*state.messages, batch))),
            ),
        )
    for batch, token, worker in sorted(state.claims):  # take_back.lua
        dead = not state.workers[worker].alive
        # The old protocol: a lease runs out under a holder that is frozen in a way the
        # system cannot see (bounded like the freezes).
        expires = rules.take_back_live and state.freezes > 0
        if dead or expires:
            yield (
                f"take back {batch}",
                replace(
                    state,
                    freezes=state.freezes - (not dead),
                    claims=state.claims - {(batch, token, worker)},
                    # The old protocol: the lease ran out and the sweep sends a message;
                    # now: the batch waits in the schedule, due now.
                    schedule=state.schedule if rules.take_back_live else state.schedule | {batch},
                    messages=(
                        tuple(sorted((*state.messages, batch)))
                        if rules.take_back_live
                        else state.messages
                    ),
                    sends=(
                        _with_send(state, batch, "unknown")
                        if _send_status(state, batch) == "inflight"
                        else state.sends
                    ),
                ),
            )
    for index, worker in enumerate(state.workers):  # take_back.lua, once per death
        if not worker.alive and not worker.death_handled and not rules.take_back_live:
            between = {b for b, _v in state.batches if _holder(state, b) is None} - state.schedule
            yield (
                f"w{index} found dead: messages out rescheduled",
                replace(
                    state,
                    schedule=state.schedule | between,
                    workers=_set_worker(state, index, replace(worker, death_handled=True)),
                ),
            )
    if state.sweeps:  # sweep_batches.lua: a duplicate message for a batch between states
        for batch, _v in sorted(state.batches):
            if _holder(state, batch) is None and batch not in state.schedule:
                yield (
                    f"sweep {batch}",
                    replace(
                        state,
                        sweeps=state.sweeps - 1,
                        messages=tuple(sorted((*state.messages, batch))),
                    ),
                )
    # --- the workers -------------------------------------------------------------------------
    for index, worker in enumerate(state.workers):
        if not worker.alive:
            if not worker.killed or worker.death_handled:
                yield (
                    f"w{index} thaws",
                    replace(state, workers=_set_worker(state, index, Worker(True, worker.job))),
                )
            continue
        if state.freezes:
            yield (
                f"w{index} freezes",
                replace(
                    state,
                    freezes=state.freezes - 1,
                    workers=_set_worker(state, index, Worker(False, worker.job)),
                ),
            )
        yield from _worker_steps(state, index, worker, rules)


def _worker_steps(
    state: State, index: int, worker: Worker, rules: Rules
) -> Iterator[tuple[str, State]]:
    if worker.job is None:
        for batch in sorted(set(state.messages)):  # a message arrives: claim_batch.lua
            messages = list(state.messages)
            messages.remove(batch)
            after = replace(state, messages=tuple(messages))
            if state.freezes:
                # Fetched from the broker, then the worker dies before reading it: the
                # message is gone with it (kombu's Redis transport pops it first).
                yield (
                    f"w{index} fetches a message for {batch} and dies",
                    replace(
                        after,
                        freezes=state.freezes - 1,
                        workers=_set_worker(state, index, Worker(False, None, killed=True)),
                    ),
                )
            version = _version(state, batch)
            claimable = (
                version is not None
                and _holder(state, batch) is None
                and batch not in state.schedule
            )
            superseded = state.pending is not None and state.locked_by == batch
            if claimable and batch == HOST:
                yield from _claim_host(after, index, superseded, rules)
            elif claimable and (superseded or version == 0):
                yield f"w{index} claims {batch}: empty", _end_batch(after, batch)
            elif claimable:
                token = state.next_token
                for phase in ("c", "f") if rules.claim_fences else ("c",):
                    yield (
                        f"w{index} claims {batch}" + (" and fences it" if phase == "f" else ""),
                        replace(
                            after,
                            claims=state.claims | {(batch, token, index)},
                            next_token=token + 1,
                            workers=_set_worker(
                                state, index, Worker(True, (batch, token, phase, ""))
                            ),
                        ),
                    )
            else:
                yield f"w{index} drops a message for {batch}", after
        return
    batch, token, phase, outcome = worker.job
    held = _holder(state, batch) == (token, index)
    idle = _set_worker(state, index, Worker(True, None))
    if phase == "c" and batch == HOST:
        yield from _top_up_before_send(state, index, held, rules)
    if phase == "f" and not held and rules.fenced_deadline:
        # Fenced by its claim, then frozen until the claim was taken: the exchange's
        # deadline has passed, no byte goes; the error's give-back finds the claim gone.
        yield f"w{index} past its deadline: {batch} not sent", replace(state, workers=idle)
        return
    if phase in ("c", "f"):  # fence_batch.lua (or the claim's fence), then the first byte
        if phase == "c" and rules.fence and not held:
            yield f"w{index} fence refuses {batch}", replace(state, workers=idle)
            return
        version = _version(state, batch)
        assert version is not None or not rules.checked_finish
        violation = state.violation
        if not held:
            violation = violation or f"w{index} sent {batch} without a live claim"
        if state.braze is not None and version and version < state.braze:
            violation = violation or f"w{index} sent state {version} after {state.braze}"
        if _send_status(state, batch) in ("inflight", "done"):
            violation = violation or f"{batch} sent again though its outcome was known"
        if state.erased_token and token < state.erased_token and phase == "c":
            violation = violation or f"w{index} sent the identifier after forget returned"
        for result in ("ok", "fail") if state.failures else ("ok",):
            yield (
                f"w{index} sends {batch} ({result})",
                replace(
                    state,
                    braze=version if version else state.braze,
                    sends=_with_send(state, batch, "inflight"),
                    failures=state.failures - (result == "fail"),
                    workers=_set_worker(state, index, Worker(True, (batch, token, "s", result))),
                    violation=violation,
                ),
            )
        return
    if phase == "b":  # the bookkeeping after the outcome was recorded (when it may fail)
        yield f"w{index} bookkeeping of {batch}", replace(state, workers=idle)
        if state.crashes:
            # Logged; the error handler's give-back finds the claim ended or deferred
            # already (defer_batch.lua answers "lost"): nothing changes.
            yield (
                f"w{index} bookkeeping of {batch} fails",
                replace(state, crashes=state.crashes - 1, workers=idle),
            )
        return
    # phase "s": act on the answer with finish_batch.lua / defer_batch.lua
    may = held or (not rules.checked_finish and _holder(state, batch) is None)
    if not may:
        yield f"w{index} lost {batch}: reports nothing", replace(state, workers=idle)
        return
    # The bookkeeping is a step of its own only while it may still fail.
    after_outcome = (
        _set_worker(state, index, Worker(True, (batch, token, "b", outcome)))
        if state.crashes
        else idle
    )
    if state.crashes and held:
        # An error of the worker between the answer and the record of its outcome: the
        # batch goes back into the schedule (poster._give_back_after_error).
        known = outcome == "ok" and not rules.outcome_first
        yield (
            f"w{index} fails after the answer, gives {batch} back",
            replace(
                state,
                crashes=state.crashes - 1,
                claims=frozenset(c for c in state.claims if c[0] != batch),
                schedule=state.schedule | {batch},
                # As built, the answer was not read yet: its outcome is unknown, and the
                # give-back counts the attempt. As it was, the bookkeeping that failed came
                # after a 201 had been read: Braze's acceptance was known and thrown away.
                sends=_with_send(state, batch, "done" if known else "unknown"),
                workers=idle,
            ),
        )
    if outcome == "ok":
        ended = _end_batch(state, batch)
        yield (
            f"w{index} finishes {batch}",
            replace(
                ended,
                workers=after_outcome if rules.outcome_first else idle,
                sends=_with_send(state, batch, "done"),
            ),
        )
    else:
        yield (
            f"w{index} defers {batch}",
            replace(
                state,
                claims=frozenset(c for c in state.claims if c[0] != batch),
                schedule=state.schedule | {batch},
                sends=_with_send(state, batch, "failed"),
                workers=after_outcome if rules.outcome_first else idle,
            ),
        )


def _claim_host(
    state: State, index: int, superseded: bool, rules: Rules
) -> Iterator[tuple[str, State]]:
    """claim_batch.lua on the host batch: it keeps its other identifiers, so it is never
    empty. A newer change supersedes the identifier in it (it leaves, its lock goes). Then,
    since the host lost members (the model lets it have lost some at every claim), the
    top-up may take the identifier's due change: only if no batch locks it (or, with the
    rule switched off, whatever locks it). It may also not (another state, not due yet, or
    the batch full): both are explored."""
    token = state.next_token
    version = _version(state, HOST) or 0
    locked_by = state.locked_by
    if superseded:
        version, locked_by = 0, None
    claimed = replace(
        state,
        batches=frozenset(b for b in state.batches if b[0] != HOST) | {(HOST, version)},
        locked_by=locked_by,
        claims=state.claims | {(HOST, token, index)},
        next_token=token + 1,
        workers=_set_worker(state, index, Worker(True, (HOST, token, "c", ""))),
    )
    claims = [(f"w{index} claims {HOST}", claimed)]
    claims += _absorbs(claimed, f"w{index} claims {HOST}", rules)
    takeable = locked_by is None or not rules.top_up_checks_lock
    if state.pending is not None and takeable and version == 0:
        claims.append(
            (
                f"w{index} claims {HOST}, topped up with {state.pending}",
                replace(
                    claimed,
                    batches=frozenset(b for b in state.batches if b[0] != HOST)
                    | {(HOST, state.pending)},
                    locked_by=HOST,
                    pending=None,
                ),
            )
        )
    fenced = _set_worker(state, index, Worker(True, (HOST, token, "f", "")))
    for name, following in claims:
        yield name, following
        if rules.claim_fences:
            # Fenced by the claim too (its top-up just looked: none comes before the send).
            yield f"{name}, and fenced", replace(following, workers=fenced)


def _top_up_before_send(
    state: State, index: int, held: bool, rules: Rules
) -> Iterator[tuple[str, State]]:
    """top_up_batch.lua on the host, between its claim and its fence (the worker waited for
    its turn meanwhile): it may take the identifier's due change, as the claim's top-up
    does (only if no batch locks it), and only while this worker still holds the host.
    Whether it does or not (nothing due of its kind yet), the fence comes next."""
    if rules.send_top_up_checks_claim and not held:
        return  # the script answers "lost": nothing written
    yield from _absorbs(state, f"w{index} before sending {HOST}", rules)
    takeable = state.locked_by is None or not rules.top_up_checks_lock
    if state.pending is not None and takeable and _version(state, HOST) == 0:
        yield (
            f"w{index} tops {HOST} up with {state.pending} before sending",
            replace(
                state,
                batches=frozenset(b for b in state.batches if b[0] != HOST)
                | {(HOST, state.pending)},
                locked_by=HOST,
                pending=None,
            ),
        )


def _absorbs(state: State, step: str, rules: Rules) -> Iterator[tuple[str, State]]:
    """_prelude.lua `absorb`, in a claim of the host or right before its send: the host
    takes in the identifier's member of another batch of its kind (short or full: absorb
    weighs each member on its own) with its lock, if no one holds that batch, it does not
    wait in the schedule and that member was not superseded (no newer change pending);
    the batch left without members ends, its messages find it gone. (A batch that keeps
    other identifiers is the host's case: this model's one identifier is all it holds.)"""
    if _version(state, HOST) != 0:
        return
    for batch, version in sorted(state.batches):
        if batch == HOST or not version or state.locked_by != batch:
            continue
        if state.pending is not None or batch in state.schedule:
            continue
        if _holder(state, batch) is not None:
            continue
        yield (
            f"{step}, absorbing {batch}",
            replace(
                state,
                batches=frozenset(b for b in state.batches if b[0] not in (HOST, batch))
                | {(HOST, version)},
                locked_by=HOST,
            ),
        )


def finished(state: State) -> bool:
    return not state.batches and state.pending is None and state.written == state.writes


def settled(state: State) -> bool:
    """The end every run must reach: the newest state delivered, or the identifier erased
    (then nothing more is owed it; a change enqueued after `forget` is delivered)."""
    newest = NEW + state.writes - 1
    return finished(state) and (state.braze == newest or state.erased_token > 0)


def explore(
    rules: Rules,
    *,
    freezes: int = 2,
    crashes: int = 0,
    forget: bool = False,
    writes: int = 1,
    host: bool = False,
    sweeps: int = 2,
) -> tuple[int, list[str] | None]:
    """Visit every reachable state; return how many, and a run to the first violation (or
    to a state that can go no further without having delivered the newest state)."""
    first = start(
        freezes=freezes, crashes=crashes, forget=forget, writes=writes, host=host, sweeps=sweeps
    )
    parents: dict[State, tuple[State, str] | None] = {first: None}
    stack = [first]

    def path(state: State) -> list[str]:
        names = []
        while (link := parents[state]) is not None:
            state, name = link
            names.append(name)
        return names[::-1]

    while stack:
        state = stack.pop()
        if state.violation:
            return len(parents), [*path(state), state.violation]
        moves = list(steps(state, rules))
        progress = [m for m in moves if "freezes" not in m[0]]
        if not progress and not settled(state):
            return len(parents), [*path(state), f"stuck: {state}"]
        for name, following in moves:
            if following not in parents:
                parents[following] = (state, name)
                stack.append(following)
    return len(parents), None


def test_no_interleaving_sends_without_a_live_claim_or_a_stale_state():
    visited, counterexample = explore(Rules())
    assert counterexample is None, "\n".join(counterexample)
    assert visited > 10_000  # the interleavings were explored, not a handful


@pytest.mark.parametrize(
    "rules",
    [
        Rules(fence=False, checked_finish=False, take_back_live=True),  # as it was
        Rules(fence=False),  # a take-back is safe only with the fence before the send
        Rules(take_back_live=True, fence=False),
    ],
    ids=["old-protocol", "no-fence", "lease-only-no-fence"],
)
def test_the_checker_finds_the_stale_state_without_fencing(rules):
    _visited, counterexample = explore(rules)
    assert counterexample is not None
    assert "without a live claim" in counterexample[-1] or "after" in counterexample[-1]


def test_a_crash_between_answer_outcome_and_bookkeeping_never_re_sends_a_known_outcome():
    """Issue 21 item 4, as built: a worker error after the answer arrived, before or after
    its outcome was recorded, with a freeze and a failed request anywhere around it."""
    visited, counterexample = explore(Rules(), freezes=1, crashes=1)
    assert counterexample is None, "\n".join(counterexample)
    assert visited > 1_000


def test_the_checker_finds_the_re_send_when_bookkeeping_came_before_the_outcome():
    """Issue 21 item 4, as it was: bookkeeping that failed before the outcome of a 201 was
    recorded gave the batch back, and it was posted again (a double opt-in text each time)."""
    _visited, counterexample = explore(Rules(outcome_first=False), freezes=1, crashes=1)
    assert counterexample is not None
    assert "sent again though its outcome was known" in counterexample[-1]
    assert any("fails after the answer" in step for step in counterexample)


def test_forget_while_a_batch_is_claimed_never_lets_it_send_the_identifier():
    """Issue 21 item 6: `forget` at any point — a batch claimed and waiting for its turn,
    on the wire, waiting in the schedule, pending — with freezes and a failed request
    around it: no request that a worker read before the erasure is sent after it."""
    visited, counterexample = explore(Rules(), freezes=1, forget=True)
    assert counterexample is None, "\n".join(counterexample)
    assert visited > 1_000


def test_the_checker_finds_the_send_after_forget_when_claims_are_left_alone():
    """As it was: forget removed the identifier from the record, but a worker that had read
    it already still held its claim, passed the fence and sent it."""
    _visited, counterexample = explore(Rules(forget_ends_claims=False), freezes=1, forget=True)
    assert counterexample is not None
    assert "sent the identifier after forget returned" in counterexample[-1]


def test_a_top_up_at_claim_never_sends_a_stale_state():
    """Issue 26: a batch of other identifiers that lost members at its claim takes the
    identifier's due change in the same step. Two newer states are written, so the host
    may carry one and lose it to the next (and take that one in again), with a failed
    request and the sweep around it: no stale state, no send without a claim, no re-send
    of a known outcome, and the newest state always arrives."""
    visited, counterexample = explore(Rules(), freezes=0, writes=2, host=True)
    assert counterexample is None, "\n".join(counterexample)
    assert visited > 10_000


def test_a_top_up_at_claim_with_a_frozen_or_killed_worker_never_sends_a_stale_state():
    """The same with one freeze, kill or lost message anywhere (take-backs, the fence)."""
    visited, counterexample = explore(Rules(), freezes=1, writes=1, host=True, sweeps=0)
    assert counterexample is None, "\n".join(counterexample)
    assert visited > 10_000


def test_a_top_up_at_claim_with_forget_never_sends_the_identifier_after_it():
    visited, counterexample = explore(Rules(), freezes=0, forget=True, host=True, sweeps=0)
    assert counterexample is None, "\n".join(counterexample)
    assert visited > 1_000


def test_the_checker_finds_the_stale_state_when_a_top_up_ignores_the_lock():
    """A top-up that took the newer change while a batch still locked the identifier (its
    older state not yet sent) would let the two batches race: the older lands last."""
    _visited, counterexample = explore(
        Rules(top_up_checks_lock=False), freezes=0, writes=1, host=True
    )
    assert counterexample is not None
    assert "after" in counterexample[-1]
    # at the claim or right before the send: both take by the same rules
    assert any("topped up" in step or "tops" in step for step in counterexample)


def test_the_checker_finds_the_lost_change_when_the_second_top_up_ignores_the_claim():
    """A worker that lost the host (frozen past its lease; taken back and sent by another)
    and took the identifier's change into it before its fence refused: the change rides
    in a batch already answered, ends with it, and never reaches Braze."""
    _visited, counterexample = explore(
        Rules(send_top_up_checks_claim=False), freezes=1, writes=1, host=True, sweeps=0
    )
    assert counterexample is not None
    assert any("before sending" in step for step in counterexample)


def test_absorbing_a_short_batch_never_sends_a_stale_state():
    """Issue 26: the host takes in the identifier's own batch (no one has claimed it) at
    its claim or right before its send, with a newer state written meanwhile, a failed
    request and the sweep around it; then with a freeze anywhere."""
    visited, counterexample = explore(Rules(), freezes=0, writes=2, host=True)
    assert counterexample is None, "\n".join(counterexample)
    assert any("absorbing" in name for name in _step_names(Rules(), writes=2))  # reachable
    visited, counterexample = explore(Rules(), freezes=1, writes=1, host=True, sweeps=0)
    assert counterexample is None, "\n".join(counterexample)
    assert visited > 10_000


@pytest.mark.parametrize(
    "options",
    [
        {"freezes": 1},
        {"freezes": 1, "forget": True},
        {"freezes": 0, "writes": 2, "host": True},
        {"freezes": 1, "host": True, "sweeps": 0},
    ],
    ids=["a freeze", "forget", "top-ups", "top-ups-frozen"],
)
def test_a_claim_that_fences_never_sends_without_a_live_claim_or_a_stale_state(options):
    """Issue 26, the eighth step: any claim may fence its batch too (its turn for now),
    the request a step after it, a worker freezing (or killed) between the two; with a
    failed request, the sweep, forget, top-ups and absorbs around it: no send without a
    live claim (the deadline), no stale state, no re-send of a known outcome, and the
    newest state arrives."""
    visited, counterexample = explore(Rules(claim_fences=True), **options)
    assert counterexample is None, "\n".join(counterexample)
    assert visited > 1_000


def test_the_checker_finds_the_stale_state_when_a_claims_fence_has_no_deadline():
    """A request its claim fenced that goes whenever its worker thaws (its exchange's
    deadline counted from the send, not from before the claim): the batch was taken back
    from the frozen worker and sent newer meanwhile; the older state lands after it."""
    _visited, counterexample = explore(Rules(claim_fences=True, fenced_deadline=False), freezes=1)
    assert counterexample is not None
    assert "without a live claim" in counterexample[-1] or "after" in counterexample[-1]
    assert any("fences" in step for step in counterexample)


def _step_names(rules: Rules, **kwargs: int) -> set[str]:
    """Every step name of every reachable state (to see a step is reachable at all)."""
    first = start(host=True, freezes=0, **kwargs)
    seen, stack, names = {first}, [first], set()
    while stack:
        for name, following in steps(stack.pop(), rules):
            names.add(name)
            if following not in seen:
                seen.add(following)
                stack.append(following)
    return names
