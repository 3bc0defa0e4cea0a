"""The read budget keeps the write budget's promises, against the simulator's read limit over
real HTTP: a 429 pauses every reader (and not posting), Braze's X-RateLimit-Remaining is
obeyed, no window over the limit; and the older 0/1/null answers read right."""

from __future__ import annotations

import httpx
import pytest

from config.settings import load_settings
from delivery.braze_reads import BrazeReader, ReadDeferred, ReadState, read_limiter
from delivery.services import services
from stores.limiter import Budget
from tests.sim_control import set_in_braze


def faults(url: str, **switches: object) -> None:
    httpx.post(f"{url}/_sim/faults", json=switches).raise_for_status()


def read_stats(url: str) -> dict[str, int]:
    return httpx.get(f"{url}/_sim/stats", params={"log": "0"}).json()["reads"]


def another_process_reader() -> BrazeReader:
    """A reader as a worker in another process builds it: same workspace, same budget key."""
    found = services()
    limiter = read_limiter(
        found.settings,
        found.redis,
        found.keys.read_limiter(found.settings.workspace_id),
        max_wait_seconds=found.settings.token_wait_max_seconds,
    )
    return BrazeReader(found.braze, limiter, max_wait_seconds=1.0)


def test_a_429_pauses_every_reader_until_the_reset_and_not_posting(env, sim):
    found = services()
    reader = found.reader(max_wait_seconds=1.0)
    reader.statuses("news", "external_id", ["a"])  # Braze: plenty left this hour
    faults(sim.url, read_spend=250_000)  # then another client spends the rest
    with pytest.raises(ReadDeferred):
        reader.statuses("news", "external_id", ["c"])  # 429: the window is spent
    assert read_stats(sim.url)["rate_limited_429"] == 1
    assert found.read_limiter.state().paused_until_ms is not None
    assert found.limiter.state().paused_until_ms is None  # posting is not paused

    sent = read_stats(sim.url)["requests_total"]
    with pytest.raises(ReadDeferred):
        another_process_reader().statuses("news", "external_id", ["d"])
    assert read_stats(sim.url)["requests_total"] == sent  # it waited without asking


def test_reads_yield_when_braze_says_another_client_spent_the_hour(env, sim):
    faults(sim.url, read_spend=249_990)  # a foreign client of the workspace
    found = services()
    found.reader(max_wait_seconds=1.0).statuses("news", "external_id", ["a"])
    assert found.read_limiter.state().tokens_left == 0
    with pytest.raises(ReadDeferred):
        another_process_reader().statuses("news", "external_id", ["b"])
    assert read_stats(sim.url)["rate_limited_429"] == 0


def test_no_window_of_the_default_read_budget_holds_more_than_the_limit():
    settings = load_settings()
    budget = Budget.for_limit(
        settings.braze_read_rate_limit,
        settings.braze_read_rate_limit_window_seconds,
        headroom=settings.rate_limit_headroom,
        burst_fraction=settings.rate_limit_burst_fraction,
    )
    assert (settings.braze_read_rate_limit, settings.braze_read_rate_limit_window_seconds) == (
        250_000,
        3600,
    )
    assert budget.max_per_window <= 0.98 * 250_000


def test_the_older_answer_form_reads_the_same(env, sim):
    faults(sim.url, legacy_reads=True)
    set_in_braze(sim.url, "news", "unsubscribed", ["a"], kind="external_id")
    set_in_braze(sim.url, "news", "subscribed", ["b"], kind="external_id")
    states = (
        services().reader(max_wait_seconds=None).statuses("news", "external_id", ["a", "b", "c"])
    )
    assert states == {
        "a": ReadState.UNSUBSCRIBED,
        "b": ReadState.SUBSCRIBED,
        "c": ReadState.UNKNOWN,
    }


def test_more_than_100_identifiers_are_never_sent(env, sim):
    with pytest.raises(ValueError):
        services().reader(max_wait_seconds=None).statuses(
            "news", "external_id", [str(n) for n in range(101)]
        )
    assert read_stats(sim.url)["requests_total"] == 0
