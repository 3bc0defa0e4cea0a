"""The runtime wheel is the product only: `pip wheel . --no-deps` holds no dev tooling, and
what it installs runs without it (the dev-only commands stop in one line).

The wheel is built from a copy of the repository's product files, the way `pip wheel .`
builds it, so that no build/ folder lands in the working tree while other tests run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ["config", "core", "stores", "delivery", "tasks", "api", "admin", "worker"]
DEV_TOOLING = ["devtools", "simulator"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in [*PRODUCT, *DEV_TOOLING]:  # the dev tooling is there, as in a clone
        if (ROOT / package).is_dir():
            shutil.copytree(ROOT / package, source / package, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=170,
    )
    (found,) = out.glob("braze_subs-*.whl")
    return found


def test_the_runtime_wheel_holds_the_product_and_no_dev_tooling(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name}
    assert top == {p for p in PRODUCT if (ROOT / p).is_dir()}, top
    assert not [n for n in names if n.split("/")[0] in DEV_TOOLING]
    assert any(n.startswith("stores/lua/") and n.endswith(".lua") for n in names)


def test_without_the_dev_tooling_simulate_and_demo_stop_in_one_line(
    wheel: Path, tmp_path: Path
) -> None:
    """What the wheel installs runs on its own: `status --help` works; `simulate` and
    `demo` say in one line that they are dev tooling, exit 2, no traceback."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # The installed wheel first on the path; the clone (the dev install's path entry) off it.
    launcher = (
        "import sys; "
        f"sys.path = [{str(target)!r}] + [p for p in sys.path if p not in ('', {str(ROOT)!r})]; "
        "import importlib.util; "
        "assert importlib.util.find_spec('simulator') is None, 'simulator importable'; "
        "from admin.launcher import main; sys.argv[0] = 'braze-subs'; main()"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    help_run = subprocess.run(
        [sys.executable, "-c", launcher, "status", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_run.returncode == 0, help_run.stderr
    for command in ("simulate", "demo"):
        result = subprocess.run(
            [sys.executable, "-c", launcher, command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and "dev tooling" in lines[0], result.stderr
        assert "Traceback" not in result.stderr
