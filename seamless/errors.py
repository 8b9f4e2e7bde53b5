"""Errors a user can cause, and the exit codes the command documents.

Every error that reaches the operator is a :class:`SeamlessError`: one line
saying what is wrong, an optional hint saying what to do, and an exit code
that tells a script whether anything on the system was changed.
"""

from __future__ import annotations

import enum
import os
from typing import IO, Any

import click


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


class SeamlessError(click.ClickException):
    """An error the operator can understand and act on."""

    def __init__(
        self, message: str, *, hint: str | None = None, exit_code: ExitCode = ExitCode.UNCHANGED
    ) -> None:
        super().__init__(message)
        self.hint = hint
        #: What the process exits with (click's own ``exit_code`` is a class constant,
        #: so only seamless.cli.main() exits with it).
        self.status = exit_code

    def format_message(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"seamless: error: {self.format_message()}", err=True, file=file)


def need_root(what: str) -> None:
    """Refuse, before anything is touched, a command that needs root ("checkpointing
    processes needs root")."""
    if os.geteuid() != 0:
        raise SeamlessError(f"{what} needs root", hint="run it with sudo")
