"""Resources of the chosen processes that CRIU cannot carry across the kexec as they are.

Read-only inspection of /proc (and ``ss`` for unix socket peers): what would
block a checkpoint, and what is handed over specially (journald's stdout
streams).  Each finding says what to do about it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from seamless.collect.layout import JOURNALD_STDOUT
from seamless.collect.processes import ProcessInfo, ProcessTree
from seamless.run import CommandError, run

#: Character devices CRIU restores without help.
HARMLESS_DEVICES = re.compile(
    r"^/dev/(null|zero|full|random|urandom|tty|ptmx|console|pts/\d+|tty\d*|ttyS\d+|net/tun)$"
)
VOLATILE_FS = {"tmpfs", "ramfs", "devtmpfs"}


@dataclass(frozen=True)
class Finding:
    pid: int
    resource: str
    problem: str
    hint: str
    blocking: bool  # False: handled by seamless (reported for the record)


@dataclass(frozen=True)
class UnixPeer:
    inode: int
    peer: int
    path: str
    stream: bool
    owners: tuple[int, ...]


def unix_sockets() -> dict[int, UnixPeer] | None:
    """Unix sockets by inode, with their peer and owning pids (from ``ss -xapn``)."""
    try:
        out = run(["ss", "-x", "-a", "-p", "-n", "-H"]).stdout.decode(errors="replace")
    except CommandError:
        return None
    sockets: dict[int, UnixPeer] = {}
    for line in out.splitlines():
        fields = line.split()
        # Netid State Recv-Q Send-Q Local-path Local-inode Peer-path Peer-inode [users:(...)]
        if len(fields) < 8 or fields[0] not in ("u_str", "u_seq", "u_dgr"):
            continue
        try:
            inode, peer = int(fields[5]), int(fields[7])
        except ValueError:
            continue
        owners = tuple(int(pid) for pid in re.findall(r"pid=(\d+)", line))
        sockets[inode] = UnixPeer(inode, peer, fields[4], fields[0] != "u_dgr", owners)
    return sockets


def journald_streams(pids: Iterable[int], sockets: dict[int, UnixPeer]) -> list[int]:
    """Inodes of these processes' stream sockets whose peer is journald's stdout.

    They are dumped as external (``unix[INODE]``) and replaced at restore by a
    new stream to the journal (``inherit_fd`` with key ``socket:[INODE]``).
    """
    found: set[int] = set()
    for pid in pids:
        for _, target in _fds(pid):
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if not m:
                continue
            sock = sockets.get(int(m.group(1)))
            peer = sockets.get(sock.peer) if sock is not None else None
            if sock is not None and sock.stream and peer is not None and (
                peer.path == JOURNALD_STDOUT
            ):
                found.add(sock.inode)
    return sorted(found)


def mounts(path: Path = Path("/proc/self/mountinfo")) -> list[tuple[str, str]]:
    """(mount point, filesystem type), longest mount point first."""
    result = []
    try:
        text = path.read_text()
    except OSError:
        return []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            result.append((fields[4].replace("\\040", " "), right.split()[0]))
    return sorted(result, key=lambda m: len(m[0]), reverse=True)


def fs_type(path: str, table: list[tuple[str, str]]) -> str:
    for point, fstype in table:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return fstype
    return "?"


def bound_unix_paths(proc_net_unix: str | None = None) -> dict[int, str]:
    """Filesystem paths of bound unix sockets, by inode (from /proc/net/unix)."""
    text = proc_net_unix if proc_net_unix is not None else Path("/proc/net/unix").read_text()
    found = {}
    for line in text.splitlines()[1:]:
        # Num RefCount Protocol Flags Type St Inode [Path]
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7].startswith("/"):
            found[int(fields[6])] = fields[7]
    return found


def socket_dirs(
    pids: Iterable[int], paths: dict[int, str] | None = None
) -> list[dict[str, int | str]]:
    """The directories holding the unix sockets these processes have bound, with mode and
    owner: a restore must find them (the new boot may have cleaned /tmp or /run)."""
    paths = bound_unix_paths() if paths is None else paths
    dirs: dict[str, dict[str, int | str]] = {}
    for pid in pids:
        for _, target in _fds(pid):
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            path = paths.get(int(m.group(1))) if m else None
            if path is None:
                continue
            parent = os.path.dirname(path)
            try:
                st = os.stat(parent)
            except OSError:
                continue
            dirs[parent] = {"path": parent, "mode": stat.S_IMODE(st.st_mode),
                            "uid": st.st_uid, "gid": st.st_gid}
    return sorted(dirs.values(), key=lambda d: str(d["path"]))


def _mount_ids(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return set()
    return {int(line.split(None, 1)[0]) for line in text.splitlines() if line}


def _fd_mount_id(pid: int, fd: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _path_fifos(pid: int) -> Iterator[tuple[str, os.stat_result, int | None, set[int]]]:
    """The named pipes ``pid`` holds by path: (path, its stat, the fd's mount ID, the
    mount IDs of the process's own namespace)."""
    ids = _mount_ids(pid)
    for fd, target in _fds(pid):
        if not target.startswith("/"):
            continue
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISFIFO(st.st_mode):
            yield target, st, _fd_mount_id(pid, fd), ids


def foreign_fifos(pids: Iterable[int]) -> dict[str, str]:
    """Named pipes these processes hold that were opened in another mount namespace
    (CRIU key ``file[MNT:INODE]`` -> path): CRIU cannot find their mount and refuses
    to dump them. sshd's login sessions hold one: logind, in a namespace of its own,
    passes pam_systemd the session pipe (/run/systemd/sessions/N.ref). They are dumped
    as external files, and the restore hands each a new named pipe."""
    found: dict[str, str] = {}
    for pid in pids:
        for target, st, mnt, ids in _path_fifos(pid):
            if mnt is not None and mnt not in ids:
                found[f"file[{mnt:x}:{st.st_ino:x}]"] = target
    return found


def volatile_fifos(pids: Iterable[int],
                   table: list[tuple[str, str]] | None = None) -> list[dict[str, int | str]]:
    """The named pipes on tmpfs these processes have open, with mode and owner: the new
    boot's /run does not have them and CRIU reopens each by its path (its buffered data
    travels in the images). Pipes from another namespace are left to foreign_fifos."""
    table = mounts() if table is None else table
    found: dict[str, dict[str, int | str]] = {}
    for pid in pids:
        for target, st, mnt, ids in _path_fifos(pid):
            if target in found or (ids and mnt not in ids):
                continue
            if fs_type(target, table) in VOLATILE_FS:
                found[target] = {"path": target, "mode": stat.S_IMODE(st.st_mode),
                                 "uid": st.st_uid, "gid": st.st_gid}
    return sorted(found.values(), key=lambda f: str(f["path"]))


def prefix_length(netmask: str) -> int:
    """255.255.255.0 -> 24; ffff:ffff:ffff:ffff:: -> 64."""
    return bin(int(ipaddress.ip_address(netmask))).count("1")


def default_gateways(proc_net_route: str | None = None) -> dict[str, str]:
    """The IPv4 default gateway of each interface that has one (from /proc/net/route)."""
    text = (proc_net_route if proc_net_route is not None
            else Path("/proc/net/route").read_text())
    found: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        # Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
            gateway = int(fields[2], 16)
            if gateway:
                found.setdefault(fields[0], str(ipaddress.IPv4Address(
                    socket.ntohl(gateway))))
    return found


#: ``ip`` shows an address that never expires with this lifetime.
FOREVER = 0xFFFFFFFF


def leased_addresses(ip_json: str | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """The addresses in use that a network manager leased (not permanent, with a finite
    lifetime: DHCP, SLAAC), by interface: address -> (valid, preferred) seconds left.
    Not privacy (temporary), deprecated or tentative ones, nor link-local ones (the
    kernel makes those itself)."""
    if ip_json is None:
        try:
            ip_json = run(["ip", "-j", "addr", "show"]).stdout.decode()
        except (CommandError, OSError):
            return {}
    found: dict[str, dict[str, tuple[int, int]]] = {}
    for link in json.loads(ip_json or "[]"):
        for a in link.get("addr_info", []):
            valid = int(a.get("valid_life_time", FOREVER))
            if a.get("dynamic") and a.get("scope") == "global" and valid < FOREVER \
                    and not any(a.get(f) for f in ("temporary", "deprecated", "tentative")):
                found.setdefault(link["ifname"], {})[a["local"]] = (
                    valid, min(valid, int(a.get("preferred_life_time", valid))))
    return found


def uplink_interfaces(gateways: Mapping[str, str],
                      sys_class_net: Path = Path("/sys/class/net")) -> set[str]:
    """The interfaces clients reach this machine through: those with a default route
    and those of a network device (not a bridge, veth or tunnel, which the new boot
    makes later, if at all)."""
    try:
        devices = {d.name for d in sys_class_net.iterdir() if (d / "device").exists()}
    except OSError:
        devices = set()
    return set(gateways) | devices


@dataclass(frozen=True)
class Network:
    """The system's sockets, addresses and routes, read once for every tree's record:
    reading the connections scans every process's descriptors, and the trees wait
    frozen meanwhile."""

    connections: Sequence[Any]
    interfaces: Mapping[str, Sequence[Any]]
    gateways: Mapping[str, str]
    uplinks: set[str]
    leases: Mapping[str, Mapping[str, tuple[int, int]]]
    now: float

    @classmethod
    def read(cls) -> Network:
        gateways = default_gateways()
        return cls(psutil.net_connections("inet"), psutil.net_if_addrs(), gateways,
                   uplink_interfaces(gateways), leased_addresses(), time.time())

    def addresses(self, pids: Iterable[int]) -> list[dict[str, Any]]:
        """The interface addresses the TCP sockets of these processes need, with each
        interface, prefix length and IPv4 default gateway, for the restore to bring up when
        the new boot has not yet (it restores before the network is configured):

        - an established connection's address: CRIU binds and connects it back to it;
        - a listening socket's address: CRIU binds it there;
        - for a socket listening on every address (0.0.0.0, ::), the leased addresses
          (DHCP, SLAAC: see :func:`leased_addresses`) of the uplinks
          (:func:`uplink_interfaces`): the restored service answers its clients at once,
          not once the network manager has leased them again (seconds later). Permanent
          addresses (configured statically, or a failover's virtual address) are left to
          the network manager: only a lease is surely this machine's again, for its time.

        A leased address comes with the wall-clock time its lease ends ("valid_until",
        "preferred_until"): the restore gives it only the time left."""
        wanted = set(pids)
        gateways, uplinks, leases = self.gateways, self.uplinks, self.leases
        local: set[str] = set()
        for c in self.connections:
            if c.pid not in wanted or not c.laddr \
                    or c.status not in (psutil.CONN_ESTABLISHED, psutil.CONN_LISTEN):
                continue
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped  # IPv4 on an IPv6 socket
            if not ip.is_unspecified:
                local.add(str(ip) if ip.version == 4 else c.laddr.ip)
            elif c.status == psutil.CONN_LISTEN:  # ::, unless IPV6_V6ONLY, takes IPv4 too
                local |= {a for name in uplinks for a in leases.get(name, {})
                          if ip.version == 6 or ":" not in a}
        local = {ip for ip in local if not ipaddress.ip_address(ip.split("%")[0]).is_loopback}
        found = []
        for name, addrs in self.interfaces.items():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6) and a.address in local \
                        and a.netmask:
                    entry: dict[str, Any] = {"interface": name, "address": a.address,
                                             "prefix": prefix_length(a.netmask)}
                    if a.family == socket.AF_INET and name in gateways:
                        entry["gateway"] = gateways[name]
                    if a.address in leases.get(name, {}):
                        valid, preferred = leases[name][a.address]
                        entry.update(valid_until=round(self.now + valid),
                                     preferred_until=round(self.now + preferred))
                    found.append(entry)
        return sorted(found, key=lambda e: (e["interface"], e["address"]))

    def established(self, pids: Iterable[int]) -> list[dict[str, Any]]:
        """The established TCP connections (not over loopback) of these processes, as
        4-tuples: the restore in the new kernel locks them again before their addresses come
        up, as CRIU's dump had them locked in the old one (see restore/netlock.py). An IPv4
        connection on an IPv6 socket is given as IPv4, as CRIU locks it."""
        wanted = set(pids)
        found = []
        for c in self.connections:
            if c.pid not in wanted or c.status != psutil.CONN_ESTABLISHED or not c.raddr:
                continue
            local = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            remote = ipaddress.ip_address(c.raddr.ip.split("%")[0])
            if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped:
                local = local.ipv4_mapped
            if isinstance(remote, ipaddress.IPv6Address) and remote.ipv4_mapped:
                remote = remote.ipv4_mapped
            if local.is_loopback:
                continue
            found.append({"family": local.version, "local": str(local), "lport": c.laddr.port,
                          "remote": str(remote), "rport": c.raddr.port})
        return sorted(found, key=lambda e: (e["local"], e["lport"], e["remote"], e["rport"]))


def _fds(pid: int) -> Iterable[tuple[str, str]]:
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        try:
            yield name, os.readlink(f"{base}/{name}")
        except OSError:
            continue


def _mapped_files(pid: int) -> set[str]:
    files = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    files.add(parts[5].strip())
    except OSError:
        pass
    return files


def inspect(
    trees: Iterable[ProcessTree],
    everyone: Iterable[ProcessInfo],
) -> list[Finding]:
    """What would stop these trees from being checkpointed and restored."""
    trees = list(trees)
    tree_of = {pid: tree.root.pid for tree in trees for pid in tree.pids}
    chosen = set(tree_of)
    names = {p.pid: p.name for p in everyone}
    sockets = unix_sockets()
    table = mounts()
    findings: list[Finding] = []
    if sockets is None:
        findings.append(Finding(0, "unix sockets", "could not list unix socket peers (ss)",
                                "install iproute2", blocking=True))
    for pid in sorted(chosen):
        fds = list(_fds(pid))
        for fd, target in fds:
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m and sockets is not None:
                finding = _unix_finding(pid, fd, int(m.group(1)), sockets, tree_of, names)
                if finding:
                    findings.append(finding)
                continue
            if target.startswith("/dev/") and not HARMLESS_DEVICES.match(target):
                try:
                    is_char = stat.S_ISCHR(os.stat(f"/proc/{pid}/fd/{fd}").st_mode)
                except OSError:
                    is_char = False
                if is_char:
                    findings.append(Finding(
                        pid, f"fd {fd} -> {target}", "an open device CRIU cannot restore",
                        f"exclude the process (--exclude pid:{pid}) or stop it first",
                        blocking=True))
                    continue
        fifos = {str(f["path"]) for f in volatile_fifos([pid], table)}
        for path in sorted(fifos):
            findings.append(Finding(
                pid, path, "a named pipe on tmpfs: it does not survive the kexec",
                "made again before the restore (the data in it travels in the images)",
                blocking=False))
        foreign = set(foreign_fifos([pid]).values())
        for path in sorted(foreign):
            findings.append(Finding(
                pid, path, "a named pipe opened in another mount namespace (logind's "
                "session pipe): CRIU cannot dump it as it is",
                "dumped as an external file; the restore hands it a new named pipe",
                blocking=False))
        fifos |= foreign
        for path in sorted({t for _, t in fds if t.startswith("/")} | _mapped_files(pid)):
            if path.endswith(" (deleted)") or path.startswith(("/dev/", "/proc/", "/sys/")):
                continue  # deleted files travel as ghost files; devices handled above
            if path in fifos:
                continue
            if fs_type(path, table) in VOLATILE_FS:
                findings.append(Finding(
                    pid, path, "a file on tmpfs: it does not survive the kexec and CRIU "
                    "does not copy it into the images",
                    f"move it to a disk-backed path, or exclude the process (--exclude pid:{pid})",
                    blocking=True))
    return findings


def _unix_finding(
    pid: int, fd: str, inode: int, sockets: dict[int, UnixPeer],
    tree_of: dict[int, int], names: dict[int, str],
) -> Finding | None:
    sock = sockets.get(inode)
    if sock is None or not sock.stream or sock.peer == 0:
        return None
    peer = sockets.get(sock.peer)
    if peer is None or not peer.owners or any(tree_of.get(o) == tree_of[pid] for o in peer.owners):
        return None  # both ends are in one tree, dumped together (or the peer is gone)
    outside = ", ".join(f"{o} ({names.get(o, '?')})" for o in peer.owners)
    if any(o in tree_of for o in peer.owners):
        return Finding(
            pid, f"fd {fd} -> unix stream socket to {outside} in another tree",
            "a stream unix socket between two trees, which CRIU dumps separately",
            "checkpoint only one of the two trees (--exclude), or run both under "
            "one parent", blocking=True)
    if peer.path == JOURNALD_STDOUT:
        return Finding(pid, f"fd {fd} -> journald stdout stream",
                       "a stream to journald, which is restarted rather than preserved",
                       "handed over as an external socket and reconnected at restore",
                       blocking=False)
    return Finding(
        pid, f"fd {fd} -> unix stream socket to {outside}",
        "a stream unix socket to a process that is not checkpointed "
        "(CRIU can't dump half of a stream connection)",
        "include the peer in the checkpoint, or exclude this process "
        f"(--exclude pid:{pid})", blocking=True)
