"""Checkpoint the chosen trees: dump each with CRIU and hold them all frozen together.

First every tree with a cgroup of its own is frozen, all at the same instant
(:mod:`seamless.collect.freeze`), so nothing they share (a file, a connection
between them) moves between the first dump and the last. Then each tree is
dumped by its own CRIU with ``leave_running``.  When CRIU has written a tree's
images it announces ``post-dump`` and waits for our answer with the tree still
frozen: we hold that answer, so every tree stays frozen while the generation
is sealed and verified.  Then either:

- :meth:`HeldTrees.release` answers every CRIU, which thaws its tree (the
  processes never notice; this is ``checkpoint --leave-running``, and what any
  failure before the kexec does), or
- the kexec happens while they are held: the trees stop with the old kernel,
  and their images are in the store.

If this process dies while holding, each CRIU sees its socket close and thaws
its tree by itself, and the freezer's watchdog thaws the cgroups.  Nothing here
is ever left frozen by a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from seamless import faults, runtime, stop
from seamless.collect.freeze import Freezer, describe
from seamless.collect.namespaces import (
    own_namespace,
    private_tmp_dirs,
    skipped_mounts,
    tmpfs_bind_sources,
)
from seamless.collect.processes import ProcessTree
from seamless.collect.resources import (
    GHOST_LIMIT,
    Network,
    UnixPeer,
    disk_mounts,
    foreign_files,
    journald_streams,
    nonblocking_sockets,
    one_look,
    peer_paths,
    socket_dirs,
    streams_between,
    unix_sockets,
    volatile_fifos,
    volatile_files,
)
from seamless.criu import (
    Criu,
    CriuError,
    CriuOptions,
    CriuResult,
    NetworkLock,
    Notification,
    NotifyHandler,
)
from seamless.errors import ExitCode, SeamlessError
from seamless.log import complete_step, count, log
from seamless.memstore.generation import Follower, Generation, Hashed, shred
from seamless.memstore.handoff import TreeInfo, write_tree_info
from seamless.memstore.records import Manifest, TreeRecord
from seamless.memstore.store import MOUNTPOINT as STORE_MOUNTPOINT

#: How long a dump (or a pre-dump) may take before we give up on it: CRIU is then
#: killed, and the checkpoint is abandoned and every tree thawed. The time a tree is
#: held after its dump, until the others are dumped, is not counted.
DUMP_TIMEOUT = 600.0


@one_look()  # the tree's descriptors and maps, read once for all it asks of them
def tree_info(tree: ProcessTree, options: CriuOptions, order: int,
              network: Network | None = None,
              unit_paths: Sequence[str] = (),
              sockets: dict[int, UnixPeer] | None = None) -> TreeInfo:
    """What the restore needs to know of a tree besides its images; ``network``: the
    sockets and addresses read once the trees are frozen (read now without);
    ``unit_paths``: the runtime files of its unit (see :func:`seamless.runtime.unit_paths`);
    ``sockets``: the unix socket table, for its stream connections to other trees."""
    network = network or Network.read()
    return TreeInfo(
        root=tree.root.pid,
        order=order,
        pids=list(tree.pids),
        unit=tree.root.unit,
        cgroup=tree.root.cgroup,
        command=tree.root.command,
        user=tree.root.user,
        external=list(options.external),
        foreign_files={key: f for key, f in foreign_files(tree.pids).items()
                       if key in options.external},
        mount_namespace=options.auto_ext_mnt,
        streams=[s for s in streams_between(tree.pids, sockets or {})
                 if f"unix[{s['inode']}]" in options.external],
        nonblocking=nonblocking_sockets(tree.pids, [
            int(e[5:-1]) for e in options.external if e.startswith("unix[")]),
        socket_dirs=socket_dirs(tree.pids),
        peer_paths=peer_paths(tree.pids, sockets or {}, options.external),
        mounts=disk_mounts(tree.pids),
        fifos=volatile_fifos(tree.pids),
        runtime_files=runtime.collect(
            [*unit_paths, *private_tmp_dirs(tree.root.pid), *tmpfs_bind_sources(tree.root.pid),
             *runtime.pid_files(tree.pids)],
            volatile_files(tree.pids)),
        addresses=network.addresses(tree.pids),
        connections=network.established(tree.pids),
        loopback=network.established(tree.pids, loopback=True),
    )


class Dumper(Protocol):
    """What dumps a tree (:class:`seamless.criu.Criu` does)."""

    def dump(
        self, images_dir: Path, options: CriuOptions,
        on_notify: Mapping[str, NotifyHandler] | None = None,
    ) -> CriuResult: ...


class PreDumper(Protocol):
    """What copies a running tree's memory (:class:`seamless.criu.Criu` does)."""

    def pre_dump(
        self, images_dir: Path, options: CriuOptions,
        on_notify: Mapping[str, NotifyHandler] | None = None,
    ) -> CriuResult: ...


