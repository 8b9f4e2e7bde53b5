"""What a CRIU call can be asked to do, as typed values (no protobuf here).

:class:`CriuOptions` names CRIU's options the way ``criu(8)`` does; the
client turns it into the ``criu_opts`` message (see :mod:`.wire`).  The images
directory, the log and the notifications are the client's business, not
options.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CgroupMode(enum.IntEnum):
    """``--manage-cgroups=MODE`` (values of ``criu_cg_mode``)."""

    IGNORE = 0
    NONE = 1
    PROPS = 2
    SOFT = 3
    FULL = 4
    STRICT = 5
    DEFAULT = 6


class NetworkLock(enum.IntEnum):
    """``--network-lock=METHOD`` (values of ``criu_network_lock_method``)."""

    IPTABLES = 1
    NFTABLES = 2


class PreDumpMode(enum.IntEnum):
    """``--pre-dump-mode=MODE`` (values of ``criu_pre_dump_mode``)."""

    SPLICE = 1
    VM_READ = 2


@dataclass(frozen=True)
class InheritFd:
    """At restore, give the restored tasks ``fd`` (a descriptor of this process)
    in place of the resource CRIU calls ``key`` (``socket:[4242]``, ``pipe:[77]``,
    ``tty[88:3]`` ...).  The client hands ``fd`` to CRIU with the same number."""

    key: str
    fd: int


@dataclass(frozen=True)
class CgroupRoot:
    """``--cgroup-root [CTRL:]PATH``."""

    path: str
    controller: str | None = None


@dataclass(frozen=True)
class CriuOptions:
    """Options of one dump, pre-dump or restore.  Defaults are CRIU's own.

    ``log_level`` and ``log_file`` concern the log CRIU writes next to the
    images; ``log_file=None`` lets the client name it after the call
    (``dump.log``, ``restore.log`` ...).
    """

    #: Dump and pre-dump: the root of the process tree (required: we never dump ourselves).
    pid: int | None = None
    #: Dump: leave the tasks running after the dump (CRIU kills them otherwise).
    leave_running: bool = False
    #: Tasks belong to a shell job (session or process group leader outside the tree).
    shell_job: bool = False
    #: Dump and restore established TCP connections.
    tcp_established: bool = False
    #: Restore TCP connections closed.
    tcp_close: bool = False
    #: Skip TCP connections still being established or closed.
    tcp_skip_in_flight: bool = False
    #: Allow unix sockets connected to peers outside the tree (datagram; see ``external``).
    ext_unix_sk: bool = False
    #: Dump and restore file locks.
    file_locks: bool = False
    #: Allow CRIU to link-remap unlinked files that are still open.
    link_remap: bool = False
    #: Largest deleted-but-open file kept in the images, in bytes (CRIU's default: 1 MiB).
    ghost_limit: int | None = None
    #: Replace device files that cannot be dumped by their paths (``--evasive-devices``).
    evasive_devices: bool = False
    #: Pre-dump chain: the previous images directory, relative to this one.
    parent_img: str | None = None
    #: Track memory changes (soft-dirty bits) for a following pre-dump or dump.
    track_mem: bool = False
    #: Punch holes in the parent images for pages written again (``--auto-dedup``).
    auto_dedup: bool = False
    pre_dump_mode: PreDumpMode | None = None
    #: Resources declared external: ``unix[INODE]``, ``mnt[PATH]:KEY``, ``tty[RDEV:DEV]``, ...
    external: tuple[str, ...] = ()
    #: Restore: descriptors given in place of external resources.
    inherit_fd: tuple[InheritFd, ...] = ()
    #: Restore: hand the master side of orphaned ptys to the client (a NOTIFY with a fd).
    orphan_pts_master: bool = False
    manage_cgroups: CgroupMode | None = None
    cgroup_root: tuple[CgroupRoot, ...] = ()
    #: Restore: make the restored tree's root a child of the client (not of CRIU).
    rst_sibling: bool = False
    #: RESTORE: leave the memory to a ``criu lazy-pages`` daemon (see restore/lazy.py).
    lazy_pages: bool = False
    #: Restore: the root directory of the restored tasks' mount namespace.
    root: str | None = None
    #: Freeze the tree with this cgroup's freezer instead of ptrace.
    freeze_cgroup: str | None = None
    #: Seconds CRIU waits for the tree to freeze (CRIU's ``--timeout``).
    timeout: int | None = None
    network_lock: NetworkLock | None = None
    weak_sysctls: bool = False
    auto_ext_mnt: bool = False
    ext_sharing: bool = False
    ext_masters: bool = False
    skip_mnt: tuple[str, ...] = ()
    enable_fs: tuple[str, ...] = ()
    irmap_scan_paths: tuple[str, ...] = ()
    force_irmap: bool = False
    lsm_profile: str | None = None
    #: 4 is CRIU's most detailed level: the log is what is left when a dump fails.
    log_level: int = 4
    log_file: str | None = None
