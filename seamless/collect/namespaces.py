"""The namespaces of a tree that differ from the host's, read-only: what CRIU must carry.

A packaged service sandboxed by systemd (PrivateTmp=, ProtectSystem=,
PrivateDevices=, ProtectHome=, DynamicUser= ...) runs in a mount namespace of
its own: a copy of the host's mounts made when it started, every one a slave
of the host's mount it was copied from, plus the mounts systemd made for it
(a private /tmp, a /dev with a few nodes, read-only binds of /usr and /etc).

CRIU dumps such a namespace whole. The mounts copied from the host are dumped
as *external* (``auto_ext_mnt``, ``ext_sharing``, ``ext_masters``): at restore
each is bound again from the same path of the new boot, where the new boot has
it too. Two kinds of host mount do not come back that way, and are left out of
the dump (``skip_mnt``): the ones that propagated into the namespace after the
service started and that the new boot does not have when the trees are
restored, made for someone else's use (logind's per-user runtime directories
``/run/user/UID``, seamless's own store). The service never asked for them.

Some sandboxes CRIU refuses by design (see :func:`findings`): a SysV shared
memory segment in the host's IPC namespace, and a private user namespace
(``PrivateUsers=yes``) beside namespaces the host's user namespace owns.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

from seamless.criu import yards
from seamless.mounts import MountEntry, mountinfo
from seamless.procfs import fd_targets

#: Mount points, in any namespace, whose mounts are never a service's own: CRIU is told
#: to leave them out of a service's mount namespace. A login's /run/user/UID, and the
#: credentials systemd mounts for a unit at /run/credentials/UNIT (systemd 257 does it
#: for long-running units too: journald, networkd, getty), which propagate into every
#: namespace made before them, and which the new boot has not made yet when the trees
#: are restored. (A unit's own credentials are read at its start, not carried.)
#: CRIU's yards too, when an earlier restore left them (see :mod:`seamless.criu.yards`).
FOREIGN_MOUNTS = ("/run/user/", "/run/credentials/", yards.PREFIX)


def namespace(pid: int | str, kind: str, proc: Path = Path("/proc")) -> str | None:
    """``mnt:[4026531841]`` for ``kind`` "mnt", or None when the process is gone."""
    try:
        return os.readlink(proc / str(pid) / "ns" / kind)
    except OSError:
        return None


def own_namespace(pid: int, kind: str, proc: Path = Path("/proc")) -> bool:
    """Whether ``pid`` has a ``kind`` namespace other than this process's (the host's)."""
    theirs = namespace(pid, kind, proc)
    return theirs is not None and theirs != namespace("self", kind, proc)


def skipped_mounts(pid: int, own: Iterable[str] = (), proc: Path = Path("/proc")) -> list[str]:
    """The mount points of ``pid``'s own mount namespace that the dump leaves out: those
    under :data:`FOREIGN_MOUNTS` and ``own`` (seamless's own mounts, the store)."""
    if not own_namespace(pid, "mnt", proc):
        return []
    prefixes = tuple(FOREIGN_MOUNTS) + tuple(p.rstrip("/") + "/" for p in own)
    exact = {p.rstrip("/") for p in own}
    return sorted({m.target for m in mountinfo(pid, proc)
                   if m.target in exact or m.target.startswith(prefixes)})


#: ioctl(2) on a namespace file: the user namespace that owns it (linux/nsfs.h).
NS_GET_USERNS = 0xB701
#: The namespaces CRIU enters beside a tree's own user namespace when it dumps one.
CRIU_ENTERS = ("uts", "ipc", "mnt", "net")


def _owner(path: str) -> int | None:
    """The inode of the user namespace owning the namespace at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return os.fstat(owner).st_ino
    finally:
        os.close(owner)


def foreign_owned(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """For a process with a user namespace of its own (``PrivateUsers=yes``): its other
    namespaces that the host's user namespace owns, which CRIU cannot enter from inside
    the process's (it refuses: "One or more namespaces doesn't belong to the target
    user namespace"). Empty for a process in the host's user namespace."""
    if not own_namespace(pid, "user", proc):
        return []
    try:
        user = os.stat(proc / str(pid) / "ns" / "user").st_ino
    except OSError:
        return []
    return [kind for kind in CRIU_ENTERS if own_namespace(pid, kind, proc)
            and _owner(str(proc / str(pid) / "ns" / kind)) not in (None, user)]


def sysv_shm_maps(pid: int, proc: Path = Path("/proc")) -> int:
    """How many SysV shared memory mappings ``pid`` has (``/SYSV...`` in its maps)."""
    try:
        with open(proc / str(pid) / "maps") as f:
            return sum(1 for line in f if " /SYSV" in line)
    except OSError:
        return 0


def uses_io_uring(pid: int, proc: Path = Path("/proc")) -> bool:
    """Whether ``pid`` holds an io_uring instance (a descriptor or its rings mapped)."""
    if any(t == "anon_inode:[io_uring]" for _, t in fd_targets(pid, proc)):
        return True
    try:
        with open(proc / str(pid) / "maps") as f:
            return any("io_uring" in line for line in f)
    except OSError:
        return False


def tmpfs_bind_sources(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """Where in the host the tmpfs binds of ``pid``'s own mount namespace come from: the
    parts of the host's /run that systemd bound into a service's namespace (its
    RuntimeDirectory=, /run/systemd/propagate/UNIT, the inaccessible directories of
    ProtectHome=). The new boot's /run has none of them, and the restore binds each
    again from its path: they are made again before it (see :mod:`seamless.runtime`). Whole
    mounts of the host (/run, /dev/shm) are left out: the new boot has them."""
    if not own_namespace(pid, "mnt", proc):
        return []
    host = [m for m in mountinfo("self", proc) if m.fstype == "tmpfs"]
    targets = {m.target for m in host}
    found = set()
    for m in mountinfo(pid, proc):
        if m.fstype != "tmpfs":
            continue
        path = host_path(m, host)
        if path is not None and path not in targets \
                and not (path + "/").startswith(FOREIGN_MOUNTS):
            found.add(path)
    return sorted(found)


def host_path(m: MountEntry, host: list[MountEntry]) -> str | None:
    """Where in the host (its mounts ``host``) the directory that namespace mount ``m``
    binds is: the first host mount of its filesystem whose root holds it."""
    for h in host:
        base = h.root.rstrip("/")
        if h.device == m.device and (m.root == h.root or m.root.startswith(base + "/")):
            return os.path.normpath(h.target.rstrip("/") + m.root[len(base):])
    return None


def private_tmp_dirs(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The host's directories behind ``pid``'s private /tmp and /var/tmp (``PrivateTmp=``:
    ``/tmp/systemd-private-BOOT-UNIT-X``, on disk for /var/tmp), read off its mount
    namespace. The new boot's tmpfiles removes every such directory of an earlier boot,
    and the restore binds them again from their paths: they are made again before it
    (see :mod:`seamless.runtime`). Read from the namespace, not guessed from the unit's
    name: a service restored by an earlier upgrade keeps the directories of the boot it
    started in, and systemd has made others for the unit since (its adoption)."""
    if not own_namespace(pid, "mnt", proc):
        return []
    host = mountinfo("self", proc)
    found = set()
    for m in mountinfo(pid, proc):
        if m.target not in ("/tmp", "/var/tmp") or m.root == "/":
            continue
        path = host_path(m, host)
        parent = os.path.dirname(path or "")
        if os.path.basename(parent).startswith("systemd-private-"):
            found.add(parent)
    return sorted(found)


def unreachable_binds(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The mount points in ``pid``'s own mount namespace that bind a directory of a
    filesystem mounted nowhere else, neither there nor in the host's: CRIU cannot dump
    them ("doesn't have a proper root mount"). systemd 256 and later make them for
    ``PrivateTmp=disconnected``, which ``DynamicUser=yes`` implies: one tmpfs of the
    service's own, its /tmp and /var/tmp bound from two directories of it."""
    if not own_namespace(pid, "mnt", proc):
        return []
    theirs = mountinfo(pid, proc)
    every = theirs + mountinfo("self", proc)
    found = []
    for m in theirs:
        if m.root == "/" or m.target.startswith(FOREIGN_MOUNTS):
            continue
        if not any(n.device == m.device and (n.root == "/" or m.root == n.root
                                              or m.root.startswith(n.root.rstrip("/") + "/"))
                   for n in every if n is not m):
            found.append(m.target)
    return found


def _unix_inodes(pid: int | str, proc: Path) -> set[int]:
    """The inodes of the unix sockets of ``pid``'s network namespace (/proc/PID/net/unix)."""
    try:
        lines = (proc / str(pid) / "net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {int(f[6]) for f in (line.split() for line in lines) if len(f) > 6 and f[6].isdigit()}


def foreign_unix_sockets(pids: Iterable[int], root: int,
                         proc: Path = Path("/proc")) -> list[int]:
    """The PIDs of a tree with a network namespace of its own (``root``'s) that hold a
    unix socket of the host's network namespace (a journal stream, mostly): CRIU looks
    sockets up in the tree's namespace only ("Unix socket N not found")."""
    if not own_namespace(root, "net", proc):
        return []
    host, own = _unix_inodes("self", proc), _unix_inodes(root, proc)
    foreign = host - own
    return [pid for pid in pids
            if any(t.startswith("socket:[") and int(t[8:-1]) in foreign
                   for _, t in fd_targets(pid, proc))]