def dump_options(tree: ProcessTree, journald: Sequence[int] = (),
                 foreign: Sequence[str] = (), mount_namespace: bool = False,
                 skip_mounts: Sequence[str] = ()) -> CriuOptions:
    """How every tree is dumped: what a real host has must come along.

    ``journald``: inodes of the tree's unix streams to outside it, dumped as external
    sockets: its stdout/stderr streams to journald (the restore hands each a new
    stream) and its connections to other trees (the restore connects them again with
    a new socket pair: see ``connect_streams``). ``foreign``: CRIU keys
    (``file[MNT:INODE]``) of files opened in another mount namespace, dumped as
    external files (the restore hands each a new named pipe or opens its path again).
    ``mount_namespace``: the tree has a mount namespace of its own (a sandboxed
    service): the mounts it copied from the host are external, bound again from the
    new boot's same paths at restore, and ``skip_mounts`` are left out (see
    :mod:`.namespaces`).
    """
    return CriuOptions(
        auto_ext_mnt=mount_namespace,
        ext_sharing=mount_namespace,
        ext_masters=mount_namespace,
        skip_mnt=tuple(skip_mounts),
        pid=tree.root.pid,
        # Always: besides the streams above, a daemon that logs through syslog() holds a
        # datagram socket connected to /dev/log (journald's), outside the tree, which
        # CRIU dumps only with this and connects again by its path at restore. A tree
        # whose stdout is a journal stream had it from that; chronyd, Postfix's master
        # and others point their stdout at /dev/null and failed the dump.
        ext_unix_sk=True,
        external=tuple(f"unix[{inode}]" for inode in journald) + tuple(foreign),
        leave_running=True,  # thawed when we answer post-dump (or never: the kexec)
        shell_job=True,  # terminals and sessions of interactive programs
        tcp_established=True,
        # A connection a client is opening or closing at the instant of the freeze is
        # not in a state CRIU can carry; the client sees it dropped and retries, as it
        # would across any restart. Without this, a busy server can never be dumped.
        tcp_skip_in_flight=True,
        # Connections are held still while dumped by firewall rules. CRIU's default
        # is the iptables command, which Debian 12 does not install by default;
        # its CRIU links libnftables, which needs nothing more than nf_tables.
        network_lock=NetworkLock.NFTABLES,
        file_locks=True,
        ghost_limit=GHOST_LIMIT,
    )


def tree_dump_options(tree: ProcessTree, sockets: dict[int, UnixPeer]) -> CriuOptions:
    """:func:`dump_options` with what this tree holds: its journald streams and its
    stream connections to other trees (from the unix socket table ``sockets``: both are
    external sockets), its files from another mount namespace, its mount namespace."""
    mntns = own_namespace(tree.root.pid, "mnt")
    streams = [s["inode"] for s in streams_between(tree.pids, sockets, peek=False)]
    return dump_options(tree, journald_streams(tree.pids, sockets) + streams,
                        tuple(foreign_files(tree.pids)), mntns,
                        skipped_mounts(tree.root.pid, [str(STORE_MOUNTPOINT)]) if mntns else ())


