"""Logging and timed progress steps, on stderr (stdout is for results), and into the
journal of the boot they belong to for the commands that change something."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import stat
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("seamless")

_depth = 0


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


#: Where syslog (journald's /dev/log) and the kernel's log (which journald reads from a
#: boot's start, the initramfs's included) take messages. Tests point them elsewhere.
SYSLOG = "/dev/log"
KMSG = "/dev/kmsg"


class KmsgHandler(logging.Handler):
    """One record per write to /dev/kmsg, as ``<PRI>seamless: message``: in an initramfs
    there is no journald yet, but the journal of the boot reads the kernel's log."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.INFO)
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        level = 3 if record.levelno >= logging.ERROR else 4 if record.levelno >= logging.WARNING \
            else 6
        # /dev/kmsg takes at most about 1 KiB per record; a progress line is far shorter
        line = f"<{level}>seamless: {self.format(record).strip()}"[:1000]
        try:
            os.write(self.fd, line.encode(errors="replace") + b"\n")
        except OSError:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """The journal is a second copy: a failed write never disturbs the command."""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        super().close()


class _Syslog(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """As :meth:`KmsgHandler.handleError`: journald gone is no error of ours."""


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def stderr_is_the_journal() -> bool:
    """Whether stderr is the journal's stream: $JOURNAL_STREAM names its device and inode
    (systemd sets it for a unit's processes; a child whose stderr is a pipe inherits the
    variable, so it is checked against the descriptor itself, as systemd.exec(5) says)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def log_to_journal() -> logging.Handler | None:
    """Also send INFO and above to the journal: through syslog (``/dev/log``) when
    journald listens there, else to the kernel's log (``/dev/kmsg``, the initramfs).
    Nothing when stderr already goes to the journal (a unit: $JOURNAL_STREAM) or when
    neither is there. Returns the handler added."""
    handler: logging.Handler
    if stderr_is_the_journal():
        return None
    if _is_socket(SYSLOG):
        try:
            handler = _Syslog(
                address=SYSLOG, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            return None
        handler.ident = f"seamless[{os.getpid()}]: "
    elif os.access(KMSG, os.W_OK):
        try:
            handler = KmsgHandler(KMSG)
        except OSError:
            return None
    else:
        return None
    handler.setLevel(logging.INFO)
    # progress lines are indented under their step on a terminal, not in the journal
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    return handler


def journal_only(level: int, text: str) -> None:
    """``text`` to the journal handlers alone (an error the terminal shows otherwise)."""
    record = log.makeRecord(log.name, level, __file__, 0, text, (), None)
    for handler in log.handlers:
        if not isinstance(handler, logging.StreamHandler):
            handler.handle(record)


@contextlib.contextmanager
def complete_step(text: str) -> Iterator[None]:
    """Log ``text`` as a progress line, nested under any enclosing step, with its duration."""
    global _depth
    indent = "  " * _depth
    log.info("%s‣ %s", indent, text)
    start = time.monotonic()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    log.info("%s  %s done in %.2f s", indent, text, time.monotonic() - start)


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless one: "1 tree", "3 trees"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
