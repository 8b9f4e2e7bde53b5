"""Stopping on a signal, the same way whatever the signal, and never halfway through
putting things back.

SIGTERM (systemd, kill) and SIGHUP (the operator's ssh connection dropped) stop a
command as Ctrl-C does: the exception unwinds through the code that thaws every tree,
unloads the kernel and removes a partial generation. After a hangup the terminal is gone,
so what would be written to it goes nowhere instead of failing that unwinding.

The code that puts things back runs in :func:`critical`: a signal that arrives then is
held until it is done; and a second signal while a command is already stopping is only
noted. (CRIU and the freeze watchdog run in sessions of their own: the terminal's
signals never reach them.)
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

from seamless.log import log

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """Stopped by a signal; the message names it."""


_state = {"stopping": False, "critical": 0}
_pending: list[int] = []


def _raise(signum: int) -> None:
    _state["stopping"] = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def _handler(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGHUP:
        _detach_terminal()
    if _state["stopping"]:
        log.warning("%s: already stopping; waiting until every tree runs again",
                    signal.Signals(signum).name)
        return
    if _state["critical"]:
        if not _pending:
            log.warning("%s: stopping once what runs now is put back",
                        signal.Signals(signum).name)
        _pending.append(signum)
        return
    _raise(signum)


def _detach_terminal() -> None:
    """Point stdin, stdout and stderr at /dev/null: the terminal hung up."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP stop this process as Ctrl-C does (main thread)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold the stopping signals until the block is done (nested blocks are one); then
    stop, if one came."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
    if not _state["critical"] and _pending and not _state["stopping"]:
        signum = _pending[0]
        _pending.clear()
        _raise(signum)


def reset() -> None:
    """Forget any stop (tests)."""
    _state.update(stopping=False, critical=0)
    _pending.clear()
