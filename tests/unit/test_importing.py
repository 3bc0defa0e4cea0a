"""The streaming import readers in `tasks.rows`, in this process (pure: files in, rows out).
Process pools and enqueueing into Redis: tests/integration/test_importing.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.changes import Change, IdentifierKind, SubscriptionState
from tasks.bulk_import import checked_chunks
from tasks.rows import (
    CsvChunk,
    ImportFileError,
    RowError,
    iter_changes,
    read_chunks,
)
from tests.import_files import (
    GOOD,
    HEADER,
    LINES,
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


def errors_by_line(path: Path) -> dict[int, RowError]:
    return {line: item for line, item in iter_changes(path) if isinstance(item, RowError)}


# --------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    content = (
        jsonl({**GOOD, "external_id": "u1"})  # 1
        + "\n"  # 2 blank
        + "   \n"  # 3 blank
        + jsonl({**GOOD, "email": "nope"})  # 4 bad
        + jsonl({**GOOD, "phone": "+1 (415) 555-0100"})  # 5
        + "\r\n"  # 6 blank (CRLF)
        + jsonl({**GOOD, "external_id": "u2", "oops": 1})  # 7 bad
    )
    path = write(tmp_path, "changes.jsonl", content)
    items = list(iter_changes(path))
    assert [line for line, _ in items] == [1, 4, 5, 7]
    errors = errors_by_line(path)
    assert set(errors) == {4, 7}
    assert errors[4].field == "email"
    assert str(errors[7]) == "line 7: oops: unknown field"
    phone = dict(items)[5]
    assert isinstance(phone, Change)
    assert phone.value == "+14155550100"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("[1, 2]", "found an array"),
        ('"text"', "found a string"),
        ("42", "found a number"),
        ("null", "found null"),
        ("{not json", "line is not a JSON object: Expecting property name"),
        ('{"a": 1', "line is not a JSON object"),
        ("[" * 30_000 + "]" * 30_000, "line is not a JSON object"),
    ],
)
def test_jsonl_non_object_line_is_a_row_error(tmp_path: Path, line: str, fragment: str) -> None:
    path = write(tmp_path, "c.ndjson", jsonl({**GOOD, "external_id": "u"}) + line + "\n")
    (first_line, first), (bad_line, error) = list(iter_changes(path))
    assert first_line == 1
    assert isinstance(first, Change)
    assert bad_line == 2
    assert isinstance(error, RowError)
    assert fragment in error.message
    assert error.field == ""
    assert str(error).startswith("line 2: line is not a JSON object")


def test_jsonl_bom_and_invalid_utf8(tmp_path: Path) -> None:
    content = (
        b"\xef\xbb\xbf"
        + jsonl({**GOOD, "email": "A@Example.com"}).encode()
        + b'{"subscription_group_id": "g\xff", "external_id": "u"}\n'
        + jsonl({**GOOD, "external_id": "u3"}).encode()
    )
    path = write(tmp_path, "c.jsonl", content)
    items = dict(iter_changes(path))
    assert isinstance(items[1], Change)
    assert items[1].value == "a@example.com"
    assert isinstance(items[2], RowError)
    assert "not valid UTF-8" in items[2].message
    assert isinstance(items[3], Change)


def test_jsonl_without_trailing_newline(tmp_path: Path) -> None:
    path = write(tmp_path, "c.jsonl", json.dumps({**GOOD, "external_id": "u"}))
    ((line, change),) = list(iter_changes(path))
    assert line == 1
    assert isinstance(change, Change)


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------


def test_csv_line_numbers_start_after_header(tmp_path: Path) -> None:
    content = (
        HEADER
        + "g,subscribed,u1,,\n"  # 2
        + "g,subscribed,,bad-email,\n"  # 3
        + "\n"  # 4 blank
        + ",,,,\n"  # 5 blank cells only
        + 'g,subscribed,,"multi\nline@example.com",\n'  # 6-7, reported at 6
        + "g,subscribed,,,4155550100\n"  # 8
        + "g,subscribed,u9,,\n"  # 9
    )
    path = write(tmp_path, "c.csv", content)
    items = list(iter_changes(path))
    assert [line for line, _ in items] == [2, 3, 6, 8, 9]
    errors = errors_by_line(path)
    assert {line: e.field for line, e in errors.items()} == {3: "email", 6: "email", 8: "phone"}
    assert "international format" in str(errors[8])
    assert all("\n" not in str(e) for e in errors.values())


def test_csv_empty_cells_are_absent_and_types_come_from_strings(tmp_path: Path) -> None:
    header = (
        "subscription_group_id,subscription_state,external_id,email,phone,"
        "use_double_opt_in_logic,delay_seconds\n"
    )
    content = header + "g,subscribed,,,+44 7911 123456,yes,30\n" + "g,unsubscribed,u,,,,\n"
    items = list(iter_changes(write(tmp_path, "c.csv", content)))
    assert [line for line, _ in items] == [2, 3]
    first, second = (item for _, item in items)
    assert isinstance(first, Change)
    assert first.kind is IdentifierKind.PHONE
    assert first.double_opt_in is True
    assert first.delay_seconds == 30.0
    # Blank cells are absent fields (a blank flag or delay would be a row error).
    assert second == Change("g", SubscriptionState.UNSUBSCRIBED, IdentifierKind.EXTERNAL_ID, "u")


def test_csv_bom_header(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", b"\xef\xbb\xbf" + (HEADER + "g,subscribed,u,,\n").encode())
    ((line, change),) = list(iter_changes(path))
    assert line == 2
    assert isinstance(change, Change)


def test_csv_crlf_and_invalid_utf8(tmp_path: Path) -> None:
    content = (
        HEADER.replace("\n", "\r\n").encode()
        + b"g,subscribed,u1,,\r\n"
        + b"g,subscribed,caf\xe9,,\r\n"
        + b'g,subscribed,,"x\r\n\xff@example.com",\r\n'
        + b"g,subscribed,u5,,\r\n"
    )
    path = write(tmp_path, "c.csv", content)
    items = dict(iter_changes(path))
    assert sorted(items) == [2, 3, 4, 6]
    assert isinstance(items[2], Change)
    assert isinstance(items[3], RowError)
    assert "not valid UTF-8" in items[3].message
    assert isinstance(items[4], RowError)
    assert "on line 5" in items[4].message
    assert isinstance(items[6], Change)
    assert items[6].value == "u5"


@pytest.mark.parametrize("digits", [400, 4301, 5000])
def test_a_huge_integer_is_a_bad_row(tmp_path: Path, digits: int) -> None:
    """Issue 21 item 7: past 4,300 digits the JSON reader itself refuses the number."""
    huge = "9" * digits
    good = jsonl({**GOOD, "external_id": "u2"})
    path = write(
        tmp_path,
        "n.jsonl",
        '{"subscription_group_id": "g", "subscription_state": '
        f'"subscribed", "external_id": "u1", "occurred_at": {huge}}}\n' + good,
    )
    csv_path = write(
        tmp_path,
        "n.csv",
        f"{HEADER[:-1]},occurred_at\ng,subscribed,u1,,,{huge}\ng,subscribed,u2,,,\n",
    )
    for file in (path, csv_path):
        items = dict(iter_changes(file))
        assert isinstance(items[2 if file.suffix == ".csv" else 1], RowError), items
        assert isinstance(items[3 if file.suffix == ".csv" else 2], Change)
        assert [r.valid for r in checked_chunks(file)] == [1]
    (error,) = errors_by_line(path).values()
    if digits > 4300:
        assert error.message == "line is not a JSON object: a number with more than 4,300 digits"
    else:
        assert (error.field, error.message) == (
            "occurred_at",
            "lies in the future, beyond any time, got a 400-digit number",
        )


def test_a_csv_record_spanning_lines_is_capped_in_bytes_as_a_line_is(tmp_path: Path) -> None:
    """Issue 21 item 7: a quote left open makes one record of the rest of the file, short
    lines each; the record is refused at MAX_LINE_BYTES and reading goes on after its end."""
    from tasks.rows import MAX_LINE_BYTES

    open_quote = 'g,subscribed,"u1\n' + 'x","y\n' * (MAX_LINE_BYTES // 3) + 'end"\n'
    content = HEADER + open_quote + "g,subscribed,u2,,\n"
    path = write(tmp_path, "q.csv", content)
    items = list(iter_changes(path))
    after = 2 + 1 + MAX_LINE_BYTES // 3 + 1
    assert [line for line, _ in items] == [2, after]
    error = items[0][1]
    assert isinstance(error, RowError)
    assert error.message.startswith(f"record longer than {MAX_LINE_BYTES:,} bytes")
    assert isinstance(items[1][1], Change) and items[1][1].value == "u2"
    results = list(checked_chunks(path, chunk_lines=1000))
    assert [e.line for r in results for e in r.errors] == [2]
    assert sum(r.valid for r in results) == 1
    assert results[-1].last_line == after


def test_a_quoted_csv_record_of_many_short_lines_keeps_memory_flat(tmp_path: Path) -> None:
    """~12 MB of short lines inside one open quote: validated in bounded memory."""
    path = tmp_path / "open.csv"
    with open(path, "w") as handle:
        handle.write(HEADER + 'g,subscribed,"u1\n')
        block = 'x","y\n' * 10_000
        for _ in range(200):
            handle.write(block)
    size = path.stat().st_size
    assert size > 10 * PEAK_LIMIT

    def consume() -> int:
        return sum(len(r.errors) for r in checked_chunks(path, chunk_lines=1000))

    errors, peak = peak_while(consume)
    assert errors == 1
    assert peak < 3 * PEAK_LIMIT, f"peak {peak} bytes while validating a {size}-byte file"


def test_csv_extra_column_is_passed_through(tmp_path: Path) -> None:
    content = HEADER.replace("\n", ",note\n") + "g,subscribed,u,,,hello\n" + "g,subscribed,u,,,\n"
    items = dict(iter_changes(write(tmp_path, "c.csv", content)))
    assert str(items[2]) == "line 2: note: unknown field"
    assert isinstance(items[3], Change)


def test_csv_row_longer_than_header(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", HEADER + "g,subscribed,u,,,surprise\n")
    ((_, error),) = list(iter_changes(path))
    assert isinstance(error, RowError)
    assert "6 cells" in error.message


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("subscription_group_id,email\n", "missing column subscription_state"),
        ("email\n", "missing columns subscription_group_id, subscription_state"),
        ("subscription_group_id,subscription_state\n", "one of external_id, email, phone"),
        ("subscription_group_id,subscription_state,email,email\n", "duplicate column email"),
        ("", "empty file"),
    ],
)
def test_csv_header_problems_raise_before_any_row(
    tmp_path: Path, header: str, message: str
) -> None:
    path = write(tmp_path, "bad.csv", header + "g,subscribed,a@example.com\n" * 3 if header else "")
    items = iter_changes(path)
    with pytest.raises(ImportFileError, match=message) as caught:
        next(items)
    assert "bad.csv" in str(caught.value)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------
# Files as a whole
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["changes.txt", "changes.json", "changes"])
def test_unknown_suffix(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "")
    with pytest.raises(ImportFileError, match=name):
        iter_changes(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImportFileError, match="cannot open"):
        list(iter_changes(tmp_path / "absent.jsonl"))


def test_iter_changes_can_run_twice(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", HEADER + "g,subscribed,u,,\n" + "g,unsubscribed,,A@B.co,\n")
    first = list(iter_changes(path))
    assert len(first) == 2, "both rows read (two empty lists would compare equal)"
    assert list(iter_changes(path)) == first


# --------------------------------------------------------------------------------------
# Laziness
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "header", "line"),
    [
        ("big.jsonl", "", jsonl({**GOOD, "external_id": LONG_ID, "delay_seconds": 1})),
        ("big.csv", HEADER, f"group-0001,subscribed,{LONG_ID},,\n"),
    ],
)
def test_reading_is_lazy(tmp_path: Path, name: str, header: str, line: str) -> None:
    path = big_file(tmp_path / name, header, line)
    size = path.stat().st_size
    assert size > 5 * PEAK_LIMIT

    count, peak = peak_while(lambda: sum(1 for _ in iter_changes(path)))
    assert count == LINES
    assert peak < PEAK_LIMIT, f"peak {peak} bytes while reading a {size}-byte file"


# --------------------------------------------------------------------------------------
# Chunks: the same verdict on every row as `iter_changes`, whatever the chunk size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines", [1, 2, 3, 5, 1000])
@pytest.mark.parametrize(("name", "content"), [("c.jsonl", TRICKY_JSONL), ("c.csv", TRICKY_CSV)])
def test_chunks_agree_with_iter_changes(
    tmp_path: Path, name: str, content: bytes, lines: int
) -> None:
    path = write(tmp_path, name, content)
    rows, errors, args = verdict_by_rows(path)
    assert errors and args  # the files hold both
    assert verdict_by_chunks(path, lines) == (rows, errors, args)


def test_csv_chunks_never_split_a_record(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", TRICKY_CSV)
    chunks = list(read_chunks(path, 2))
    assert all(isinstance(chunk, CsvChunk) for chunk in chunks)
    starts = [start for chunk in chunks for start, _ in chunk.records]  # type: ignore[union-attr]
    assert starts == [2, 3, 4, 5, 6, 8, 9, 11, 12, 13, 17]
    assert chunks[-1].last_line == 17
    # A chunk ends at the first record end once it spans 2 lines (the first counts the
    # header): records 6-7, 9-10 and 13-16 stay whole.
    assert [chunk.last_line for chunk in chunks] == [2, 4, 7, 10, 12, 16, 17]


def test_jsonl_chunks_are_consecutive_raw_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "c.jsonl", TRICKY_JSONL)
    chunks = list(read_chunks(path, 5))
    assert [(chunk.first_line, chunk.last_line) for chunk in chunks] == [(1, 5), (6, 10), (11, 12)]  # type: ignore[union-attr]
    assert chunks[0].lines[0].startswith(b'{"subscription_group_id"')  # type: ignore[union-attr]


def test_a_lone_surrogate_is_a_row_error_not_a_crash(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.jsonl",
        '{"subscription_group_id": "g", "subscription_state": "subscribed", '
        '"external_id": "a\\ud800b"}\n'
        '{"subscription_group_id": "\\udfffg", "subscription_state": "subscribed", '
        '"email": "a@b.co"}\n' + jsonl({**GOOD, "external_id": "fine"}),
    )
    [result] = list(checked_chunks(path))
    assert [str(error) for error in result.errors] == [
        "line 1: external_id: must not contain lone surrogates, found '\\ud800' at position 1",
        "line 2: subscription_group_id: must not contain lone surrogates, "
        "found '\\udfff' at position 0",
    ]
    assert (result.rows, result.valid) == (3, 1)


# --------------------------------------------------------------------------------------
# enqueue_file: when worker processes validate (in process below 1 MiB)
# --------------------------------------------------------------------------------------


def test_small_files_are_validated_in_process(tmp_path: Path) -> None:
    from tasks.bulk_import import PARALLEL_MIN_BYTES, parallel_jobs

    path = write(tmp_path, "small.jsonl", "".join(mixed_lines(50)))
    assert path.stat().st_size < PARALLEL_MIN_BYTES
    assert parallel_jobs(path, 4) == 1
    assert parallel_jobs(path, 4, min_bytes=0) == 4
    assert parallel_jobs(path, 1, min_bytes=0) == 1
    assert parallel_jobs(path, None, min_bytes=0) >= 1
    with pytest.raises(ValueError):
        parallel_jobs(path, 0)
