"""The one reader of a process's /proc entries that both sides of the kexec read: its
stat, its descriptors, the deleted files it holds."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")

#: Fields of /proc/PID/stat, numbered as proc_pid_stat(5) numbers them.
STATE, PPID, FLAGS, STARTTIME = 3, 4, 9, 22


def stat_field(pid: int | str, number: int, proc: Path = PROC) -> str | None:
    """Field ``number`` of ``pid``'s stat (``"self"``: this process's), or None when the
    process is gone or the field is not there. The command name (field 2) may hold
    spaces and parentheses, so the fields are counted from its last ")"."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    index = number - 3
    return fields[index] if 0 <= index < len(fields) and ")" in text else None


def fd_targets(pid: int, proc: Path = PROC) -> Iterator[tuple[str, str]]:
    """Each open descriptor of ``pid`` and what it points at ("socket:[123]"); nothing
    when the process is gone, and no descriptor closed meanwhile."""
    base = proc / str(pid) / "fd"
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        with contextlib.suppress(OSError):
            yield name, os.readlink(base / name)


DELETED = " (deleted)"


def deleted_files(pid: int, proc: Path = PROC) -> Iterator[tuple[str, os.stat_result]]:
    """Each file ``pid`` maps or holds open that was deleted since (a library replaced on
    disk): its path as the process's mount namespace named it, and its stat (through
    /proc, which still reaches it); nothing when the process is gone."""
    base = proc / str(pid)
    links = [(base / "fd" / fd, target) for fd, target in fd_targets(pid, proc)]
    with contextlib.suppress(OSError), open(base / "maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6:
                links.append((base / "map_files" / parts[0], parts[5].rstrip("\n")))
    for link, target in links:
        if target.startswith("/") and target.endswith(DELETED):
            with contextlib.suppress(OSError):
                yield target.removesuffix(DELETED), os.stat(link)
