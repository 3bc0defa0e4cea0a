"""Never re-subscribing someone who opted out in Braze: `import --respect-opt-outs` with real
worker and beat processes, identifiers unsubscribed "in Braze" behind braze-subs' back."""

from __future__ import annotations

import json

import httpx
import pytest

from delivery.services import services
from tests.cli_runs import run_real
from tests.conftest import drained, wait_for
from tests.sim_control import braze_states, set_in_braze

pytestmark = pytest.mark.slow


def read_calls(url: str) -> int:
    stats = httpx.get(f"{url}/_sim/stats", params={"log": "0"}).json()
    return int(stats["reads"]["requests_total"])


def test_a_backfill_leaves_the_opt_outs_made_in_braze_alone(env, sim, processes, tmp_path):
    emails = [f"user{n}@example.com" for n in range(10_000)]
    opted_out = emails[7::20]  # 500 of them, spread over every batch
    set_in_braze(sim.url, "news", "unsubscribed", opted_out)
    reads_before = read_calls(sim.url)

    file = tmp_path / "backfill.jsonl"
    file.write_text(
        "".join(
            json.dumps(
                {"subscription_group_id": "news", "subscription_state": "subscribed", "email": e}
            )
            + "\n"
            for e in emails
        )
    )
    worker = processes.worker("w1", concurrency=8)
    processes.beat()
    result = run_real("import", str(file), "--respect-opt-outs")
    assert result.returncode == 0, result.stderr
    wait_for(drained, timeout=120, what="the backfill to be delivered")

    states = braze_states(sim.url, "news")
    assert {e for e in emails if states.get(e) == "unsubscribed"} == set(opted_out)
    assert sum(1 for e in emails if states.get(e) == "subscribed") == 9_500
    # One read per two batches (100 identifiers): 10,000 in batches of 50 is 100 reads. A
    # batch reads alone when no partner is there to read along: a tick cut the stream at a
    # partial batch, or the one partner in sight was being read by another thread (seen
    # once under CI's load: 102 reads for 200 posts). A few such, not one read per batch.
    stats = httpx.get(f"{sim.url}/_sim/stats").json()
    posts = [r for r in stats["requests"] if r["status"] == 201]
    reads = read_calls(sim.url) - reads_before
    print(f"{reads} reads, {len(posts)} posts for 10,000 identifiers")
    assert reads <= -(-len(posts) // 2) + 6
    assert reads <= 106
    status = json.loads(run_real("status", "--json").stdout)
    assert status["opt_out_skipped"] == 500
    log = worker.log()
    assert "unsubscribed in Braze: u***@example.com" in log  # logged, masked
    assert not any(email in log for email in opted_out)


def test_a_later_unsubscribed_still_wins_and_unknowns_are_subscribed(env, sim, processes):
    from tasks.producer import enqueue_changes

    set_in_braze(sim.url, "news", "unsubscribed", ["out@example.com"])
    processes.worker("w1", concurrency=4)
    processes.beat()
    rows = [
        {
            "subscription_group_id": "news",
            "subscription_state": "subscribed",
            "email": email,
            "respect_opt_out": True,
        }
        for email in ("out@example.com", "new@example.com", "flip@example.com")
    ]
    later = {
        "subscription_group_id": "news",
        "subscription_state": "unsubscribed",
        "email": "flip@example.com",
    }
    enqueue_changes(rows)
    enqueue_changes([later])
    wait_for(drained, timeout=60, what="the changes to be delivered")
    assert braze_states(sim.url, "news") == {
        "out@example.com": "unsubscribed",  # opted out in Braze: left alone
        "new@example.com": "subscribed",  # unknown to Braze: subscribed as usual
        "flip@example.com": "unsubscribed",  # the later change wins
    }
    assert services().redis.hget(services().keys.stats, "opt_out_skipped") == b"1"