@dataclass
class TreeDump:
    """One tree's dump: where, how long, how much."""

    tree: ProcessTree
    images_dir: Path
    started: float = 0.0  # monotonic
    #: When its cgroup was frozen with every other tree's, before any dump (monotonic)
    cgroup_frozen_at: float | None = None
    frozen_at: float | None = None  # post-dump reached: images written, tree frozen
    thawed_at: float | None = None
    bytes_written: int = 0
    error: BaseException | None = None
    _dumped: threading.Event = field(default_factory=threading.Event)
    _release: threading.Event = field(default_factory=threading.Event)
    _abort: bool = False
    _thread: threading.Thread | None = None

    @property
    def dump_seconds(self) -> float | None:
        return None if self.frozen_at is None else self.frozen_at - self.started

    @property
    def freeze_seconds(self) -> float | None:
        """From the freeze of its cgroup, or else the start of its dump (CRIU freezes
        first), to its thaw."""
        if self.thawed_at is None:
            return None
        return self.thawed_at - (self.cgroup_frozen_at or self.started)


class AbortDump(Exception):
    """Raised at post-dump to make CRIU fail the dump, which thaws the tree."""


class HeldTrees:
    """Every dumped tree, frozen until :meth:`release`."""

    def __init__(self, dumps: list[TreeDump], freezer: Freezer | None = None) -> None:
        self.dumps = dumps
        #: The trees' cgroups frozen before the dumps: thawed after every CRIU let go.
        self.freezer = freezer

    def release(self, timeout: float = DUMP_TIMEOUT, *, check: bool = True) -> None:
        """Let every CRIU finish its dump: a tree dumped with ``leave_running`` runs on,
        one dumped without it ends (its images are the checkpoint).

        With ``check``, a CRIU that failed after its dump is an error.
        """
        self._answer(abort=False, timeout=timeout)
        self._check(check)

    def abort(self, timeout: float = DUMP_TIMEOUT) -> None:
        """Fail every dump at post-dump: CRIU thaws each tree, whatever it was asked."""
        self._answer(abort=True, timeout=timeout)

    def _answer(self, *, abort: bool, timeout: float) -> None:
        with stop.critical():  # a signal now waits until every tree is let go
            for d in self.dumps:
                d._abort = abort
                d._release.set()
            for d in self.dumps:
                if d._thread is not None:
                    d._thread.join(timeout)
            if self.freezer is not None:
                self.freezer.thaw()

    def _check(self, check: bool) -> None:
        failed = [d for d in self.dumps if d.error is not None]
        if not check:
            return
        if failed:
            raise SeamlessError(
                "CRIU failed after dumping: "
                + "; ".join(f"tree {d.tree.root.pid}: {d.error}" for d in failed),
                hint="the images were written, but those trees may not run as asked: "
                "check them (ps), and CRIU's dump.log beside their images",
                exit_code=ExitCode.CHANGED,
            )

    def let_go(self, proc: Path = Path("/proc")) -> list[int]:
        """The trees no CRIU holds any more: its dump ended (it was killed, or failed
        after the images were written), and they run on, so their images are older than
        they are. A held process is traced by its CRIU."""
        loose = []
        for d in self.dumps:
            if d._thread is not None and not d._thread.is_alive():
                loose.append(d.tree.root.pid)
                continue
            for pid in d.tree.pids:
                try:
                    status = (proc / str(pid) / "status").read_text()
                except OSError:
                    continue  # ended (killed while held): nothing of it runs on
                if "\nState:\tZ" in status or "\nState:\tX" in status:
                    continue  # a zombie is never traced: CRIU dumps it as one
                if "\nTracerPid:\t0\n" in status:
                    loose.append(d.tree.root.pid)
                    break
        return loose

    @property
    def total_bytes(self) -> int:
        return sum(d.bytes_written for d in self.dumps)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dump_all(
    trees: Sequence[ProcessTree],
    images_root: Path,
    criu: Dumper,
    *,
    options: Callable[[ProcessTree], CriuOptions] | None = None,
    progress: Callable[[str], None] = log.info,
    freezer: Freezer | None = None,
    sockets: dict[int, UnixPeer] | None = None,
) -> HeldTrees:
    """Dump every tree into ``images_root/<root pid>/`` and hold them all frozen.

    ``freezer``: the trees' cgroups, frozen all at once before the first dump
    (each CRIU is told its tree's cgroup), and thawed together at the end.
    ``sockets``: the unix socket table (read now without).
    On any failure every tree is thawed before the error is raised (exit code:
    nothing changed).
    """
    dumps: list[TreeDump] = []
    held = HeldTrees(dumps, freezer)
    if sockets is None:
        sockets = unix_sockets() or {}
    if options is None:

        def options(tree: ProcessTree) -> CriuOptions:
            return tree_dump_options(tree, sockets)

    units = runtime.unit_paths(t.root.unit for t in trees)
    try:
        network = None
        if freezer is not None:
            freezer.freeze()
            progress(describe(freezer, trees))
            faults.point("frozen")
            if freezer.cgroups:  # their trees are frozen: their sockets stay as they are
                network = Network.read()
        for order, tree in enumerate(trees):
            d = TreeDump(tree, images_root / str(tree.root.pid))
            d.images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            dumps.append(d)
            opts = options(tree)
            if freezer is not None and (cgroup := freezer.path(tree.root.pid)) is not None:
                opts = dataclasses.replace(opts, freeze_cgroup=cgroup)
                d.cgroup_frozen_at = freezer.frozen_at
            # a tree the cgroup freezer did not freeze is frozen by its CRIU: read its own
            info = tree_info(tree, opts, order, network if opts.freeze_cgroup else None,
                             units.get(tree.root.unit or "", []), sockets)
            write_tree_info(d.images_dir, info)
            _start(d, criu, opts)
            while not d._dumped.wait(0.2):
                thread = d._thread
                if thread is not None and not thread.is_alive():
                    break
            if d.error is not None or d.frozen_at is None:
                raise d.error or SeamlessError(f"CRIU ended without dumping tree {tree.root.pid}")
            d.bytes_written = _size(d.images_dir)
            progress(
                f"dumped tree {tree.root.pid} ({tree.root.command[:50]}): "
                f"{len(tree.members)} processes, {d.bytes_written / (1 << 20):.1f} MiB "
                f"in {d.dump_seconds or 0:.2f} s; held frozen"
            )
    except BaseException as e:
        held.abort()  # thaws every tree dumped so far, and every frozen cgroup
        for d in dumps:
            if d.error is not None and d.error is not e:
                log.warning("tree %d: also: %s", d.tree.root.pid, d.error)
        if isinstance(e, CriuError):
            e.status = ExitCode.UNCHANGED
        raise
    return held


