"""The process table, read-only: what runs, under which unit and cgroup, and its trees."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from seamless import procfs

PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    name: str  # comm, at most 15 characters
    cmdline: tuple[str, ...]
    user: str
    cgroup: str  # the cgroup v2 path, "/system.slice/redis-server.service"
    rss: int  # bytes
    kthread: bool = False

    @property
    def unit(self) -> str | None:
        """The systemd unit the process runs in (service or scope), from its cgroup."""
        for part in reversed(self.cgroup.split("/")):
            if part.endswith((".service", ".scope")):
                return part
        return None

    @property
    def system_unit(self) -> str | None:
        """The system manager's unit it runs in: the first unit of its cgroup path (a
        user's own units are under ``user@UID.service``, never the system's)."""
        for part in self.cgroup.split("/"):
            if part.endswith((".service", ".scope")):
                return part
        return None

    @property
    def command(self) -> str:
        return " ".join(self.cmdline) if self.cmdline else f"[{self.name}]"


@dataclass
class ProcessTree:
    """A process and all its descendants: what CRIU dumps as one tree."""

    root: ProcessInfo
    members: list[ProcessInfo] = field(default_factory=list)  # root first

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.members]

    @property
    def rss(self) -> int:
        return sum(p.rss for p in self.members)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cgroup(pid: int, proc: Path) -> str:
    for line in _read(f"{proc}/{pid}/cgroup").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
    # cgroup v1: the name=systemd hierarchy carries the unit.
    for line in _read(f"{proc}/{pid}/cgroup").splitlines():
        if ":name=systemd:" in line:
            return line.split(":", 2)[2]
    return ""


def _is_kthread(pid: int, proc: Path) -> bool:
    flags = procfs.stat_field(pid, procfs.FLAGS, Path(proc))
    return flags is not None and flags.isdigit() and bool(int(flags) & PF_KTHREAD)


def read_table(proc: Path = Path("/proc")) -> list[ProcessInfo]:
    """Every process on the system, read from /proc (nothing is stopped or changed)."""
    table: list[ProcessInfo] = []
    attrs = ["pid", "ppid", "name", "cmdline", "username", "memory_info"]
    for p in psutil.process_iter(attrs):
        info = p.info
        pid = int(info["pid"])
        if pid == 0:
            continue
        mem = info.get("memory_info")
        table.append(
            ProcessInfo(
                pid=pid,
                ppid=int(info["ppid"] or 0),
                name=str(info["name"] or ""),
                cmdline=tuple(info["cmdline"] or ()),
                user=str(info["username"] or "?"),
                cgroup=_cgroup(pid, proc),
                rss=int(mem.rss) if mem is not None else 0,
                kthread=_is_kthread(pid, proc),
            )
        )
    return table


def children_map(table: Iterable[ProcessInfo]) -> dict[int, list[ProcessInfo]]:
    children: dict[int, list[ProcessInfo]] = {}
    for p in table:
        children.setdefault(p.ppid, []).append(p)
    for kids in children.values():
        kids.sort(key=lambda p: p.pid)
    return children


def descendants(
    pid: int, children: dict[int, list[ProcessInfo]]
) -> Iterator[ProcessInfo]:
    """All descendants of ``pid``, depth first (not ``pid`` itself)."""
    stack = list(reversed(children.get(pid, [])))
    while stack:
        p = stack.pop()
        yield p
        stack.extend(reversed(children.get(p.pid, [])))


def ancestors(pid: int, by_pid: dict[int, ProcessInfo]) -> list[int]:
    """The pids from ``pid``'s parent up to PID 1."""
    chain: list[int] = []
    seen = {pid}
    p = by_pid.get(pid)
    while p is not None and p.ppid not in seen and p.ppid > 0:
        chain.append(p.ppid)
        seen.add(p.ppid)
        p = by_pid.get(p.ppid)
    return chain

