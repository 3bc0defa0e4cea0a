"""Several workspaces (issue 23), every way in, on a real Redis: each change lands in its
workspace's key space (routing: its `workspace`, else its group's in BRAZE_WORKSPACES_FILE,
else the only one), and a change that fits no workspace is refused at the door with
nothing written anywhere. `workspaces_env`: `us` owns us-email/us-sms, `eu` eu-email/eu-sms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from config.settings import get_settings
from stores.keys import Keys
from tasks.producer import ChangesRejected, enqueue_change, enqueue_changes
from tests.api_process import running_api
from tests.cli_runs import assert_one_line_error, run_cli

STATE = "subscribed"


def row(group: str, value: str, **fields: Any) -> dict[str, Any]:
    return {"subscription_group_id": group, "subscription_state": STATE, "email": value, **fields}


def pending(client: Redis, workspace: str) -> dict[str, str]:
    """value -> group of what waits in `workspace`'s buffer."""
    keys = Keys(get_settings().redis_key_prefix, workspace)
    found = {}
    for field in client.hkeys(keys.pending):
        group, _kind, value = field.decode().split("\x1f")
        found[value] = group
    return found


def nothing_enqueued(client: Redis) -> None:
    """No change, sequence number or counter in any key space."""
    names = [name.decode() for name in client.scan_iter(count=1000)]
    written = [n for n in names if not n.endswith(":api:requests")]
    assert written == [], written


def test_the_producer_api_routes_by_name_then_group(workspaces_env, redis_client):
    enqueue_change(subscription_group_id="us-email", subscription_state=STATE, email="a@x.io")
    enqueue_change(subscription_group_id="eu-email", subscription_state=STATE, email="b@x.io")
    # A group the file gives to no workspace, named: it goes where it is told.
    enqueue_change(
        subscription_group_id="new-group", subscription_state=STATE, email="c@x.io", workspace="eu"
    )
    assert pending(redis_client, "us") == {"a@x.io": "us-email"}
    assert pending(redis_client, "eu") == {"b@x.io": "eu-email", "c@x.io": "new-group"}
    assert redis_client.hlen(Keys(get_settings().redis_key_prefix).pending) == 0


def test_enqueue_changes_splits_by_workspace_keeping_order(workspaces_env, redis_client):
    items = [
        row("us-email", "a@x.io"),
        row("eu-email", "a@x.io"),
        {**row("us-email", "a@x.io"), "subscription_state": "unsubscribed"},
        row("eu-sms", "b@x.io", workspace="eu"),
        {**row("eu-email", "a@x.io"), "subscription_state": "unsubscribed"},
        row("us-email", "a@x.io"),
    ]
    assert enqueue_changes(items) == 6
    prefix = get_settings().redis_key_prefix
    for workspace in ("us", "eu"):
        keys = Keys(prefix, workspace)
        stored = json.loads(
            redis_client.hget(keys.pending, "\x1f".join((f"{workspace}-email", "email", "a@x.io")))
        )
        # Later items win within each workspace: us ends subscribed, eu unsubscribed.
        assert stored["s"] == ("subscribed" if workspace == "us" else "unsubscribed"), stored
        assert int(redis_client.hget(keys.stats, "enqueued")) == 3


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (row("lost-group", "a@x.io"), "subscription_group_id", "group 'lost-group' belongs to no"),
        (row("us-email", "a@x.io", workspace="apac"), "workspace", "'apac'"),
        (row("us-email", "a@x.io", workspace="eu"), "workspace", "belongs to workspace 'us'"),
    ],
)
def test_a_change_that_fits_no_workspace_is_refused_with_nothing_written(
    workspaces_env, redis_client, change, field, says
):
    good = [row("us-email", "ok@x.io"), row("eu-email", "ok@x.io")]
    with pytest.raises(ChangesRejected) as caught:
        enqueue_changes([*good, change])
    ((index, error),) = caught.value.errors
    assert index == 2 and error.field == field and says in error.message
    with pytest.raises(ValueError, match=field):
        enqueue_change(**change)
    nothing_enqueued(redis_client)


def test_record_change_takes_the_workspace_kwarg(workspaces_env, redis_client):
    from tasks.subscriptions import ChangeRefused, record_change

    record_change.run(**row("new-group", "a@x.io", workspace="us"))
    record_change.run(**row("eu-sms", "b@x.io"))
    assert pending(redis_client, "us") == {"a@x.io": "new-group"}
    assert pending(redis_client, "eu") == {"b@x.io": "eu-sms"}
    with pytest.raises(ChangeRefused, match="group 'lost' belongs to no workspace"):
        record_change.run(**row("lost", "c@x.io"))
    assert "c@x.io" not in pending(redis_client, "us") | pending(redis_client, "eu")


