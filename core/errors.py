"""The one base for errors a user (an operator, a producer, a file) can cause.

Its message is one line meant for that user; `exit_code` is what the CLI exits with
(1: the input was refused, 2: usage or environment). The CLI has a single handler for the
whole family, so no user mistake ever prints a traceback.
"""

from __future__ import annotations

EXIT_REFUSED = 1
EXIT_ENVIRONMENT = 2


class BrazeSubsError(Exception):
    """A user-facing failure: the message is the whole explanation."""

    exit_code: int = EXIT_ENVIRONMENT


class InputRefused(BrazeSubsError):
    """The input (a change, a row, a file) was refused; nothing was enqueued."""

    exit_code = EXIT_REFUSED
