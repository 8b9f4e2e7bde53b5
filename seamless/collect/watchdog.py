"""The freeze watchdog: nothing stays frozen when the coordinator dies.

``python3 -m seamless.collect.watchdog CGROUP...`` is started by the freezer with a
pipe as its stdin. When the pipe ends (the coordinator thawed the trees, or died: killed,
its terminal hung up, out of memory), it thaws the cgroups, and goes on thawing them for
as long as a CRIU still holds a task in them by ptrace (a CRIU freezes the cgroup again
when it lets its tree go). It is in a session of its own and ignores the terminal's and
systemd's polite signals: only SIGKILL ends it early.

It imports nothing else of seamless (the packages above it import nothing either), so
that it starts fast.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

#: How often it thaws while a CRIU holds a task.
INTERVAL = 0.2


def thaw(paths: list[Path]) -> None:
    for p in paths:
        try:
            (p / "cgroup.freeze").write_text("0")
        except OSError:
            pass  # gone: nothing left to thaw


def _tracer(pid: str, proc: Path) -> str | None:
    """The command name of whatever traces ``pid``, or None when nothing does."""
    try:
        status = (proc / pid / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("TracerPid:"):
            tracer = line.split(":", 1)[1].strip()
            if tracer == "0":
                return None
            try:
                return (proc / tracer / "comm").read_text().strip()
            except OSError:
                return None
    return None


def held_by_criu(paths: list[Path], proc: Path = Path("/proc")) -> bool:
    """Whether a CRIU traces any task of these cgroups (or those below them)."""
    for p in paths:
        for root, _, _ in os.walk(p):
            try:
                pids = (Path(root) / "cgroup.procs").read_text().split()
            except OSError:
                continue
            if any(_tracer(pid, proc) == "criu" for pid in pids):
                return True
    return False


def watch(paths: list[Path], stdin: int = 0) -> None:
    while os.read(stdin, 4096):
        pass  # the coordinator writes nothing: only the end matters
    thaw(paths)
    while held_by_criu(paths):
        time.sleep(INTERVAL)
        thaw(paths)
    thaw(paths)


def main() -> None:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    watch([Path(p) for p in sys.argv[1:]])


if __name__ == "__main__":
    main()
