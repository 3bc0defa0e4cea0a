"""The `braze-subs` command's entry point: `probe` runs without importing the full CLI
(Kubernetes runs it every few seconds); everything else goes to `admin.cli`."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["probe"]:
        from admin.probe import main as probe

        sys.exit(probe(sys.argv[2:]))
    from admin.cli import main as cli

    cli()
