"""Issue 10, imports that fail halfway: a real redis-server that fills up (maxmemory with
noeviction) mid-import, and lines too long to be rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import OutOfMemoryError

from devtools.processes import local_redis
from stores.keys import Keys
from tests.cli_runs import run_cli

ROWS = 60_000


def write_rows(path: Path, count: int) -> Path:
    with open(path, "w") as handle:
        for n in range(count):
            row = {
                "subscription_group_id": "newsletter",
                "subscription_state": "subscribed",
                "external_id": f"user-{n:06d}-with-a-long-enough-external-id",
            }
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def small_redis(tmp_path: Path):
    with local_redis(tmp_path, "--maxmemory", "6mb", "--maxmemory-policy", "noeviction") as url:
        yield url


@pytest.mark.parametrize("skip_invalid", [False, True], ids=["all-or-nothing", "skip-invalid"])
def test_a_full_redis_mid_import_says_how_far_it_got_and_the_rest_resumes(
    tmp_path, small_redis, skip_invalid
):
    path = write_rows(tmp_path / "changes.jsonl", ROWS)
    env = {"REDIS_URL": small_redis}
    extra = ["--skip-invalid"] if skip_invalid else []
    result = run_cli("import", str(path), "--jobs", "1", *extra, extra_env=env)

    assert result.returncode == 2, result.stderr[-2000:]
    line = assert_last_line(result, "OOM")
    assert "Traceback" not in result.stderr
    assert line.startswith("braze-subs: ") and "Redis failed mid-import" in line
    client = Redis.from_url(small_redis)
    pending = int(client.hlen(Keys("braze-subs").pending))
    assert 0 < pending < ROWS
    enqueued = int(line.split(" changes enqueued")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert enqueued == pending  # the count is what Redis holds
    resume = int(line.rsplit("--from-line ", 1)[1])
    assert 1 < resume <= enqueued + 1  # every row before it is in

    client.config_set("maxmemory", "0")  # the operator makes room, then resumes
    again = run_cli("import", str(path), "--from-line", str(resume), *extra, extra_env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert int(client.hlen(Keys("braze-subs").pending)) == ROWS


def assert_last_line(result, fragment: str) -> str:
    last = result.stderr.strip().splitlines()[-1]
    assert fragment in last, result.stderr[-2000:]
    return last


def test_a_line_too_long_is_a_bad_row_not_a_memory_spike(tmp_path, env, redis_client):
    path = tmp_path / "long.jsonl"
    good = json.dumps(
        {"subscription_group_id": "g", "subscription_state": "subscribed", "external_id": "u1"}
    )
    with open(path, "w") as handle:
        handle.write(good + "\n")
        handle.write('{"subscription_group_id": "' + "x" * (20 << 20) + '"}\n')  # 20 MB
        handle.write(good.replace("u1", "u2") + "\n")
    result = run_cli("import", str(path))
    assert result.returncode == 1
    assert "line 2: line longer than 65,536 bytes" in result.stderr
    assert "nothing enqueued" in result.stderr
    skipped = run_cli("import", str(path), "--skip-invalid")
    assert skipped.returncode == 0, skipped.stderr
    assert "2 changes enqueued, 1 rejected" in skipped.stderr


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_chunks_are_cut_by_bytes_as_well_as_lines(tmp_path, suffix):
    from tasks.rows import CHUNK_BYTES, MAX_LINE_BYTES, CsvChunk, read_chunks

    source = "s" * 30_000  # long but valid lines: ~30 KB each
    path = tmp_path / f"wide.{suffix}"
    with open(path, "w") as handle:
        if suffix == "csv":
            handle.write("subscription_group_id,subscription_state,external_id,source\n")
        for n in range(300):
            if suffix == "csv":
                handle.write(f"g,subscribed,u{n},{source}\n")
            else:
                row = {"subscription_group_id": "g", "subscription_state": "subscribed"}
                handle.write(json.dumps({**row, "external_id": f"u{n}", "source": source}) + "\n")
    chunks = list(read_chunks(path))
    assert len(chunks) > 1  # 300 lines is far below CHUNK_LINES: bytes cut them
    for chunk in chunks:
        if isinstance(chunk, CsvChunk):
            size = sum(len(cell) for _line, cells in chunk.records for cell in cells)
        else:
            size = sum(len(line or b"") for line in chunk.lines)
        assert size <= CHUNK_BYTES + MAX_LINE_BYTES


def test_a_full_redis_mid_import_of_two_workspaces_resumes_from_a_line_both_hold(
    tmp_path, small_redis
):
    """Issue 23: rows of two workspaces, each enqueued on its own pipelined connection in
    calls of 1,000 changes; eu's rows are sparse (one in 40), so when Redis fills up, us has
    confirmed rows far past eu's last full call. The line to resume from is one before
    which every row is in *both* workspaces (counting confirmed changes over both would
    name a line past eu's unsent rows), so the resumed import ends with every row."""
    workspaces = tmp_path / "workspaces.toml"
    workspaces.write_text(
        '[workspaces.us]\nrest_endpoint = "http://127.0.0.1:1"\napi_key_env = "K_US"\n'
        'groups = ["us-news"]\n'
        '[workspaces.eu]\nrest_endpoint = "http://127.0.0.1:2"\napi_key_env = "K_EU"\n'
        'groups = ["eu-news"]\n'
    )
    path = tmp_path / "changes.jsonl"
    with open(path, "w") as handle:
        for n in range(ROWS):
            row = {
                "subscription_group_id": "eu-news" if n % 40 == 0 else "us-news",
                "subscription_state": "subscribed",
                "external_id": f"user-{n:06d}-with-a-long-enough-external-id",
            }
            handle.write(json.dumps(row) + "\n")
    env = {"REDIS_URL": small_redis, "BRAZE_WORKSPACES_FILE": str(workspaces)}
    result = run_cli("import", str(path), "--jobs", "1", extra_env=env)

    assert result.returncode == 2, result.stderr[-2000:]
    line = assert_last_line(result, "OOM")
    client = Redis.from_url(small_redis)
    each = {name: Keys("braze-subs", name).pending for name in ("us", "eu")}
    pending = {name: int(client.hlen(key)) for name, key in each.items()}
    enqueued = int(line.split(" changes enqueued")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert enqueued == sum(pending.values()) and 0 < enqueued < ROWS
    resume = int(line.rsplit("--from-line ", 1)[1])
    # Every row before the line is in, in its workspace.
    before = resume - 1
    eu_before = (before + 39) // 40
    assert pending["eu"] >= eu_before and pending["us"] >= before - eu_before, (pending, resume)

    client.config_set("maxmemory", "0")
    again = run_cli("import", str(path), "--from-line", str(resume), extra_env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {name: int(client.hlen(key)) for name, key in each.items()} == {
        "us": ROWS - ROWS // 40,
        "eu": ROWS // 40,
    }


def test_a_refused_call_followed_by_an_applied_one_is_counted_and_the_prefix_stops_before_it(
    tmp_path,
):
    """Issue 26: with three calls in flight, Redis may refuse one for want of memory (the
    calls in flight fill its input buffer) and apply the next. After the failure the
    enqueuer reads every answer in flight (`settle`): `count` holds every change Redis
    applied, `prefix` only those before the refused call, which the import's line to
    resume from rests on. The refusal is made certain here by sending the middle call
    with a script that answers with Redis's OOM error and writes nothing."""
    from core.changes import parse_change
    from stores.buffer import Buffer, encode_changes

    def changes(start: int) -> list[bytes]:
        rows = [
            {
                "subscription_group_id": "newsletter",
                "subscription_state": "subscribed",
                "external_id": f"user-{n:06d}",
            }
            for n in range(start, start + 1000)
        ]
        return encode_changes(parse_change(row) for row in rows)

    with local_redis(tmp_path) as url:
        client = Redis.from_url(url)
        buffer = Buffer(client, Keys("braze-subs"))
        with buffer.pipelined() as enqueuer:
            real_head = enqueuer._head_body
            refusing = (
                "return redis.error_reply('OOM command not allowed when used memory > maxmemory')"
            )
            enqueuer.add(changes(0))
            enqueuer._head_body = real_head.replace(
                b"$%d\r\n%s\r\n"
                % (
                    len(buffer.scripts.enqueue.script.encode()),
                    buffer.scripts.enqueue.script.encode(),
                ),
                b"$%d\r\n%s\r\n" % (len(refusing), refusing.encode()),
            )
            assert enqueuer._head_body != real_head
            enqueuer.add(changes(1000))
            enqueuer._head_body = real_head
            enqueuer.add(changes(2000))  # the third call in flight: the first is answered
            assert (enqueuer.count, enqueuer.prefix) == (1000, 1000)
            with pytest.raises(OutOfMemoryError):
                enqueuer.finish()
            enqueuer.settle()
            assert (enqueuer.count, enqueuer.prefix, enqueuer.sent) == (2000, 1000, 3000)
        assert int(client.hlen(Keys("braze-subs").pending)) == 2000
