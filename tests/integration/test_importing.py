"""The import readers with process pools (`jobs=2`) and `enqueue_file` into a real Redis.
The pure reader tests: tests/unit/test_importing.py."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.changes import Change
from stores.buffer import encode_changes
from tasks.bulk_import import checked_chunks
from tasks.rows import (
    ImportFileError,
    RowError,
    iter_changes,
    read_chunks,
)

GOOD = {"subscription_group_id": "g", "subscription_state": "subscribed"}
HEADER = "subscription_group_id,subscription_state,external_id,email,phone\n"


def jsonl(obj: dict[str, Any]) -> str:
    return json.dumps(obj) + "\n"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --------------------------------------------------------------------------------------
# Laziness
# --------------------------------------------------------------------------------------

LINES = 200_000
PEAK_LIMIT = 1024 * 1024
LONG_ID = "user-" + "0123456789" * 8


def _big_file(path: Path, header: str, line: str, lines: int = LINES) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(header)
        for _ in range(lines // 10_000):
            handle.write(line * 10_000)
    return path


def _peak_while(consume: Callable[[], int]) -> tuple[int, int]:
    tracemalloc.start()
    try:
        count = consume()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak


# --------------------------------------------------------------------------------------
# Chunks: the same verdict on every row as `iter_changes`, whatever the chunk size
# --------------------------------------------------------------------------------------

TRICKY_JSONL = (
    b"\xef\xbb\xbf"
    + jsonl({**GOOD, "email": "A@Example.com"}).encode()  # 1 (after a BOM)
    + b"\n"  # 2 blank
    + b'{"subscription_group_id": "g\xff", "external_id": "u"}\n'  # 3 bad UTF-8
    + jsonl({**GOOD, "phone": "+1 (415) 555-0100", "delay_seconds": 30}).encode()  # 4
    + b"not json\r\n"  # 5
    + b"[1, 2]\n"  # 6
    + b"   \r\n"  # 7 blank
    + jsonl({**GOOD, "external_id": "u1", "oops": 1}).encode()  # 8 unknown field
    + jsonl({**GOOD, "subscription_state": "unsubscribed", "external_id": " u1 "}).encode()  # 9
    + jsonl({**GOOD, "phone": "+14155550100", "use_double_opt_in_logic": "yes"}).encode()  # 10
    + jsonl({**GOOD, "email": "nope"}).encode()  # 11
    + json.dumps({**GOOD, "external_id": "last"}).encode()  # 12, no newline at the end
)

TRICKY_CSV = (
    b"\xef\xbb\xbf"
    + HEADER.replace("\n", ",delay_seconds\r\n").encode()  # 1
    + b"g,subscribed,u1,,,\r\n"  # 2
    + b"g,subscribed,,bad-email,,\r\n"  # 3
    + b"\r\n"  # 4 blank
    + b",,,,,\r\n"  # 5 blank cells only
    + b'g,subscribed,,"multi\r\nline@example.com",,\r\n'  # 6-7, reported at 6
    + b"g,subscribed,caf\xe9,,,\r\n"  # 8 bad UTF-8
    + b'g,subscribed,,"x\r\n\xff@example.com",,\r\n'  # 9-10 bad UTF-8 on line 10
    + b"g,unsubscribed,,,+44 7911 123456,5\r\n"  # 11
    + b"g,subscribed,u1,,,,surprise\r\n"  # 12 too many cells
    + b'g,subscribed,,"a@b.co\r\n\r\n\r\n",,\r\n'  # 13-16, three line breaks in a cell
    + b"g,unsubscribed,u1,,,\r\n"  # 17
)


def _expected(path: Path) -> tuple[int, list[RowError], list[bytes]]:
    items = list(iter_changes(path))
    errors = [item for _, item in items if isinstance(item, RowError)]
    changes = [item for _, item in items if isinstance(item, Change)]
    return len(items), errors, encode_changes(changes)


def _chunked(path: Path, lines: int, jobs: int = 1) -> tuple[int, list[RowError], list[bytes]]:
    results = list(checked_chunks(path, jobs, lines))
    last_lines = [result.last_line for result in results]
    assert last_lines == sorted(set(last_lines))
    return (
        sum(result.rows for result in results),
        [error for result in results for error in result.errors],
        [arg for result in results for arg in result.args],
    )


@pytest.mark.parametrize(("name", "content"), [("c.jsonl", TRICKY_JSONL), ("c.csv", TRICKY_CSV)])
def test_chunks_validated_in_worker_processes_agree(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = write(tmp_path, name, content)
    assert _chunked(path, 2, jobs=2) == _expected(path)


def test_chunk_file_problems_raise_before_any_chunk(tmp_path: Path) -> None:
    with pytest.raises(ImportFileError, match="unsupported"):
        read_chunks(write(tmp_path, "c.txt", ""))
    with pytest.raises(ImportFileError, match="cannot open"):
        next(read_chunks(tmp_path / "absent.jsonl"))
    with pytest.raises(ImportFileError, match="missing column"):
        next(checked_chunks(write(tmp_path, "c.csv", "email\na@b.co\n"), jobs=2))


def test_parallel_validation_memory_is_bounded(tmp_path: Path) -> None:
    line = jsonl({**GOOD, "external_id": LONG_ID})
    path = _big_file(tmp_path / "big.jsonl", "", line, 40_000)
    size = path.stat().st_size
    assert size > 5 * PEAK_LIMIT

    def consume() -> int:
        return sum(result.valid for result in checked_chunks(path, jobs=2, chunk_lines=1000))

    # The chunks in flight (4 of 1,000 lines) and their results bound it, not the file.
    count, peak = _peak_while(consume)
    assert count == 40_000
    assert peak < 3 * PEAK_LIMIT, f"peak {peak} bytes while validating a {size}-byte file"


# --------------------------------------------------------------------------------------
# enqueue_file: validating in worker processes changes nothing but the speed (real Redis)
# --------------------------------------------------------------------------------------

# Chunks of 7 lines, so a few hundred rows cross dozens of chunk boundaries.
PARALLEL: dict[str, Any] = {"jobs": 2, "chunk_lines": 7, "parallel_min_bytes": 0}
IN_PROCESS: dict[str, Any] = {"jobs": 1, "chunk_lines": 7}
BAD_LINES = [1, 7, 8, 14, 15, 29, 100, 200]
BAD_ROWS = [
    "{not json\n",
    jsonl({**GOOD, "email": "nope"}),
    jsonl({**GOOD, "phone": "4155550100"}),
    jsonl({**GOOD, "external_id": "u", "oops": 1}),
    jsonl({**GOOD, "subscription_state": "unsubscribed", "phone": "+14155550100",
           "use_double_opt_in_logic": True}),
]  # fmt: skip


def mixed_lines(rows: int, bad_lines: list[int] = BAD_LINES) -> list[str]:
    """Emails, phones and external ids over two groups; every identifier comes back
    every 51 rows and its state flips every 17, so later rows must win."""
    lines = []
    for n in range(rows):
        kind = IDENTIFIER_KINDS[n % 3]
        who = n % 17
        value = {
            "external_id": f" u{who} ",
            "email": f"User{who}@Example.com",
            "phone": f"+1 415 555 {who:04d}",
        }[kind]
        state = "subscribed" if (n // 17) % 2 == 0 else "unsubscribed"
        row: dict[str, Any] = {"subscription_group_id": f"g{n % 2}", "subscription_state": state}
        row[kind] = value
        if n % 11 == 0:
            row["delay_seconds"] = 3600
        if kind != "email" and state == "subscribed" and n % 5 == 0:
            row["use_double_opt_in_logic"] = True
        lines.append(jsonl(row))
    for index, line in enumerate(bad_lines):
        if line <= rows:
            lines[line - 1] = BAD_ROWS[index % len(BAD_ROWS)]
    return lines


IDENTIFIER_KINDS = ("external_id", "email", "phone")


def snapshot(client: Any, keys: Any) -> dict[str, Any]:
    """The buffer's state, with due times reduced to whether the change was delayed."""
    from stores.buffer import server_time_ms

    later = server_time_ms(client) + 1_800_000
    pending = {}
    for name, raw in client.hgetall(keys.pending).items():
        change = json.loads(raw)
        pending[name] = (change["s"], change["o"], change["q"], change["t"] > later)
    return {
        "pending": pending,
        "due": set(client.zrange(keys.due, 0, -1)),
        "seq": client.get(keys.seq),
        "enqueued": client.hget(keys.stats, "enqueued"),
    }


