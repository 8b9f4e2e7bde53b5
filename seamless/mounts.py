"""The mount tables (/proc/self/mounts, /proc/PID/mountinfo), read the one way every
stage needs them.

Both are read as bytes: a mount point's name is whatever bytes its creator chose, and
one that is not UTF-8 must not make the reader raise (it is decoded the way os.fsdecode
does, so it gives back the same bytes to a system call)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo."""

    mount_id: int
    parent_id: int
    device: str  # MAJOR:MINOR
    root: str
    target: str
    fstype: str
    shared: int | None
    master: int | None


def unescape(field: str) -> str:
    """Undo the octal escapes of the mount tables (``\\040`` is a space), byte for byte:
    the result is what :func:`os.fsdecode` makes of the name's bytes."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]),
                              os.fsencode(field)))


def _lines(path: Path) -> list[str]:
    return os.fsdecode(path.read_bytes()).splitlines()


def mounts(path: Path = Path("/proc/self/mounts")) -> list[Mount]:
    """The mounts of this mount namespace, in the order they were mounted."""
    result = []
    for line in _lines(path):
        fields = line.split()
        if len(fields) >= 4:
            source, target, fstype, options = (unescape(f) for f in fields[:4])
            result.append(Mount(source, target, fstype, tuple(options.split(","))))
    return result


def is_block_backed(mount: Mount) -> bool:
    """Whether the filesystem lives on a block device (a disk, a partition, pmem, dm)."""
    if not mount.source.startswith("/"):
        return False
    try:
        return stat.S_ISBLK(os.stat(mount.source).st_mode)
    except OSError:
        return False


def mountinfo(pid: int | str = "self", proc: Path = Path("/proc")) -> list[MountEntry]:
    """The mounts of ``pid``'s mount namespace, in mount order; empty when it is gone."""
    try:
        lines = _lines(proc / str(pid) / "mountinfo")
    except OSError:
        return []
    entries = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 6:
            continue
        shared = master = None
        for tag in fields[6:]:
            key, _, value = tag.partition(":")
            if key == "shared" and value.isdigit():
                shared = int(value)
            elif key == "master" and value.isdigit():
                master = int(value)
        entries.append(MountEntry(int(fields[0]), int(fields[1]), fields[2],
                                  unescape(fields[3]),
                                  unescape(fields[4]), right.split()[0] if right else "?",
                                  shared, master))
    return entries
