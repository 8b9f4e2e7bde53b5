"""Freeze every tree at the same instant, with the cgroup v2 freezer.

CRIU freezes one tree at a time, when its dump starts: with several trees the
first is frozen while the last still runs, and what they share (a file, a
connection between them) can move in between. So before any dump, every tree
that has a cgroup of its own (a service's cgroup holding that tree and nothing
else, the usual case) is frozen at once by writing ``1`` to each
``cgroup.freeze``. Each CRIU is then told the tree's cgroup (``freeze_cgroup``):
it seizes the frozen tasks, thaws the cgroup while it holds them by ptrace,
and freezes it again when it lets them go. :meth:`Freezer.thaw` thaws them all
together at the end. A tree without a cgroup of its own is frozen by CRIU when
its dump starts, as before; the plan says which.

Nothing may stay frozen if the coordinator dies: a small watchdog process
(:mod:`seamless.collect.watchdog`) holds a pipe from us and thaws the cgroups
when it reads end of file, and again for as long as a CRIU still holds their
tasks (CRIU freezes the cgroup again when it lets go).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from seamless import procfs, stop
from seamless.collect.processes import ProcessTree
from seamless.errors import ExitCode, SeamlessError
from seamless.log import count, log
from seamless.run import spawn

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: How long the freeze of every cgroup may take before we give up and thaw.
FREEZE_TIMEOUT = 10.0
#: How long the cgroups are thawed to let a vfork child run its exec before the next try.
VFORK_PAUSE = 0.02

def cgroup_pids(path: Path, listing: str = "cgroup.procs") -> set[int]:
    """Every process in the cgroup ``path`` and the cgroups below it (every thread, with
    ``listing="cgroup.threads"``)."""
    pids: set[int] = set()
    for root, _, _ in os.walk(path):
        try:
            pids.update(int(x) for x in (Path(root) / listing).read_text().split())
        except (OSError, ValueError):
            continue
    return pids


def _descends_from(pid: int, ancestor: int, proc: Path) -> bool:
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        parent = procfs.stat_field(pid, procfs.PPID, proc)
        if parent is None or not parent.isdigit():
            return False
        pid = int(parent)
        seen += 1
    return pid == ancestor


def own_cgroup(tree: ProcessTree, *, root: Path = CGROUP_ROOT,
               proc: Path = Path("/proc")) -> str | None:
    """The cgroup that holds ``tree`` and nothing else (relative to the cgroup root,
    ``/system.slice/redis-server.service``), or None when it shares its cgroup."""
    paths = {p.cgroup for p in tree.members if p.cgroup.startswith("/")}
    common = os.path.commonpath(sorted(paths)) if paths else "/"
    if common == "/" or not (root / common.lstrip("/") / "cgroup.freeze").exists():
        return None
    members = set(tree.pids)
    for pid in cgroup_pids(root / common.lstrip("/")) - members:
        if not _descends_from(pid, tree.root.pid, proc):  # a child forked since the plan
            return None
    return common


class Freezer:
    """The cgroups of the trees that have one of their own, frozen and thawed together."""

    def __init__(self, cgroups: dict[int, str], *, root: Path = CGROUP_ROOT,
                 watchdog: bool = True, proc: Path = Path("/proc")) -> None:
        #: tree root PID -> its cgroup, relative to ``root``
        self.cgroups = cgroups
        self.root = root
        self.proc = proc
        self.watchdog = watchdog
        self.frozen_at: float | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._frozen: list[Path] = []

    @classmethod
    def for_trees(cls, trees: Sequence[ProcessTree], *, root: Path = CGROUP_ROOT,
                  watchdog: bool = True) -> Freezer:
        # A cgroup holding another tree's processes is not "own": two trees never share one.
        cgroups = {}
        for tree in trees:
            cgroup = own_cgroup(tree, root=root)
            if cgroup is not None:
                cgroups[tree.root.pid] = cgroup
        return cls(cgroups, root=root, watchdog=watchdog)

    def path(self, tree_root: int) -> str | None:
        """The absolute cgroup directory CRIU should freeze for this tree, if any."""
        cgroup = self.cgroups.get(tree_root)
        return None if cgroup is None else str(self.root / cgroup.lstrip("/"))

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze every cgroup and wait until all are frozen; on failure thaw them all
        and raise (nothing changed).

        The kernel counts a parent waiting for its vfork child to exec as frozen, in an
        uninterruptible sleep (D), while the child is frozen before its exec. CRIU can
        never stop such a parent: it seizes the child, and the parent waits for it until
        the dump times out. So when a frozen cgroup holds such a task, every cgroup is
        thawed for a moment (the child runs its exec) and frozen again."""
        paths = [self.root / c.lstrip("/") for c in self.cgroups.values()]
        if not paths:
            return
        if self.watchdog:
            # in a session of its own: the terminal's hangup or Ctrl-C does not reach it
            self._guard = spawn(
                [sys.executable, "-m", "seamless.collect.watchdog", *map(str, paths)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while True:
                self._freeze_once(paths, timeout)
                waiting = {str(p): tids for p in paths if (tids := in_vfork(p, self.proc))}
                if not waiting:
                    break
                if time.monotonic() > deadline:
                    which = "; ".join(f"{p}: {', '.join(map(str, t))}"
                                      for p, t in waiting.items())
                    raise SeamlessError(
                        f"could not freeze within {timeout:.0f} s: a task stays in a vfork, "
                        f"its child not yet run ({which})",
                        hint="the child may be stopped or stuck before its exec: see "
                        "/proc/PID/stack of both; nothing was changed",
                        exit_code=ExitCode.UNCHANGED)
                log.debug("thawing for a moment: a frozen task waits in a vfork (%s)", waiting)
                for path in paths:
                    _write(path / "cgroup.freeze", "0")
                time.sleep(VFORK_PAUSE)
            self.frozen_at = time.monotonic()
        except BaseException:
            self.thaw()
            raise

    def _freeze_once(self, paths: list[Path], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for path in paths:
            _write(path / "cgroup.freeze", "1")
            if path not in self._frozen:
                self._frozen.append(path)
        while not all(_frozen(p) for p in paths):
            if time.monotonic() > deadline:
                slow = [str(p) for p in paths if not _frozen(p)]
                raise SeamlessError(
                    f"could not freeze {', '.join(slow)} within {timeout:.0f} s",
                    hint="a task in it may be in an uninterruptible sleep (D state): "
                    "see its /proc/PID/stack; nothing was changed",
                    exit_code=ExitCode.UNCHANGED)
            time.sleep(0.01)

    def thaw(self) -> None:
        """Thaw every cgroup we froze (all at once), and dismiss the watchdog."""
        with stop.critical():
            self._thaw()

    def _thaw(self) -> None:
        for path in self._frozen:
            try:
                _write(path / "cgroup.freeze", "0")
            except OSError as e:  # the unit ended meanwhile
                log.debug("thawing %s: %s", path, e)
        self._frozen.clear()
        if self._guard is not None:
            guard, self._guard = self._guard, None
            if guard.stdin is not None:
                guard.stdin.close()
            try:
                guard.wait(5)
            except subprocess.TimeoutExpired:
                log.debug("the freeze watchdog is still thawing; leaving it to finish")


def in_vfork(path: Path, proc: Path = Path("/proc")) -> list[int]:
    """The threads of the frozen cgroup ``path`` (and below) in an uninterruptible sleep.

    A frozen cgroup holds none but the parents waiting for a vfork child: the freezer
    counts only them frozen in that state (the kernel's ``wait_for_vfork_done``)."""
    tids = []
    for tid in sorted(cgroup_pids(path, "cgroup.threads")):
        if procfs.stat_field(tid, procfs.STATE, proc) == "D":  # None: gone
            tids.append(tid)
    return tids


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _frozen(path: Path) -> bool:
    try:
        lines = (path / "cgroup.events").read_text().splitlines()
    except OSError:
        return True  # gone: nothing left in it to run
    return "frozen 1" in lines


def describe(freezer: Freezer, trees: Sequence[ProcessTree]) -> str:
    ours = [t for t in trees if t.root.pid in freezer.cgroups]
    rest = [t for t in trees if t.root.pid not in freezer.cgroups]
    text = f"froze {count(len(ours), 'tree')} at once (their cgroups)"
    if rest:
        text += (f"; {count(len(rest), 'tree')} sharing a cgroup with other processes, "
                 "frozen by CRIU as its dump starts: "
                 + ", ".join(str(t.root.pid) for t in rest))
    return text