def reference_state(client: Any, path: Path) -> dict[str, Any]:
    """What `Buffer.enqueue` makes of the file's valid rows, in file order."""
    from stores.buffer import Buffer
    from stores.keys import Keys

    keys = Keys("reference")
    changes = [item for _, item in iter_changes(path) if isinstance(item, Change)]
    Buffer(client, keys).enqueue(changes)
    return snapshot(client, keys)


def as_csv(lines: list[str]) -> str:
    """The JSON Lines rows as CSV (bad JSON stays a line of its own, as bad CSV cells)."""
    import csv
    import io

    columns = [
        "subscription_group_id",
        "subscription_state",
        "external_id",
        "email",
        "phone",
        "use_double_opt_in_logic",
        "delay_seconds",
        "oops",
    ]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = {"subscription_group_id": "g", "subscription_state": "x\ny"}  # 2 lines
        writer.writerow(["" if row.get(name) is None else str(row[name]) for name in columns])
    return out.getvalue()


def import_into(client: Any, prefix: str, path: Path, **options: Any) -> tuple[Any, Any]:
    from stores.buffer import Buffer
    from stores.keys import Keys
    from tasks.bulk_import import enqueue_file

    keys = Keys(prefix)
    return enqueue_file(path, Buffer(client, keys), **options), keys


