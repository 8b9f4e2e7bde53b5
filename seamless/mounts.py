"""The mount table (/proc/self/mounts), read the one way every stage needs it."""

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


def unescape(field: str) -> str:
    """Undo the octal escapes of /proc/self/mounts (``\\040`` is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(path: Path = Path("/proc/self/mounts")) -> list[Mount]:
    """The mounts of this mount namespace, in the order they were mounted."""
    result = []
    for line in path.read_text().splitlines():
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
