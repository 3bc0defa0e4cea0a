"""The base commit a bench compares this tree with, checked out beside it: a detached git
worktree of this repository in a temporary folder, removed when the bench ends; the
packages hidden from it that it does not install (`base_and_this`); the rounds that
alternate the two trees (`rounds_in_both`); and the child process a bench runs in either
tree (`tree_env`, `run_in_tree`, `figures_in_tree`): one owner for what tick_cpu,
post_cpu, ceiling, ceiling_instructions and sim_cpu each wrote again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Packages this tree installs that an older base may not (checked in its pyproject.toml):
# hidden from the base's processes (an import of them fails), as the base's install lacks
# them. redis-py uses hiredis whenever it can import it.
NEWER_PACKAGES = ("hiredis",)


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


def hidden_packages(tree: Path) -> list[str]:
    """The packages of NEWER_PACKAGES the tree's pyproject.toml does not name."""
    requirements = (tree / "pyproject.toml").read_text()
    return [name for name in NEWER_PACKAGES if f'"{name}' not in requirements]


def hiding(packages: list[str], folder: Path) -> str:
    """A folder for PYTHONPATH whose sitecustomize.py makes importing `packages` fail in
    every process started with it ("" when there is none to hide)."""
    if not packages:
        return ""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["import sys"] + [f"sys.modules[{name!r}] = None" for name in packages]
    (folder / "sitecustomize.py").write_text("\n".join(lines) + "\n")
    return str(folder)


@contextmanager
def base_and_this(rev: str, tmp: Path) -> Iterator[dict[str, tuple[Path, str]]]:
    """`rev` checked out in `tmp`/base for the bench's while: {"base": (its tree, the
    folder hiding from it the packages it does not install, or ""), "this": (ROOT, "")}.
    Says what is hidden; the base tree is removed afterwards."""
    base = tmp / "base"
    add_base_tree(base, rev)
    try:
        hidden = hidden_packages(base)
        if hidden:
            print(f"hidden from the base: {', '.join(hidden)}", flush=True)
        yield {"base": (base, hiding(hidden, tmp / "hidden")), "this": (ROOT, "")}
    finally:
        remove_base_tree(base)


def rounds_in_both(rev: str, rounds: int, prefix: str) -> Iterator[tuple[int, str, Path, str]]:
    """(round from 1, "base" or "this", the tree, its hiding folder) for each tree in each
    round: `rev` checked out in a temporary folder named `prefix`... for the while
    (`base_and_this`), the two trees' order swapped every round so that neither always
    runs on the busier minute."""
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        base_and_this(rev, Path(tmp)) as trees,
    ):
        for round_ in range(rounds):
            for name in ("base", "this") if round_ % 2 == 0 else ("this", "base"):
                yield round_ + 1, name, *trees[name]


def tree_env(tree: Path, hidden: str = "", **extra: str) -> dict[str, str]:
    """This process's environment for a child that runs `tree`'s code: PYTHONPATH the
    hiding folder (if any), then the tree; `extra` added."""
    path = os.pathsep.join(p for p in (hidden, str(tree)) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_in_tree(
    tree: Path, argv: Sequence[str], hidden: str = "", **extra: str
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in `tree` (its own directory first on sys.path, so its code is the one
    measured) with `tree_env`; its output captured, its exit status left to the caller."""
    return subprocess.run(
        list(argv),
        cwd=tree,
        env=tree_env(tree, hidden, **extra),
        capture_output=True,
        text=True,
        check=False,
    )


def figures_in_tree(tree: Path, code: str, hidden: str = "", **extra: str) -> dict[str, Any]:
    """`python -c code` run in `tree` (`run_in_tree`): the figures it printed last
    (`child_figures`)."""
    return child_figures(run_in_tree(tree, [sys.executable, "-c", code], hidden, **extra), tree)
