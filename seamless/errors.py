"""Errors a user can cause, and the exit codes the command documents.

Every error that reaches the operator is a :class:`SeamlessError`: one line
saying what is wrong, an optional hint saying what to do, and an exit code
that tells a script whether anything on the system was changed.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import IO, Any


class ExitCode(enum.IntEnum):
    OK = 0
    #: An error was found before anything was changed: processes run as before.
    UNCHANGED = 1
    #: The command line was wrong (click's own code for usage errors).
    USAGE = 2
    #: Something failed after the system was changed; the message says what state it is in.
    CHANGED = 3
    #: A check ran and found a problem (for example a corrupt store); nothing was changed.
    CHECK_FAILED = 4
    #: Interrupted by the operator (Ctrl-C).
    INTERRUPTED = 130


class SeamlessError(Exception):
    """An error the operator can understand and act on.

    Not a click exception: the boot-time restorer, which raises these too, starts
    without click (a tenth of its imports, seconds of the blackout under TCG). The
    ``seamless`` command group hands one to click as :class:`seamless.cli.Reported`."""

    def __init__(
        self, message: str, *, hint: str | None = None, exit_code: ExitCode = ExitCode.UNCHANGED
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: What the process exits with.
        self.status = exit_code

    def __str__(self) -> str:
        return self.message

    def format_message(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message

    def show(self, file: IO[Any] | None = None) -> None:
        print(f"seamless: error: {self.format_message()}", file=file or sys.stderr, flush=True)


def need_root(what: str) -> None:
    """Refuse, before anything is touched, a command that needs root ("checkpointing
    processes needs root")."""
    if os.geteuid() != 0:
        raise SeamlessError(f"{what} needs root", hint="run it with sudo")