def _start(d: TreeDump, criu: Dumper, opts: CriuOptions) -> None:
    def post_dump(note: Notification) -> None:
        d.frozen_at = time.monotonic()
        d._dumped.set()
        d._release.wait()  # CRIU keeps the tree frozen until we answer
        if d._abort:
            raise AbortDump("the checkpoint was abandoned: thaw the tree")

    def run() -> None:
        try:
            criu.dump(d.images_dir, opts, {"post-dump": post_dump})
        except BaseException as e:  # reported through d.error to the waiting thread
            if not d._abort:
                d.error = e
        finally:
            d.thawed_at = time.monotonic()
            d._dumped.set()

    d.started = time.monotonic()
    d._thread = threading.Thread(target=run, name=f"dump-{d.tree.root.pid}", daemon=True)
    d._thread.start()


#: A tree's pre-dump images, inside its images directory: the dump's "parent".
PRE_DUMP_DIR = "pre"
#: Room a pre-dump needs, against the trees' resident memory: its images, and the
#: dump of what changed since (at most everything again; usually far less).
PRE_DUMP_ROOM = 1.6


class Engine(Dumper, PreDumper, Protocol):
    """Dumps and pre-dumps: CRIU."""


def room_to_pre_dump(trees: Sequence[ProcessTree], root: Path) -> bool:
    memory = sum(t.rss for t in trees)
    free = shutil.disk_usage(root).free
    if free >= memory * PRE_DUMP_ROOM:
        return True
    log.info("no pre-dump: the store has %d MiB free, a pre-dump of %d MiB wants %d MiB; "
             "the trees' whole memory is dumped while they are frozen",
             free >> 20, memory >> 20, int(memory * PRE_DUMP_ROOM) >> 20)
    return False


