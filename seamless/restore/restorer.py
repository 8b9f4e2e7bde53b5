"""Bring the checkpointed trees back: one CRIU restore per tree, in the recorded order.

Each tree comes back with its PIDs, in its own cgroup (so systemd finds a
service's processes where it left them).  A tree that fails does not stop the
others; the report says which failed and why.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from seamless import faults, procfs, runtime, safepath
from seamless.criu import (
    CgroupMode,
    CriuOptions,
    CriuResult,
    CriuTimeoutError,
    InheritFd,
    NetworkLock,
    Notification,
    NotifyHandler,
    yards,
)
from seamless.errors import SeamlessError
from seamless.log import log
from seamless.memstore.handoff import JOURNALD_STDOUT, TREE_INFO, TreeInfo, read_tree_info
from seamless.memstore.records import TreeRecord
from seamless.restore import netlock
from seamless.restore.lazy import Pager, kill_tree
from seamless.run import run


class Restorer(Protocol):
    """What restores a tree (:class:`seamless.criu.Criu` does)."""

    def restore(
        self, images_dir: Path, options: CriuOptions | None = None,
        on_notify: Mapping[str, NotifyHandler] | None = None,
    ) -> CriuResult: ...

    def features(self, *names: str) -> dict[str, bool]: ...


@dataclass
class TreeRestore:
    root: int
    unit: str | None
    command: str
    restored: bool
    pid: int | None = None
    seconds: float = 0.0
    error: str | None = None
    #: Already running when this restore began (restored by an earlier attempt).
    earlier: bool = False
    #: Its memory comes back while it runs (a lazy restore).
    lazy: bool = False
    #: The addresses the restore put up for its sockets ("10.0.2.15/24 on eth0").
    addresses: list[str] = field(default_factory=list)
    #: For each leased address of them, the .network file networkd managed it with in
    #: the old boot ("" when not known): the files told to keep it.
    network_files: list[str] = field(default_factory=list)
    #: Its cgroup in the old boot ("/system.slice/nginx.service").
    cgroup: str = ""
    #: Seconds it waited, made, for the other trees (all or nothing). Its own clocks ran
    #: meanwhile: CRIU sets a tree's monotonic clock when it begins to make the tree.
    held: float = 0.0


@dataclass
class RestoreReport:
    trees: list[TreeRestore] = field(default_factory=list)
    seconds: float = 0.0
    #: By tree root: the daemons still bringing back the memory of lazily restored trees.
    pagers: dict[int, Pager] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(t.restored for t in self.trees)

    @property
    def failed(self) -> list[TreeRestore]:
        return [t for t in self.trees if not t.restored]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": self.seconds, "trees": [asdict(t) for t in self.trees]}


#: The name CRIU gives the copy of a deleted file it restores (a ghost: a library
#: replaced on disk since the process mapped it, say) while the tree's tasks open it.
GHOST = re.compile(r"\.cr\.[0-9a-f]+\.ghost$")
PROC = Path("/proc")
#: How long a held tree waits for the one released before it to end (see :class:`Hold`).
RELEASE_WAIT = 60.0


class Hold:
    """All or nothing: each tree waits at CRIU's post-restore, made but not yet run,
    until every tree of the restore got there; then they all run, or none does (CRIU
    kills each held tree before it ran an instruction of its own). The dump holds its
    trees the same way, at post-dump.

    The trees are let go one after the other, in the order they were made, each once the
    CRIU of the one before has ended: they start running in the order a restore without
    the hold runs them, and CRIU removes a tree's ghost files only after its
    post-restore. A held tree's clocks run while it waits (CRIU set its monotonic clock
    when it began to make it), so the hold must stay short: a tree's idle connections
    and timers see it pass (nginx closed a keep-alive connection idle for its 65 s,
    when the stock server's trees were held 90 s by a slow page check).

    Two trees that map the same replaced library get ghosts of the same name
    (``libc.so.6.cr.5.ghost``), so a held tree's ghosts are moved aside while it waits
    (the next tree's CRIU would find the name taken), and put back when it is let go."""

    def __init__(self, move: Callable[[int], list[tuple[Path, Path]]] | None = None) -> None:
        """``move(root)``: moves tree ``root``'s ghosts aside (default
        :func:`move_ghosts`), returns each (ghost, aside)."""
        self._move = move or move_ghosts
        self._made: dict[int, threading.Event] = {}
        self._ended: dict[int, threading.Event] = {}
        self._verdict = threading.Event()
        self._lock = threading.Lock()
        self._last: int | None = None  # the tree made last
        #: Why no tree may run, once one could not be made.
        self.reason: str | None = None

    def _event(self, events: dict[int, threading.Event], root: int) -> threading.Event:
        with self._lock:
            return events.setdefault(root, threading.Event())

    def made(self, root: int) -> str | None:
        """In tree ``root``'s post-restore: wait for the verdict; why it must not run."""
        moved = self._move(root)
        with self._lock:
            before, self._last = self._last, root
        self._event(self._made, root).set()
        self._verdict.wait()
        if before is not None and not self._event(self._ended, before).wait(RELEASE_WAIT):
            log.warning("tree %d is let go before tree %d ended", root, before)
        put_back(moved)
        return None if self.reason is None else f"not run: {self.reason} (all or nothing)"

    def ended(self, root: int) -> None:
        """Tree ``root``'s CRIU call ended (its ghosts are gone)."""
        self._event(self._ended, root).set()

    def wait_made(self, root: int, worker: threading.Thread) -> bool:
        """Whether tree ``root`` got to post-restore (False: its restore ended first)."""
        event = self._event(self._made, root)
        while not event.wait(0.05):
            if not worker.is_alive():
                return event.is_set()
        return True

    def refuse(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self._verdict.set()

    def go(self) -> None:
        self._verdict.set()


def move_ghosts(root: int, proc: Path | None = None) -> list[tuple[Path, Path]]:
    """Move aside the ghost files of tree ``root``: each file in the directory of a
    deleted file the tree's tasks map or hold open, named as CRIU names a ghost, with
    that file's inode (the task opened the ghost through a link CRIU has removed since).
    Each is renamed where it is (``NAME.seamless-ROOT``), through the task's own root or,
    where that is read-only (a sandbox's /usr), through this mount namespace's same file.
    Returns each (ghost, aside) moved."""
    proc = proc or PROC
    moved: list[tuple[Path, Path]] = []
    seen: set[tuple[int, int]] = set()
    for pid in _tree_pids(root, proc):
        for path, mapped in procfs.deleted_files(pid, proc):
            parent = Path(path).parent
            theirs = proc / str(pid) / "root" / parent.relative_to("/")
            try:
                names = [n for n in os.listdir(theirs) if GHOST.search(n)]
            except OSError:
                continue
            for name in names:
                try:
                    st = os.stat(theirs / name)
                except OSError:
                    continue
                if not os.path.samestat(st, mapped) or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                aside = _move_aside((theirs / name, parent / name), root)
                if aside is not None:
                    moved.append(aside)
    return moved


def _move_aside(ghost: tuple[Path, Path], root: int) -> tuple[Path, Path] | None:
    theirs, ours = ghost
    for path in (theirs, ours):
        aside = path.with_name(f"{path.name}.seamless-{root}")
        try:
            if path == ours and not os.path.samestat(os.stat(ours), os.stat(theirs)):
                continue
            os.rename(path, aside)
        except OSError:
            continue
        return path, aside
    log.warning("could not move aside %s of tree %d: a tree restored after it may find "
                "its name taken", ours, root)
    return None


def put_back(moved: list[tuple[Path, Path]]) -> None:
    for ghost, aside in moved:
        try:
            os.rename(aside, ghost)
        except OSError as e:
            log.warning("could not put back %s: %s", ghost, e)


def _tree_pids(root: int, proc: Path) -> list[int]:
    """``root`` and every process under it (from each task's ``children``)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for children in (proc / str(pid) / "task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo += [int(c) for c in children.read_text().split()]
    return pids


def journal_stream(identifier: str, unit: str | None = None) -> int:
    """A new stdout stream to journald, as systemd gives a service (its header first)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(JOURNALD_STDOUT)
        sock.shutdown(socket.SHUT_RD)
        # identifier, unit, priority, level prefix, to syslog, to kmsg, to console
        header = f"{identifier}\n{unit or ''}\n6\n1\n0\n0\n0\n"
        sock.sendall(header.encode())
    except OSError:
        sock.close()
        raise
    return sock.detach()


def null_stream() -> int:
    return os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)


def restore_options(inherit: tuple[InheritFd, ...], lazy: bool = False,
                    mount_namespace: bool = False) -> CriuOptions:
    """``mount_namespace``: the tree has a mount namespace of its own (a sandboxed
    service): CRIU makes it again, its root the real root (this process's, chrooted
    there), binding each mount the dump found external from the same path.

    --ext-unix-sk always, as the dump has it: CRIU's restore refuses any socket whose
    peer the dump found outside the tree ("External socket found in image") without it,
    whether the peer is bound at a path (syslog's /dev/log) or at an abstract name, and
    it changes nothing for a tree without one."""
    return CriuOptions(
        root="/" if mount_namespace else None,
        auto_ext_mnt=mount_namespace,
        ext_sharing=mount_namespace,
        ext_masters=mount_namespace,
        lazy_pages=lazy,
        shell_job=True,
        tcp_established=True,
        network_lock=NetworkLock.NFTABLES,  # as dumped: see dump_options
        file_locks=True,
        ext_unix_sk=True,  # as dumped: see dump_options
        inherit_fd=inherit,
        manage_cgroups=CgroupMode.SOFT,  # back into the unit's cgroup, created if missing
        # A network namespace's sysctl that the new kernel lacks (going back from 6.12
        # to 6.1, say) is skipped, not fatal: the namespace works without it.
        weak_sysctls=True,
    )


def trees_in(images_root: Path, listed: Sequence[TreeRecord] | None = None
             ) -> list[tuple[Path, TreeInfo]]:
    """The trees of a checkpoint, in restore order (the order they were dumped in);
    with ``listed`` (its manifest's trees), only those. A tree whose record does not
    read is left out, as one that is not listed."""
    names = None if listed is None else {str(t.root) for t in listed}
    found = []
    for info_file in images_root.glob(f"*/{TREE_INFO}"):
        tree = info_file.parent.name
        if names is not None and tree not in names:
            log.debug("not restoring %s: the generation's manifest does not list it", tree)
            continue
        try:
            info = read_tree_info(info_file.parent)
        except (OSError, ValueError, TypeError) as e:
            log.warning("not restoring %s: its %s does not read (%s)", tree, TREE_INFO, e)
            continue
        found.append((info_file.parent, info))
    return sorted(found, key=lambda t: t[1].order)


def restore_all(
    images_root: Path,
    criu: Restorer,
    *,
    stream: Callable[[str, str | None], int] | None = None,
    progress: Callable[[str], None] = log.info,
    skip: Mapping[str, str] | None = None,
    running: Mapping[int, int] | None = None,
    pager: Callable[[Path], Pager] | None = None,
    nft: netlock.Runner | None = None,
    gate: Callable[[str], str | None] | None = None,
    listed: Sequence[TreeRecord] | None = None,
    deadline: float | None = None,
    report: RestoreReport | None = None,
    hold: Hold | None = None,
) -> RestoreReport:
    """Restore every tree under ``images_root``; failures are reported, not raised.

    ``stream(identifier, unit)`` opens what replaces a tree's journald streams
    (default: a new journal stream, or /dev/null when journald does not answer).
    ``skip`` maps a tree's directory name to why it must not be restored (for
    example a corrupt image): such a tree is reported failed with that reason.
    ``running`` maps a tree's root PID to the PID an earlier attempt restored it as:
    such a tree is reported restored and not restored again (a retry after a failure).
    ``pager(images_dir)``: restore lazily, with the daemon it starts serving the tree's
    memory (:meth:`Pager.start`); the report keeps the daemons of the trees restored.
    ``nft`` runs the nftables commands that lock the trees' TCP connections again
    (default: libnftables; see :mod:`.netlock`).
    ``gate(name)``: asked for each tree (by its directory name) once CRIU has made it and
    before it runs (CRIU's post-restore); it may wait, and when it returns a reason CRIU
    kills the tree instead, which is then reported failed with that reason (the page
    images are verified while the trees are restored: see :class:`.boot.PageCheck`).
    ``listed``: the trees the generation's manifest lists, exactly those are restored
    (one whose images are not there is reported failed).
    ``deadline`` (``time.monotonic()``): no tree is begun after it, each is reported
    not restored, and the boot goes on (each CRIU call has its own bound too: see
    :data:`RESTORE_TIMEOUT`).
    ``report``: the report to fill (and returned), so that a caller knows which trees
    came back when something no tree catches ends the restore.
    ``hold``: all or nothing (see :class:`Hold`): each tree's CRIU runs in a thread of
    its own, and waits at post-restore until every tree is made; the first tree that
    cannot be made (or is not begun) refuses them all, and the rest are not begun.
    """
    report = RestoreReport() if report is None else report
    start = time.monotonic()
    trees = trees_in(images_root, listed)
    there = {d.name for d, _ in trees}
    report.trees += [TreeRestore(t.root, t.unit, t.command, restored=False,
                                 error="its images are not in the generation")
                     for t in listed or [] if str(t.root) not in there]
    todo = [(d, i) for d, i in trees if not (running and i.root in running)
            and not (skip and d.name in skip)]
    # Every path a tree needs is made before the first tree runs: a tree that runs could
    # put its own links there (see seamless.safepath).
    unready = {d.name: why for d, i in todo if (why := make_paths(i)) is not None}
    # CRIU's yards it leaves behind, taken away once every CRIU is done (see
    # seamless.criu.yards): while trees are held, each CRIU still uses its own
    yards_before = yards.yards() if any(i.mount_namespace for _, i in todo) else None
    locked, loopback = lock_connections(todo, nft)
    streams = connect_streams([i for _, i in todo])

    def restore_one(images_dir: Path, info: TreeInfo, tree: TreeRestore) -> None:
        try:
            _restore_tree(images_dir, info, tree, criu, report, stream, pager, progress,
                          gate, streams, hold)
        finally:
            if hold is not None:
                hold.ended(tree.root)
            if tree.root in locked:  # CRIU unlocks after a restore; not after a failure
                netlock.unlock(tree.root, nft, locked[tree.root])

    workers: list[threading.Thread] = []
    try:
        for images_dir, info in trees:
            tree = TreeRestore(info.root, info.unit, info.command, restored=False,
                               cgroup=info.cgroup)
            report.trees.append(tree)
            if running and tree.root in running:
                tree.restored, tree.earlier, tree.pid = True, True, running[tree.root]
                progress(f"tree {tree.root} ({tree.command[:50]}) runs already: not restored again")
                continue
            why_not = ((skip or {}).get(images_dir.name) or unready.get(images_dir.name)
                       or _not_begun(hold, deadline))
            if why_not is not None:
                tree.error = why_not
                progress(f"NOT restoring tree {tree.root} ({tree.command[:50]}): {tree.error}")
                if hold is not None:
                    hold.refuse(_refusal(tree))
                continue
            if hold is None:
                restore_one(images_dir, info, tree)
                if tree.restored and sum(t.restored and not t.earlier for t in report.trees) == 1:
                    faults.point("restored-one")
                continue
            worker = threading.Thread(target=restore_one, args=(images_dir, info, tree),
                                      name=f"seamless-restore-{tree.root}", daemon=True)
            worker.start()
            workers.append(worker)
            if not hold.wait_made(tree.root, worker):
                worker.join()
                hold.refuse(_refusal(tree))
            elif len(workers) == 1:
                faults.point("restored-one")  # made and held: the first tree is back
        if hold is not None:
            hold.go()
            for worker in workers:
                worker.join()
    except BaseException as e:
        if hold is not None:  # no held tree may run: CRIU kills each
            hold.refuse(f"the restore was interrupted: {e}")
            for worker in workers:
                worker.join()
        # Something no tree catches (an interruption, a bug): no tree may run on with
        # memory that will never arrive, and no connection stays locked.
        for root, lazy in report.pagers.items():
            lazy.stop()
            kill_tree(root)
        for root, name in locked.items():
            netlock.unlock(root, nft, name)
        raise
    finally:
        if loopback:
            netlock.unlock_loopback(nft)
        for fd in streams.values():  # an end whose tree was not restored
            os.close(fd)
        if yards_before is not None:
            yards.release(yards.yards() - yards_before)
    report.seconds = time.monotonic() - start
    return report


def lock_connections(todo: list[tuple[Path, TreeInfo]], nft: netlock.Runner | None
                     ) -> tuple[dict[int, str], bool]:
    """Lock again every TCP connection of the trees to restore, before any tree's address
    comes up: the root of each tree locked and its table; and those over loopback,
    between two trees, until every tree is back (True when they are locked)."""
    locked: dict[int, str] = {}
    for d, i in todo:
        if i.connections:
            name = netlock.table(i.root, d)
            if netlock.lock(i.root, i.connections, nft, name):
                locked[i.root] = name
    return locked, netlock.lock_loopback([c for _, i in todo for c in i.loopback], nft)


def _not_begun(hold: Hold | None, deadline: float | None) -> str | None:
    """Why the next tree is not begun: the all or nothing was refused, or time is up."""
    if hold is not None and hold.reason is not None:
        return f"not begun: {hold.reason} (all or nothing)"
    if deadline is not None and time.monotonic() > deadline:
        return "not begun: the restore ran out of time"
    return None


def _refusal(tree: TreeRestore) -> str:
    return (f"tree {tree.root} ({tree.command[:50]}) could not be restored: "
            + (tree.error or "?").splitlines()[0])


def _restore_tree(
    images_dir: Path, info: TreeInfo, tree: TreeRestore, criu: Restorer,
    report: RestoreReport, stream: Callable[[str, str | None], int] | None,
    pager: Callable[[Path], Pager] | None, progress: Callable[[str], None],
    gate: Callable[[str], str | None] | None = None,
    streams: dict[int, int] | None = None,
    hold: Hold | None = None,
) -> None:
    """Restore one tree (see :func:`restore_all`); a failure is recorded in ``tree``.
    ``streams``: the ends of the stream connections between trees, by the inode each
    replaces (see :func:`connect_streams`); this tree's are taken out."""
    fds: list[int] = []
    refused: list[str] = []

    def before_it_runs(_: Notification) -> None:
        reason = gate(images_dir.name) if gate is not None else None
        if reason is None and hold is not None:
            made = time.monotonic()
            progress(f"made tree {tree.root} ({tree.command[:50]}), held "
                     f"({memory_available()})")
            reason = hold.made(tree.root)
            tree.held = time.monotonic() - made
        if reason is not None:
            refused.append(reason)
            raise SeamlessError(reason)
    try:
        tree.addresses = bring_up_addresses(info.addresses)
        tree.network_files = [str(a.get("network_file", "")) for a in info.addresses
                              if "valid_until" in a and _added(a) in tree.addresses]
        inherit = []
        for external in info.external:
            if external.startswith("file["):
                fd = reopen_foreign(info.foreign_files.get(external),
                                    tree.root, len(fds))
                fds.append(fd)
                inherit.append(InheritFd(external, fd))
                continue
            inode = external.removeprefix("unix[").removesuffix("]")
            end = streams.pop(int(inode), None) if streams and inode.isdigit() else None
            fd = end if end is not None else _open_stream(stream, tree)
            fds.append(fd)
            # as the socket it replaces was: CRIU leaves an inherited file as it is
            os.set_blocking(fd, not inode.isdigit() or int(inode) not in info.nonblocking)
            inherit.append(InheritFd(f"socket:[{inode}]", fd))
        lazy = pager(images_dir) if pager is not None else None
        try:
            result = criu.restore(images_dir, restore_options(tuple(inherit), lazy is not None,
                                                  info.mount_namespace),
                                  {"post-restore": before_it_runs}
                                  if gate is not None or hold is not None else None)
        except BaseException:
            if lazy is not None:
                lazy.stop()
            raise
        if lazy is not None:
            report.pagers[tree.root] = lazy
            tree.lazy = True
        tree.restored = True
        tree.pid = result.pid
        tree.seconds = result.seconds
        progress(f"restored tree {tree.root} ({tree.command[:50]}) in {result.seconds:.2f} s"
                 + (f", held {tree.held:.2f} s of it" if tree.held else "")
                 + (" (its memory arrives while it runs)" if tree.lazy else ""))
    except (SeamlessError, OSError, ValueError) as e:  # CriuError is one
        if isinstance(e, CriuTimeoutError):
            # CRIU was killed in the middle: what it made of the tree (its PIDs were
            # kept free for it) must not run on half restored
            kill_tree(tree.root, within=0)
        # A page image too short for CRIU fails it before the gate: the check says why.
        reason = refused[0] if refused else gate(images_dir.name) if gate is not None else None
        tree.error = reason or str(e)
        progress(f"FAILED to restore tree {tree.root} ({tree.command[:50]}): "
                 f"{tree.error.splitlines()[0]}")
    finally:
        for fd in fds:
            os.close(fd)


def memory_available() -> str:
    """The memory the kernel says is available, for the log ("812 MiB available")."""
    import psutil  # only here: its import is a tenth of the restorer's start

    try:
        return f"{psutil.virtual_memory().available >> 20} MiB available"
    except (OSError, ValueError):
        return "memory available unknown"


def connect_streams(infos: list[TreeInfo]) -> dict[int, int]:
    """A new socket pair for each unix stream connection between two trees (recorded as
    ``streams`` by the checkpoint), each end by the inode of the socket it replaces, with
    the bytes each end had queued, unread, queued in it again. An end whose peer is not in
    ``infos`` (its tree is not restored) gets a pair whose other end is closed: it reads
    the end of the stream, as when a peer goes away."""
    ends = {int(s["inode"]): s for info in infos for s in info.streams}
    fds: dict[int, int] = {}
    for inode, end in ends.items():
        if inode in fds:
            continue
        peer = ends.get(int(end["peer"]))
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for sender, queue in ((theirs, end.get("queue")),
                                  (mine, peer.get("queue") if peer else None)):
                data = base64.b64decode(queue or "")
                if data:
                    sender.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + (1 << 16))
                    sender.sendall(data)
        except OSError:
            mine.close()
            theirs.close()
            raise
        fds[inode] = mine.detach()
        if peer is not None:
            fds[int(end["peer"])] = theirs.detach()
        else:
            theirs.close()
    if ends:
        log.info("connected %d unix stream connections between trees again", len(ends) // 2)
    return fds


#: setsockopt(2): a send buffer larger than the limit, for root (asm-generic/socket.h).
SO_SNDBUFFORCE = 32


def make_paths(info: TreeInfo) -> str | None:
    """Make what a tree needs on the new boot's filesystems and cannot find there: its
    runtime files, the directories of its bound unix sockets, its named pipes on tmpfs.
    Returns why the tree cannot be restored, or None."""
    runtime.recreate(info.runtime_files)
    try:
        recreate_dirs(info.socket_dirs)
        recreate_fifos(info.fifos)
    except (OSError, SeamlessError) as e:  # safepath.UnsafePath is a SeamlessError
        return f"cannot make what it needs: {e}"
    return None


def recreate_dirs(dirs: list[dict[str, Any]]) -> None:
    """Make the directories of a tree's bound unix sockets again when the new boot has
    none (a cleaned /tmp): CRIU binds the sockets there."""
    for d in dirs:
        if safepath.make_dir(str(d["path"]), int(d["uid"]), int(d["gid"]), int(d["mode"])):
            log.info("made %s again for the sockets bound in it", d["path"])


#: How long one tree's restore may take before CRIU is killed and the tree reported
#: failed (the whole restore at boot has a bound too: see boot.RESTORE_BUDGET).
RESTORE_TIMEOUT = 300.0

#: Where the restore makes the named pipes that replace another namespace's.
PIPES = Path("/run/seamless/pipes")


def new_pipe(root: int, n: int, directory: Path = PIPES) -> int:
    """A new named pipe, open (read-write: no wait for a peer), for a tree's pipe from
    another mount namespace (logind's session pipe): nobody else holds it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{root}-{n}"
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def reopen_foreign(record: dict[str, Any] | None, root: int, n: int) -> int:
    """What a tree gets in place of a file it held from another mount namespace (see
    ``foreign_files``): a new named pipe for a pipe (nobody else holds it; an older record
    without a kind is one), the same path opened again with the same flags for a device
    or a file, a regular file at the same offset."""
    if record is None or record.get("kind", "fifo") == "fifo":
        return new_pipe(root, n)
    flags = int(record.get("flags", os.O_RDONLY))
    keep = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC
    fd = safepath.open_file(str(record["path"]), (flags & keep) | os.O_NOCTTY)
    if record.get("kind") == "file" and not flags & os.O_APPEND:
        os.lseek(fd, int(record.get("pos", 0)), os.SEEK_SET)
    return fd


def recreate_fifos(fifos: list[dict[str, Any]]) -> None:
    """Make a tree's named pipes on tmpfs again (the new boot's /run has none): CRIU
    reopens each by its path."""
    for f in fifos:
        if safepath.make_fifo(str(f["path"]), int(f["uid"]), int(f["gid"]), int(f["mode"])):
            log.info("made the named pipe %s again", f["path"])


def bring_up_addresses(addresses: list[dict[str, Any]],
                       present: Callable[[], set[str]] | None = None,
                       command: Callable[[list[str]], bool] | None = None,
                       now: float | None = None) -> list[str]:
    """Put the addresses a tree's TCP sockets need (see ``Network.addresses``) on
    their interfaces when the new boot has not yet (its network is configured later):
    CRIU binds the sockets and connects the connections there, and clients reach a
    listening service at once. The network manager takes them over as it configures
    the interface (DHCP gives the same lease back). A leased address gets the time its
    lease has left, and none whose lease has run out. Returns what was added."""
    if not addresses:
        return []
    present = present or _local_addresses
    command = command or _ip
    now = time.time() if now is None else now
    have = present()
    added = []
    routed: set[tuple[str, str]] = set()
    for a in addresses:
        if a["address"] in have:
            continue
        interface, address = str(a["interface"]), str(a["address"])
        lifetime = []
        if "valid_until" in a:
            valid = int(a["valid_until"] - now)
            if valid <= 0:
                log.warning("not putting %s on %s: its lease ran out", address, interface)
                continue
            preferred = max(0, min(valid, int(a.get("preferred_until", now) - now)))
            lifetime = ["valid_lft", str(valid), "preferred_lft", str(preferred)]
        command(["link", "set", interface, "up"])
        extra = ["nodad"] if ":" in address else []  # usable at once, not tentative
        if command(["addr", "add", f"{address}/{int(a['prefix'])}", "dev", interface,
                    *extra, *lifetime]):
            added.append(_added(a))
            log.info("put %s/%s on %s for the tree's sockets", address, a["prefix"],
                     interface)
        if a.get("gateway") and (interface, a["gateway"]) not in routed:
            routed.add((interface, a["gateway"]))
            command(["route", "add", "default", "via", str(a["gateway"]), "dev", interface])
        have.add(address)
    return added


def _added(address: Mapping[str, Any]) -> str:
    """How :func:`bring_up_addresses` names an address it put up."""
    return f"{address['address']}/{address['prefix']} on {address['interface']}"


#: Where systemd-networkd reads its .network files; a drop-in of /run applies to a file
#: of the same name in any of them.
NETWORKD_DIRS = ("etc/systemd/network", "run/systemd/network", "usr/local/lib/systemd/network",
                 "usr/lib/systemd/network", "lib/systemd/network")
NETWORKD_KEEP = "50-seamless-keep-leases.conf"


def keep_leases_through_networkd(root: Path = Path("/"),
                                 files: Iterable[str] = ()) -> list[Path]:
    """Once the restore has put leased addresses back (see :func:`bring_up_addresses`):
    systemd-networkd, as it starts, removes every address it did not configure itself,
    and adds the same one again only once its DHCP client has the lease back, so a
    restored service would not answer for that long (measured: removed, then added again
    0.2 s later with QEMU's DHCP; a real network's DHCP takes longer). For this boot
    (/run), the .network files that managed those leases in the old boot (``files``,
    their names; "" for a lease whose file is not known, or none given: every .network
    file) keep the dynamic addresses they find (``KeepConfiguration=dhcp``, which
    systemd 252 and 257 read alike; networkd then gives its own lease an unlimited
    lifetime until the next boot). An operator's own KeepConfiguration= is left as it
    is. Returns the drop-ins written."""
    present = {f.name for d in NETWORKD_DIRS if (root / d).is_dir()
               for f in (root / d).glob("*.network")}
    wanted = set(files)
    names = sorted(present if not wanted or "" in wanted else present & wanted)
    written = []
    for name in names:
        if _sets_keep_configuration(root, name):
            continue  # the operator's choice
        target = root / "run/systemd/network" / f"{name}.d" / NETWORKD_KEEP
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("# seamless: the leased addresses the restore put back stay while "
                          "networkd starts (this boot)\n[Network]\nKeepConfiguration=dhcp\n")
        written.append(target)
    return written


def _sets_keep_configuration(root: Path, name: str) -> bool:
    for d in NETWORKD_DIRS:
        for f in [root / d / name, *sorted((root / d / f"{name}.d").glob("*.conf"))]:
            with contextlib.suppress(OSError):
                if f.name != NETWORKD_KEEP and re.search(r"(?m)^\s*KeepConfiguration\s*=",
                                                         f.read_text()):
                    return True
    return False


def _local_addresses() -> set[str]:
    import psutil  # only here: its import is a tenth of the restorer's start

    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}


def _ip(args: list[str]) -> bool:
    result = run(["ip", *args], check=False)
    if result.returncode != 0:
        log.warning("ip %s: %s", " ".join(args), result.stderr.decode(errors="replace").strip())
    return result.returncode == 0


def _open_stream(stream: Callable[[str, str | None], int] | None, tree: TreeRestore) -> int:
    if stream is not None:
        return stream(tree.command.split(" ")[0].rsplit("/", 1)[-1], tree.unit)
    try:
        return journal_stream(tree.command.split(" ")[0].rsplit("/", 1)[-1], tree.unit)
    except OSError:
        return null_stream()
