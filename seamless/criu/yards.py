"""CRIU's yards: where it builds a tree's mount namespace at restore.

A yard is a tmpfs CRIU mounts at ``/tmp/.criu.mntns.XXXXXX`` in its own mount namespace,
which is the host's (a tree without a mount namespace of its own is restored into it).
The host's /tmp is a shared mount, so the yard propagates into every namespace made
while it is there, and CRIU leaves it behind, after a restore that worked as after one
that failed (Debian 13's CRIU 4.1, seen in the stock-server guest). A service started
or restored later then holds a copy of it under its /tmp, hidden by its private /tmp,
and the next upgrade's restore of that service fails: "Can't stat mountpoint
.../.criu.mntns.XXXXXX". So the restore takes the yards away once every CRIU it ran is
done (not before: a tree held for the all or nothing keeps its CRIU, and its yard,
until every tree is made), and the dump leaves out any that a namespace holds from
before.
"""

from __future__ import annotations

import os
from pathlib import Path

from seamless import syscalls
from seamless.log import log
from seamless.mounts import mountinfo

PREFIX = "/tmp/.criu.mntns."


def yards(proc: Path = Path("/proc")) -> set[str]:
    """The yards mounted in this mount namespace (none when it cannot be read: the
    restore goes on either way)."""
    return {m.target for m in mountinfo("self", proc) if m.target.startswith(PREFIX)}


def release(targets: set[str]) -> None:
    """Detach these yards, deepest first (the unmount propagates to the copies other
    namespaces got of them), and remove their directories. A yard that will not go is
    logged, not raised: the restored trees do not need it."""
    for target in sorted(targets, key=len, reverse=True):
        try:
            syscalls.detach_mount(target)
        except (syscalls.SyscallError, ValueError) as e:
            log.warning("could not take away CRIU's leftover mount %s: %s", target, e)
            continue
        try:
            os.rmdir(target)
        except OSError:
            pass
