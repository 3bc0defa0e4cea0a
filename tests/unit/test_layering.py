"""The architecture as a test: one direction of dependency, dev tooling out of the product.

core <- config <- stores <- delivery <- tasks <- api <- admin <- worker (`api`, the HTTP
ingest API, is an entry point beside `tasks` that loads no delivery code either). A module
may import its own package or any package below it; `devtools` and `simulator` (dev tooling) may be
imported by the product only inside a function (the demo and simulate commands), never at
module level.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["core", "config", "stores", "delivery", "tasks", "api", "admin", "worker"]
DEV_ONLY = {"devtools", "simulator"}
# The pure core does no I/O: none of these may appear in it.
IO_LIBRARIES = {"redis", "httpx", "celery", "kombu", "socket", "subprocess", "requests"}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package imported, imported at module level) for every import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks count as module level
        if isinstance(node, ast.If):
            module_level |= {id(child) for child in node.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], id(node) in module_level) for name in names]
    return found


def product_modules() -> list[tuple[str, Path]]:
    return [
        (package, path) for package in LAYERS for path in sorted((ROOT / package).rglob("*.py"))
    ]


@pytest.mark.parametrize(
    ("package", "path"), product_modules(), ids=lambda v: str(v).split("braze")[-1]
)
def test_imports_point_down_only(package: str, path: Path) -> None:
    rank = LAYERS.index(package)
    for imported, at_module_level in imports(path):
        if imported in LAYERS:
            assert LAYERS.index(imported) <= rank, (
                f"{path.relative_to(ROOT)} imports {imported}, a layer above {package}"
            )
        if imported in DEV_ONLY:
            assert not at_module_level, (
                f"{path.relative_to(ROOT)} imports dev tooling {imported} at module level"
            )
        if package == "core":
            assert imported not in IO_LIBRARIES, f"{path.relative_to(ROOT)} does I/O ({imported})"


def dev_tooling_modules() -> list[Path]:
    return [path for package in sorted(DEV_ONLY) for path in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize("path", dev_tooling_modules(), ids=lambda v: str(v).split("braze")[-1])
def test_dev_tooling_imports_nothing_of_the_entry_points(path: Path) -> None:
    """The demo and the simulator sit beside the product, not above it: they may use the
    producer and the stores, never the admin CLI (which imports them only to run them) nor
    the worker, at any level, so neither side needs the other to import."""
    for imported, _ in imports(path):
        assert imported not in {"admin", "worker"}, (
            f"{path.relative_to(ROOT)} imports {imported}: dev tooling must not import it"
        )


def test_the_admin_cli_loads_no_dev_tooling() -> None:
    """`braze-subs status` must not pay for (or depend on) the simulator's web stack."""
    probe = (
        "import sys, admin.cli; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'simulator', 'devtools', 'starlette', 'uvicorn'}); "
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


# What a producer must never pay for: the HTTP client, the delivery code (poster,
# coalescer, Braze client), Celery, the CLI and web stacks, dev tooling.
HEAVY_FOR_A_PRODUCER = {
    "httpx",
    "httpcore",
    "delivery",
    "celery",
    "kombu",
    "billiard",
    "starlette",
    "uvicorn",
    "typer",
    "rich",
    "prometheus_client",
    "flower",
    "admin",
    "worker",
    "simulator",
    "devtools",
}


def test_the_producer_api_loads_only_what_enqueuing_needs() -> None:
    """`import tasks.producer` in a fresh interpreter: none of the heavy packages load
    (bench/import_cost.py prints the time and module counts)."""
    probe = (
        "import sys, tasks.producer; "
        f"heavy = {sorted(HEAVY_FOR_A_PRODUCER)!r}; "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_the_http_api_loads_no_delivery_code() -> None:
    """The API is a producer too: its application imports no poster, coalescer or httpx."""
    probe = (
        "import sys, api.app; "
        "heavy = {'httpx', 'httpcore', 'delivery', 'celery', 'kombu', 'admin', 'simulator', "
        "'devtools', 'typer', 'rich'}; "
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & heavy)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