@pytest.mark.parametrize("name", ["mixed.jsonl", "mixed.csv"])
def test_parallel_import_enqueues_exactly_what_in_process_does(
    redis_client: Any, tmp_path: Path, name: str
) -> None:
    lines = mixed_lines(300, bad_lines=[])
    path = write(tmp_path, name, as_csv(lines) if name.endswith(".csv") else "".join(lines))
    states = {}
    for mode, options in {"in_process": IN_PROCESS, "parallel": PARALLEL}.items():
        result, keys = import_into(redis_client, mode, path, **options)
        assert (result.ok, result.rows, result.enqueued) == (True, 300, 300)
        assert result.jobs == options["jobs"]
        states[mode] = snapshot(redis_client, keys)
    assert states["parallel"] == states["in_process"] == reference_state(redis_client, path)
    assert len(states["parallel"]["pending"]) == 2 * 51  # 51 identifiers in each group
    delayed = [slot for slot, change in states["parallel"]["pending"].items() if change[3]]
    flagged = [slot for slot, change in states["parallel"]["pending"].items() if change[1]]
    assert delayed and flagged


@pytest.mark.parametrize("name", ["mixed.jsonl", "mixed.csv"])
def test_parallel_import_reports_every_bad_line_in_order_and_enqueues_nothing(
    redis_client: Any, tmp_path: Path, name: str
) -> None:
    lines = mixed_lines(300)
    path = write(tmp_path, name, as_csv(lines) if name.endswith(".csv") else "".join(lines))
    expected = [item for _, item in iter_changes(path) if isinstance(item, RowError)]
    # CSV: after the header, and the bad JSON rows (rows 1 and 29) became 2-line records.
    bad = [2, 9, 10, 16, 17, 31, 103, 203] if name.endswith(".csv") else BAD_LINES
    assert [error.line for error in expected] == bad
    for mode, options in {"in_process": IN_PROCESS, "parallel": PARALLEL}.items():
        result, keys = import_into(redis_client, mode, path, **options)
        assert result.errors == expected
        assert (result.rows, result.rejected, result.enqueued) == (300, len(bad), 0)
        assert redis_client.hlen(keys.pending) == 0
        assert redis_client.exists(keys.seq) == 0


