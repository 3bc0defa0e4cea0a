"""Memory of the simulator's applied-states log (the order oracle), per applied record.

Applies 100,000 identifier updates in posts of 50, once over 100,000 distinct identifiers
(one record each) and once over 10,000 identifiers changed 10 times each, and prints the
bytes the log holds per record (tracemalloc; the subscriptions themselves excluded by
measuring against a state with recording capped at zero).

    .venv/bin/python -m bench.sim_applied_memory
"""

from __future__ import annotations

import tracemalloc

from simulator import SimulatorConfig, SimulatorState
from simulator.model import SUBSCRIPTION_STATES, UpdateList, ValidatedRequest
from simulator.state import Outcome, RequestRecord

UPDATES = 100_000
PER_POST = 50


def posts(distinct: int) -> list[ValidatedRequest]:
    requests = []
    for start in range(0, UPDATES, PER_POST):
        values = tuple(f"user-{i % distinct:08}" for i in range(start, start + PER_POST))
        state = SUBSCRIPTION_STATES[(start // distinct) % 2]  # one state a post, as posted
        update_list = UpdateList("group-1", state, "external_id", values, False)
        requests.append(ValidatedRequest((update_list,), PER_POST, 1))
    return requests


def measure(distinct: int, limit: int | None) -> int:
    requests = posts(distinct)
    tracemalloc.start()
    state = SimulatorState(SimulatorConfig(auto_groups=True, applied_log_limit=limit))
    before = tracemalloc.get_traced_memory()[0]
    for n, request in enumerate(requests):
        record = RequestRecord(float(n), "v1", PER_POST, 1, 201)
        state.finish(record, Outcome.OK, request)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used


def main() -> None:
    for distinct in (UPDATES, UPDATES // 10):
        with_log = measure(distinct, None)
        without = measure(distinct, 0)
        per_record = (with_log - without) / UPDATES
        print(
            f"{UPDATES:,} updates over {distinct:,} identifiers: applied log "
            f"{(with_log - without) / 1e6:.1f} MB, {per_record:.0f} bytes per applied record"
        )


if __name__ == "__main__":
    main()
