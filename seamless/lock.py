"""One lock for everything that writes the store or loads a kernel.

Two `seamless upgrade` or `checkpoint` runs at once would choose the same generation,
delete each other's partial generation, thaw each other's trees and unload each other's
kernel. Each command that writes the store or loads a kernel holds this lock while it
runs (the lazy restore's finisher too, until the generation is wiped); a second one is
refused at once, with who holds it, before it has touched anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from seamless.errors import SeamlessError

#: On tmpfs: a lock never outlives the boot that took it.
LOCK = Path("/run/seamless/lock")

F = TypeVar("F", bound=Callable[..., Any])


def hold(what: str) -> int | None:
    """Take the lock for ``what`` ("seamless upgrade"); returns its descriptor, which holds
    it until closed or the process ends. None when not root (the command refuses then
    anyway). Raises when another seamless holds it."""
    if os.geteuid() != 0:
        return None
    LOCK.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        raise SeamlessError(
            f"another seamless command is running: {holder or 'unknown'}; {what} would "
            "get in its way", hint="wait until it has finished, then run this again") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{what} (PID {os.getpid()})\n".encode(), 0)
    return fd


@contextlib.contextmanager
def held(what: str) -> Iterator[None]:
    fd = hold(what)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def exclusive(what: str) -> Callable[[F], F]:
    """A command that runs holding the lock (see :func:`hold`)."""
    def wrap(command: F) -> F:
        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            with held(what):
                return command(*args, **kwargs)
        return run  # type: ignore[return-value]
    return wrap