def test_parallel_skip_invalid_writes_the_same_rejects_and_enqueues_the_rest(
    redis_client: Any, tmp_path: Path
) -> None:
    path = write(tmp_path, "mixed.jsonl", "".join(mixed_lines(300)))
    states, rejects = {}, {}
    for mode, options in {"in_process": IN_PROCESS, "parallel": PARALLEL}.items():
        rejects_path = tmp_path / f"rejects-{mode}.jsonl"
        result, keys = import_into(
            redis_client, mode, path, skip_invalid=True, rejects=rejects_path, **options
        )
        assert (result.rows, result.rejected, result.enqueued) == (300, 8, 292)
        states[mode] = snapshot(redis_client, keys)
        rejects[mode] = [json.loads(line) for line in rejects_path.read_text().splitlines()]
    assert rejects["parallel"] == rejects["in_process"]
    assert [record["line"] for record in rejects["parallel"]] == BAD_LINES
    assert [record["field"] for record in rejects["parallel"]][1:5] == [
        "email",
        "phone",
        "oops",
        "use_double_opt_in_logic",
    ]
    assert states["parallel"] == states["in_process"] == reference_state(redis_client, path)


def test_parallel_import_keeps_few_chunks_in_flight(
    redis_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.bulk_import as import_job

    path = write(tmp_path, "mixed.jsonl", "".join(mixed_lines(700, bad_lines=[])))
    read = 0

    def counted(path: Path, lines: int) -> Iterator[Any]:
        nonlocal read
        for chunk in read_chunks(path, lines):
            read += 1
            yield chunk

    ahead: list[int] = []

    def progress(phase: str, line: int) -> None:
        if phase == "validating":
            consumed = -(-line // PARALLEL["chunk_lines"])  # chunks up to this line
            ahead.append(read - consumed)

    monkeypatch.setattr(import_job, "read_chunks", counted)
    result, _ = import_into(redis_client, "bounded", path, progress=progress, **PARALLEL)
    assert result.enqueued == 700
    assert read == len(ahead) == 100
    bound = import_job.IN_FLIGHT_PER_JOB * PARALLEL["jobs"]
    assert max(ahead) <= bound - 1  # and the one being handled: `bound` in all
    assert ahead[0] == bound - 1  # the reader ran ahead, but no further


def test_interrupt_while_validating_enqueues_nothing_and_stops_the_workers(
    redis_client: Any, tmp_path: Path
) -> None:
    import multiprocessing

    path = write(tmp_path, "mixed.jsonl", "".join(mixed_lines(700, bad_lines=[])))
    calls = 0

    def progress(phase: str, line: int) -> None:  # Ctrl-C arrives here
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_into(redis_client, "interrupted", path, progress=progress, **PARALLEL)
    assert calls == 5
    assert redis_client.keys("{interrupted}*") == []
    assert multiprocessing.active_children() == []


def test_errors_kept_are_the_first_across_chunks(
    redis_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.bulk_import as import_job

    monkeypatch.setattr(import_job, "MAX_ERRORS_KEPT", 3)
    path = write(tmp_path, "mixed.jsonl", "".join(mixed_lines(300)))
    result, _ = import_into(redis_client, "capped", path, **PARALLEL)
    assert [error.line for error in result.errors] == BAD_LINES[:3]
    assert result.rejected == len(BAD_LINES)


def test_a_redis_error_while_enqueuing_is_raised_and_leaves_the_client_usable(
    redis_client: Any, tmp_path: Path
) -> None:
    from stores.keys import Keys
    from tasks.bulk_import import ImportInterrupted

    keys = Keys("broken")
    redis_client.set(keys.pending, "not a hash")  # every enqueue call now fails
    path = write(tmp_path, "mixed.jsonl", "".join(mixed_lines(3000, bad_lines=[])))
    with pytest.raises(ImportInterrupted, match=r"WRONGTYPE.*0 changes enqueued.*--from-line 1$"):
        import_into(redis_client, "broken", path, **PARALLEL)
    # The replies in flight went with their connection, not to the next user of the pool
    # (which takes the connection released last).
    assert redis_client.ping()
    assert redis_client.get(keys.pending) == b"not a hash"
