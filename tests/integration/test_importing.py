"""The import readers with process pools (`jobs=2`) and `enqueue_file` into a real Redis.
The pure reader tests: tests/unit/test_importing.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.changes import Change, Lane
from tasks.bulk_import import checked_chunks
from tasks.rows import (
    ImportFileError,
    RowError,
    iter_changes,
    read_chunks,
)
from tests.import_files import (
    BAD_LINES,
    GOOD,
    LONG_ID,
    PEAK_LIMIT,
    TRICKY_CSV,
    TRICKY_JSONL,
    big_file,
    jsonl,
    mixed_lines,
    peak_while,
    verdict_by_chunks,
    verdict_by_rows,
    write,
)

# --------------------------------------------------------------------------------------
# Chunks: the same verdict on every row as `iter_changes`, whatever the chunk size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content"), [("c.jsonl", TRICKY_JSONL), ("c.csv", TRICKY_CSV)])
def test_chunks_validated_in_worker_processes_agree(
    tmp_path: Path, name: str, content: bytes
) -> None:
    path = write(tmp_path, name, content)
    assert verdict_by_chunks(path, 2, jobs=2) == verdict_by_rows(path)


def test_chunk_file_problems_raise_before_any_chunk(tmp_path: Path) -> None:
    with pytest.raises(ImportFileError, match="unsupported"):
        read_chunks(write(tmp_path, "c.txt", ""))
    with pytest.raises(ImportFileError, match="cannot open"):
        next(read_chunks(tmp_path / "absent.jsonl"))
    with pytest.raises(ImportFileError, match="missing column"):
        next(checked_chunks(write(tmp_path, "c.csv", "email\na@b.co\n"), jobs=2))


def test_parallel_validation_memory_is_bounded(tmp_path: Path) -> None:
    line = jsonl({**GOOD, "external_id": LONG_ID})
    path = big_file(tmp_path / "big.jsonl", "", line, 40_000)
    size = path.stat().st_size
    assert size > 5 * PEAK_LIMIT

    def consume() -> int:
        return sum(result.valid for result in checked_chunks(path, jobs=2, chunk_lines=1000))

    # The chunks in flight (4 of 1,000 lines) and their results bound it, not the file.
    count, peak = peak_while(consume)
    assert count == 40_000
    assert peak < 3 * PEAK_LIMIT, f"peak {peak} bytes while validating a {size}-byte file"


# --------------------------------------------------------------------------------------
# enqueue_file: validating in worker processes changes nothing but the speed (real Redis)
# --------------------------------------------------------------------------------------

# Chunks of 7 lines, so a few hundred rows cross dozens of chunk boundaries.
PARALLEL: dict[str, Any] = {"jobs": 2, "chunk_lines": 7, "parallel_min_bytes": 0}
IN_PROCESS: dict[str, Any] = {"jobs": 1, "chunk_lines": 7}


def snapshot(client: Any, keys: Any) -> dict[str, Any]:
    """The buffer's state, with due times reduced to whether the change was delayed."""
    from stores.clock import server_time_ms

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
    Buffer(client, keys).enqueue(changes, lane=Lane.BULK)  # an import's lane
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