def test_cli_enqueue_workspace(workspaces_env, redis_client):
    base = ["enqueue", "--state", STATE]
    assert run_cli(*base, "--group", "us-sms", "--email", "a@x.io").returncode == 0
    done = run_cli(*base, "--group", "new", "--email", "b@x.io", "--workspace", "eu")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "enqueued: new subscribed (email) (workspace eu)"
    assert pending(redis_client, "us") == {"a@x.io": "us-sms"}
    assert pending(redis_client, "eu") == {"b@x.io": "new"}
    refused = run_cli(*base, "--group", "lost", "--email", "c@x.io")
    assert_one_line_error(refused, "subscription_group_id", "group 'lost' belongs to no workspace")
    assert "c@x.io" not in pending(redis_client, "us") | pending(redis_client, "eu")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_import_routes_each_row_by_column_option_and_group(
    workspaces_env, redis_client, tmp_path
):
    rows = [
        row("us-email", "a@x.io"),
        row("eu-email", "b@x.io"),
        row("new", "c@x.io", workspace="us"),
        row("new", "d@x.io"),  # --workspace eu decides
        row("us-sms", "e@x.io"),  # its group's workspace before --workspace
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    done = run_cli("import", str(path), "--workspace", "eu")
    assert done.returncode == 0, done.stderr
    assert "5 changes enqueued (us 3, eu 2)" in done.stderr
    assert pending(redis_client, "us") == {
        "a@x.io": "us-email",
        "c@x.io": "new",
        "e@x.io": "us-sms",
    }
    assert pending(redis_client, "eu") == {"b@x.io": "eu-email", "d@x.io": "new"}


def test_cli_import_csv_workspace_column(workspaces_env, redis_client, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(
        "subscription_group_id,subscription_state,email,workspace\n"
        f"new,{STATE},a@x.io,eu\n"
        f"us-sms,{STATE},b@x.io,\n"
    )
    done = run_cli("import", str(path))
    assert done.returncode == 0, done.stderr
    assert pending(redis_client, "eu") == {"a@x.io": "new"}
    assert pending(redis_client, "us") == {"b@x.io": "us-sms"}


def test_cli_import_with_an_unroutable_row_enqueues_nothing(workspaces_env, redis_client, tmp_path):
    rows = [
        row("us-email", "a@x.io"),
        row("lost", "b@x.io"),
        row("eu-email", "c@x.io", workspace="us"),
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    done = run_cli("import", str(path))
    assert done.returncode == 1
    assert "line 2: subscription_group_id: group 'lost' belongs to no workspace" in done.stderr
    assert "line 3: workspace: group 'eu-email' belongs to workspace 'eu'" in done.stderr
    nothing_enqueued(redis_client)
    unknown = run_cli("import", str(path), "--workspace", "apac")
    assert_one_line_error(unknown, "--workspace", "'apac'")
    nothing_enqueued(redis_client)


def test_cli_import_skip_invalid_enqueues_the_routable_rows(workspaces_env, redis_client, tmp_path):
    rows = [row("us-email", "a@x.io"), row("lost", "b@x.io"), row("eu-email", "c@x.io")]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    done = run_cli("import", str(path), "--skip-invalid")
    assert done.returncode == 0, done.stderr
    assert pending(redis_client, "us") == {"a@x.io": "us-email"}
    assert pending(redis_client, "eu") == {"c@x.io": "eu-email"}


def test_the_http_api_routes_and_refuses_at_the_door(workspaces_env, redis_client, tmp_path):
    with running_api(workspaces_env["REDIS_URL"], tmp_path) as api:
        done = api.post([row("us-email", "a@x.io"), row("new", "b@x.io", workspace="eu")])
        assert done.status_code == 202, done.text
        assert done.json() == {"accepted": 2, "stale": 0}
        refused = api.post([row("eu-sms", "c@x.io"), row("lost", "d@x.io")])
        assert refused.status_code == 422
        assert refused.json()["errors"] == [
            {
                "index": 1,
                "field": "subscription_group_id",
                "reason": "group 'lost' belongs to no workspace in BRAZE_WORKSPACES_FILE "
                "(name one with workspace=)",
            }
        ]
    assert pending(redis_client, "us") == {"a@x.io": "us-email"}
    assert pending(redis_client, "eu") == {"b@x.io": "new"}  # c@x.io: nothing of the request


def test_without_the_file_everything_is_the_default_workspace_as_before(env, redis_client):
    """No BRAZE_WORKSPACES_FILE: today's keys, a named `default` accepted, another refused."""
    enqueue_change(subscription_group_id="any", subscription_state=STATE, email="a@x.io")
    enqueue_change(
        subscription_group_id="any", subscription_state=STATE, email="b@x.io", workspace="default"
    )
    prefix = get_settings().redis_key_prefix
    assert redis_client.hlen(f"{{{prefix}}}:pending") == 2
    with pytest.raises(ValueError, match="no workspace 'us'"):
        enqueue_change(
            subscription_group_id="any", subscription_state=STATE, email="c@x.io", workspace="us"
        )
    assert redis_client.hlen(f"{{{prefix}}}:pending") == 2


def test_a_bad_file_stops_the_cli_with_one_line(workspaces_env, tmp_path):
    workspaces_env.file.write_text(
        workspaces_env.file.read_text().replace('"eu-email"', '"us-email"')
    )
    result = run_cli("enqueue", "--group", "us-email", "--state", STATE, "--email", "a@x.io")
    assert_one_line_error(
        result, "BRAZE_WORKSPACES_FILE", "[workspaces.us] groups", "[workspaces.eu] groups"
    )
    assert "sim-key" not in result.stderr
