"""A worker never starts while work waits where no worker would look (issue 23): in the key
space of a workspace BRAZE_WORKSPACES_FILE does not serve — a deployment moved to the file
without naming its workspace `default`, or a workspace taken out of the file before it
drained. It stops in one line naming the workspace and what it holds; put back in the file,
the workspace drains (stores/served.py, `tasks/celery_app.py _refuse_stranded_work`)."""

from __future__ import annotations

import json

import pytest
from redis import Redis

from config.settings import get_settings
from core.changes import parse_change
from devtools.processes import worker_args
from stores.buffer import Buffer
from stores.history import Retention
from stores.keys import Keys
from stores.scripts import Scripts
from stores.served import record_served, stranded_work
from tests.conftest import wait_for
from tests.sim_control import sim_states

pytestmark = pytest.mark.slow

UNSUBSCRIBE = {
    "subscription_group_id": "newsletter",
    "subscription_state": "unsubscribed",
    "email": "jane@example.com",
}


def enqueue_in(workspace: str, row: dict[str, str]) -> None:
    """Enqueue as a worker-less deployment serving `workspace` would (its own key space)."""
    settings = get_settings()
    client = Redis.from_url(settings.redis_url)
    buffer = Buffer(
        client,
        Keys(settings.redis_key_prefix, workspace),
        Scripts(client),
        Retention.from_settings(settings),
    )
    buffer.enqueue([parse_change(row)])


def stopped_with_one_line(worker) -> str:  # type: ignore[no-untyped-def]
    wait_for(lambda: not worker.alive(), timeout=60, what="the worker to stop")
    log = worker.log()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "does not serve" in line]
    assert len(lines) == 1, log[-2000:]
    return lines[0]


def test_a_deployment_moved_to_the_file_without_default_is_refused_until_named(
    workspaces_env, processes, redis_client
):
    """An unsubscribe pending from before the file (the `{prefix}` key space): a worker
    serving only `us` and `eu` stops naming `default`; with a `[workspaces.default]` table
    added, as the README's migration says, it starts and delivers it."""
    enqueue_in("default", UNSUBSCRIBE)
    worker = processes.start("worker", "w1", worker_args("w1"))
    line = stopped_with_one_line(worker)
    assert "workspace 'default' (1 pending changes)" in line
    assert "jane" not in line
    # Nothing was taken or recorded as served: the change still waits where it was.
    assert redis_client.hlen(Keys(get_settings().redis_key_prefix).pending) == 1

    sim = workspaces_env.sims["us"]
    with workspaces_env.file.open("a") as out:
        out.write(
            f"\n[workspaces.default]\nrest_endpoint = {json.dumps(sim.url)}\n"
            'api_key_env = "BRAZE_KEY_US"\n'
        )
    processes.worker("w2")
    processes.beat()
    wait_for(
        lambda: sim_states(sim).get(("newsletter", "email", "jane@example.com")) == "unsubscribed",
        timeout=60,
        what="the change of before the file to reach Braze",
    )


def test_a_workspace_taken_out_before_it_drained_is_refused_until_put_back(
    workspaces_env, processes, redis_client
):
    """`eu` was served (a worker started with it), then left the file with a change still
    pending: the next worker stops naming `eu`; with `eu` back it starts and delivers."""
    prefix = get_settings().redis_key_prefix
    record_served(redis_client, prefix, ("us", "eu"))
    enqueue_in("eu", {**UNSUBSCRIBE, "subscription_group_id": "eu-email"})
    full = workspaces_env.file.read_text()
    workspaces_env.file.write_text(full.split("[workspaces.eu]")[0])
    worker = processes.start("worker", "w1", worker_args("w1"))
    assert "workspace 'eu' (1 pending changes)" in stopped_with_one_line(worker)

    workspaces_env.file.write_text(full)
    processes.worker("w2")
    processes.beat()
    wait_for(
        lambda: (
            sim_states(workspaces_env.sims["eu"]).get(("eu-email", "email", "jane@example.com"))
            == "unsubscribed"
        ),
        timeout=60,
        what="eu's change to reach Braze once eu is served again",
    )
    # Drained and served: nothing stranded any more, and a file without eu is accepted.
    wait_for(lambda: not stranded_work(redis_client, prefix, ("us",)), what="eu drained")


def test_an_empty_key_space_no_longer_served_is_forgotten(env, redis_client):
    """Cheap by construction: a served workspace whose key space is empty is dropped from
    the set once it leaves the file, so the start's check reads only what may hold work."""
    prefix = get_settings().redis_key_prefix
    record_served(redis_client, prefix, ("us", "eu"))
    assert stranded_work(redis_client, prefix, ("us",)) == []
    served = Keys(prefix).served_workspaces
    assert {name.decode() for name in redis_client.smembers(served)} == {"us"}
    # A dead letter alone is work too (it would never be replayed or purged otherwise).
    redis_client.hset(Keys(prefix, "us").dead_letters, "entry", "{}")
    found = stranded_work(redis_client, prefix, ("eu",))
    assert [(entry.workspace, entry.dead_letters) for entry in found] == [("us", 1)]
