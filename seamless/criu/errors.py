"""A CRIU call that failed, with what CRIU said about it.

The message is one line saying which call failed and why, followed by the
last error lines of CRIU's own log (kept next to the images); the hint names
that log.
"""

from __future__ import annotations

import errno as errno_module
import os
import re
from collections.abc import Sequence
from pathlib import Path

from seamless.errors import ExitCode, SeamlessError

#: CRIU's log lines look like ``(00.012345) Error (criu/cr-dump.c:1234): ...``.
_ERROR_LINE = re.compile(r"\b(Error|Fatal)\b")


def errno_text(number: int) -> str:
    name = errno_module.errorcode.get(number, "")
    return f"errno {number}" + (f" {name} ({os.strerror(number)})" if name else "")


def log_tail(log: Path | None, lines: int = 8) -> list[str]:
    """The last error lines of a CRIU log, or its last lines when none says Error."""
    if log is None:
        return []
    try:
        text = log.read_bytes().decode(errors="replace")
    except OSError:
        return []
    all_lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in all_lines if _ERROR_LINE.search(line)]
    return (errors or all_lines)[-lines:]


class CriuError(SeamlessError):
    """A CRIU call failed: it said so, died, or did not answer."""

    def __init__(
        self,
        operation: str,
        reason: str,
        *,
        cr_errno: int | None = None,
        cr_errmsg: str | None = None,
        log: Path | None = None,
        stderr: str = "",
        exit_code: ExitCode = ExitCode.UNCHANGED,
    ) -> None:
        self.operation = operation
        self.reason = reason
        self.cr_errno = cr_errno
        self.cr_errmsg = cr_errmsg.strip() if cr_errmsg else None
        self.log = log
        self.log_tail = log_tail(log)
        self.stderr = stderr
        parts = [f"criu {operation} failed: {reason}"]
        if cr_errno:
            parts.append(errno_text(cr_errno))
        if self.cr_errmsg:
            parts.append(self.cr_errmsg)
        message = "; ".join(parts)
        details: Sequence[str] = self.log_tail
        where = f"last lines of {log}" if log is not None else ""
        if not details and stderr.strip():
            details = stderr.strip().splitlines()[-8:]
            where = "criu's stderr"
        if details:
            message += f"\n{where}:\n" + "\n".join(f"  {line}" for line in details)
        hint = f"CRIU's whole log is {log}" if log is not None and log.exists() else None
        super().__init__(message, hint=hint, exit_code=exit_code)


class CriuDiedError(CriuError):
    """CRIU exited, or was killed, before it answered."""


class CriuTimeoutError(CriuDiedError):
    """CRIU did not answer in time, and was killed."""


class CriuProtocolError(CriuError):
    """CRIU (or whatever runs in its place) answered something that is not the protocol."""


class CriuNotifyError(CriuError):
    """A handler of one of CRIU's notifications failed, so CRIU was told to stop."""
