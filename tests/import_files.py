"""Import files and helpers shared by tests/unit/test_importing.py (the readers in this
process) and tests/integration/test_importing.py (process pools and a real Redis)."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.changes import Change
from stores.buffer import encode_changes
from tasks.bulk_import import checked_chunks
from tasks.rows import RowError, iter_changes

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
# Mixed files: later rows must win, bad rows at known lines
# --------------------------------------------------------------------------------------

IDENTIFIER_KINDS = ("external_id", "email", "phone")
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


# --------------------------------------------------------------------------------------
# Laziness: big files and the peak memory while reading them
# --------------------------------------------------------------------------------------

LINES = 60_000  # 6-9 MB: over 5 x PEAK_LIMIT, the test's margin, not more (tracemalloc is slow)
PEAK_LIMIT = 1024 * 1024
LONG_ID = "user-" + "0123456789" * 8


def big_file(path: Path, header: str, line: str, lines: int = LINES) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(header)
        for _ in range(lines // 10_000):
            handle.write(line * 10_000)
    return path


def peak_while(consume: Callable[[], int]) -> tuple[int, int]:
    """What `consume` returns, and the peak of memory traced while it ran."""
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


def verdict_by_rows(path: Path) -> tuple[int, list[RowError], list[bytes]]:
    """(rows, errors, enqueue-script arguments) of the file read row by row."""
    items = list(iter_changes(path))
    errors = [item for _, item in items if isinstance(item, RowError)]
    changes = [item for _, item in items if isinstance(item, Change)]
    return len(items), errors, encode_changes(changes)


def verdict_by_chunks(
    path: Path, lines: int, jobs: int = 1
) -> tuple[int, list[RowError], list[bytes]]:
    """The same, of the file validated in chunks of `lines` lines by `jobs` processes."""
    results = list(checked_chunks(path, jobs, lines))
    last_lines = [result.last_line for result in results]
    assert last_lines == sorted(set(last_lines))
    return (
        sum(result.rows for result in results),
        [error for result in results for error in result.errors],
        [arg for result in results for arg in result.args],
    )


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """An import file of `rows`, one JSON object a line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
