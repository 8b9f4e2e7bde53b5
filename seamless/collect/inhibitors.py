"""What says the machine must not be restarted now, as ``systemctl kexec`` and
unattended-upgrades respect it: a package manager at work (it holds dpkg's lock: a
kernel entered halfway through an upgrade boots with half-installed packages), and
logind's inhibitors that block shutdown (a backup, a burn, an installer).

Read from /proc/locks and logind, before anything is frozen; ``--force`` overrides.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from seamless.log import log
from seamless.run import CommandError, run

#: dpkg's locks: apt and dpkg take the frontend one, dpkg the other.
DPKG_LOCKS = (Path("/var/lib/dpkg/lock-frontend"), Path("/var/lib/dpkg/lock"))


@dataclass(frozen=True)
class Inhibitor:
    who: str
    why: str
    pid: int | None = None

    def __str__(self) -> str:
        return f"{self.who}" + (f" (PID {self.pid})" if self.pid else "") + f": {self.why}"


def _command(pid: int, proc: Path) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return f"PID {pid}"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:80] or f"PID {pid}"


def dpkg_holders(locks: tuple[Path, ...] = DPKG_LOCKS,
                 proc: Path = Path("/proc")) -> list[Inhibitor]:
    """Who holds dpkg's locks now (a POSIX lock in /proc/locks on the lock file's inode)."""
    wanted: dict[tuple[int, int, int], Path] = {}
    for path in locks:
        try:
            st = os.stat(path)
        except OSError:
            continue
        wanted[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = path
    if not wanted:
        return []
    try:
        lines = (proc / "locks").read_text().splitlines()
    except OSError:
        return []
    found: dict[int, Inhibitor] = {}
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6:
            continue  # a waiter, not a holder
        try:
            pid = int(fields[4])
            major, minor, ino = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(ino))
        except ValueError:
            continue
        if key in wanted and pid not in found:
            found[pid] = Inhibitor(_command(pid, proc) if pid > 0 else "a process",
                                   f"holds {wanted[key]}: a package manager is at work",
                                   pid if pid > 0 else None)
    return list(found.values())


def shutdown_inhibitors() -> list[Inhibitor]:
    """logind's inhibitors that block shutdown (``systemd-inhibit --what=shutdown``);
    none when logind does not answer."""
    try:
        result = run(["busctl", "--json=short", "call", "org.freedesktop.login1",
                      "/org/freedesktop/login1", "org.freedesktop.login1.Manager",
                      "ListInhibitors"], timeout=10)
        data = json.loads(result.stdout)
    except (CommandError, OSError, ValueError) as e:
        log.debug("could not ask logind for its inhibitors: %s", e)
        return []
    found = []
    for what, who, why, mode, _uid, pid in (data.get("data") or [[]])[0]:
        if mode == "block" and "shutdown" in str(what).split(":"):
            found.append(Inhibitor(str(who), str(why), int(pid) or None))
    return found


def inhibitors() -> list[Inhibitor]:
    return dpkg_holders() + shutdown_inhibitors()