def pre_dump_all(trees: Sequence[ProcessTree], root: Path, criu: PreDumper,
                 options: Callable[[ProcessTree], CriuOptions]) -> set[int]:
    """Copy every tree's memory while it runs (CRIU pre-dump, with memory tracking)
    into ``root/<pid>/pre``; returns the trees pre-dumped. A tree whose pre-dump
    fails is dumped whole later: the pre-dump only saves time."""
    done = set()
    for tree in trees:
        images_dir = root / str(tree.root.pid) / PRE_DUMP_DIR
        images_dir.mkdir(mode=0o700, parents=True)
        opts = dataclasses.replace(options(tree), track_mem=True, leave_running=True)
        try:
            result = criu.pre_dump(images_dir, opts)
        except CriuError as e:
            log.warning("tree %d: pre-dump failed, it will be dumped whole: %s",
                        tree.root.pid, e)
            with contextlib.suppress(OSError):
                shred(images_dir)  # what it dumped of the tree's memory
            continue
        done.add(tree.root.pid)
        log.info("pre-dumped tree %d (%s): %.1f MiB in %.2f s, still running", tree.root.pid,
                 tree.root.command[:50], _size(images_dir) / (1 << 20), result.seconds)
    return done


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def take_checkpoint(
    trees: Sequence[ProcessTree],
    images: Generation,
    number: int,
    *,
    leave_running: bool,
    target_release: str | None = None,
    times: dict[str, float] | None = None,
    pre_dump: bool | None = None,
    criu: Engine | None = None,
) -> tuple[HeldTrees, Manifest]:
    """Dump ``trees`` into the new generation ``images``, seal it, and return the trees
    still held frozen (release or abort them) with the manifest.

    With ``pre_dump`` (by default: when the store has room for it) every tree's
    memory is first copied while it runs and hashed; frozen, each dump then
    writes and the seal hashes only what changed since, so the freeze is short
    whatever the size of the memory.

    On any failure every tree is thawed and the partial generation removed before
    the error is raised. ``times`` receives the wall-clock times of the steps
    (pre_dumping, frozen, dumped, sealed) for the upgrade's report.
    """
    times = {} if times is None else times
    sockets = unix_sockets() or {}
    criu = criu or Criu(timeout=DUMP_TIMEOUT)
    created = time.time()
    root = images.create()
    if pre_dump is None:
        pre_dump = room_to_pre_dump(trees, root)
    pre_dumped: set[int] = set()
    ahead: dict[Path, Hashed] = {}

    def options(tree: ProcessTree) -> CriuOptions:
        opts = tree_dump_options(tree, sockets)
        opts = dataclasses.replace(opts, leave_running=leave_running)
        if tree.root.pid in pre_dumped:  # only what changed since; the rest is "parent"
            opts = dataclasses.replace(opts, parent_img=PRE_DUMP_DIR, track_mem=True)
        return opts

    try:
        if pre_dump:
            times["pre_dumping"] = time.time()
            with complete_step(f"pre-dumping {count(len(trees), 'tree')} while they run"):
                pre_dumped = pre_dump_all(trees, root, criu, options)
            with complete_step("hashing the pre-dumped images while the trees run"):
                ahead = images.hash_ahead()
            faults.point("pre-dumped")
        times["frozen"] = time.time()
        # The page images are hashed while CRIU writes them (a piece at a time).
        follower = Follower(root)
        with complete_step(f"dumping {count(len(trees), 'tree')} into {root}"), follower:
            held = dump_all(trees, root, criu, options=options,
                            freezer=Freezer.for_trees(trees), sockets=sockets)
        times["dumped"] = time.time()
        try:
            faults.point("dumped")
            with complete_step("sealing: checksums, manifest"):
                ahead.update(follower.finish())
                log.info("%d MiB of page images hashed while they were written",
                         follower.bytes_followed >> 20)
                manifest = images.seal(Manifest(
                    generation=number, source_release=os.uname().release,
                    source_boot_id=boot_id(), target_release=target_release, created=created,
                    trees=[TreeRecord(
                        root=d.tree.root.pid, unit=d.tree.root.unit,
                        command=d.tree.root.command, processes=len(d.tree.members),
                        bytes=d.bytes_written, dump_seconds=d.dump_seconds,
                        pids=list(d.tree.pids),
                    ) for d in held.dumps],
                ), ahead)
            times["sealed"] = time.time()
            faults.point("sealed")
        except BaseException:
            held.abort()
            raise
    except BaseException:
        with stop.critical():
            images.discard()
            if images.sealed:  # sealed, then it failed: its memory must not stay either
                try:
                    images.wipe()
                except OSError as e:
                    log.warning("the generation %s was not all overwritten: %s",
                                images.final, e)
        raise
    return held, manifest
