"""The base commit a bench compares this tree with, checked out beside it: a detached git
worktree of this repository in a temporary folder, removed when the bench ends."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
