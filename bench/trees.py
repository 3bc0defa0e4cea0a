"""The base commit a bench compares this tree with, checked out beside it: a detached git
worktree of this repository in a temporary folder, removed when the bench ends."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def add_base_tree(path: Path, rev: str) -> None:
    """Check `rev` out (detached) into `path`, a new worktree of this repository."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )


def remove_base_tree(path: Path) -> None:
    """Remove the worktree at `path` (what it holds is the bench's, never edited)."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
        check=False,
        capture_output=True,
    )


def child_figures(done: subprocess.CompletedProcess[str], tree: Path) -> dict[str, Any]:
    """The figures a bench's child process printed last (a `FIGURES {json}` line) for
    `tree`; exits naming the tree with the child's output if it failed or printed none."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("FIGURES ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the run in {tree} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(lines[-1].removeprefix("FIGURES "))
    return figures
