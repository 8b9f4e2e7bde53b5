"""Resources of the chosen processes that CRIU cannot carry across the kexec as they are.

Read-only inspection of /proc (and ``ss`` for unix socket peers): what would
block a checkpoint, and what is handed over specially (journald's stdout
streams).  Each finding says what to do about it.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from seamless import procfs, runtime
from seamless.collect import namespaces
from seamless.collect.processes import ProcessInfo, ProcessTree
from seamless.errors import SeamlessError
from seamless.log import log
from seamless.memstore.handoff import JOURNALD_STDOUT, after_init_reason
from seamless.mounts import mountinfo
from seamless.run import CommandError, run
from seamless.syscalls import pidfd_getfd

#: Character devices CRIU restores without help.
HARMLESS_DEVICES = re.compile(
    r"^/dev/(null|zero|full|random|urandom|tty|ptmx|console|pts/\d+|tty\d*|ttyS\d+|net/tun)$"
)
VOLATILE_FS = {"tmpfs", "ramfs", "devtmpfs"}
#: Directories the new boot empties before the restore, whatever holds them: Debian's
#: tmpfiles.d has "D /tmp" (emptied at every boot; a tmpfs in Debian 13 anyway).
CLEANED_AT_BOOT = ("/tmp/",)


def lost_at_boot(path: str, table: list[tuple[str, str]]) -> bool:
    """Whether the new boot no longer has the file at ``path``: on tmpfs (/run, /dev/shm)
    or in a directory emptied at boot. Devices, /proc and /sys are not files of that kind."""
    if path.startswith(("/dev/", "/proc/", "/sys/")) and not path.startswith("/dev/shm/"):
        return False
    return path.startswith(CLEANED_AT_BOOT) or fs_type(path, table) in VOLATILE_FS


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


def _connected(pids: Iterable[int], sockets: dict[int, UnixPeer]
               ) -> Iterator[tuple[int, str, UnixPeer, UnixPeer]]:
    """Each unix socket of these processes that is connected, with its peer: the
    process, its descriptor, the socket and the peer's socket."""
    for pid in sorted(set(pids)):
        for fd, target in _fds(pid):
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            sock = sockets.get(int(m.group(1))) if m else None
            peer = sockets.get(sock.peer) if sock is not None and sock.peer else None
            if sock is not None and peer is not None:
                yield pid, fd, sock, peer


def journald_streams(pids: Iterable[int], sockets: dict[int, UnixPeer]) -> list[int]:
    """Inodes of these processes' stream sockets whose peer is journald's stdout.

    They are dumped as external (``unix[INODE]``) and replaced at restore by a
    new stream to the journal (``inherit_fd`` with key ``socket:[INODE]``).
    """
    return sorted({sock.inode for _, _, sock, peer in _connected(pids, sockets)
                   if sock.stream and peer.path == JOURNALD_STDOUT})


def peer_paths(pids: Iterable[int], sockets: dict[int, UnixPeer],
               external: Iterable[str] = ()) -> list[str]:
    """The paths bound by the sockets that these processes' unix sockets are connected
    to, outside them (syslog's /run/systemd/journal/dev-log, say), but those dumped as
    external (``unix[INODE]``: the restore connects them itself): CRIU connects each
    again by its path, which must be there when the tree is restored."""
    wanted, skip = set(pids), set(external)
    return sorted({peer.path for _, _, sock, peer in _connected(wanted, sockets)
                   if f"unix[{sock.inode}]" not in skip and peer.path.startswith("/")
                   and not any(o in wanted for o in peer.owners)})


#: The most of a stream's queue carried (a socket's receive buffer holds less).
QUEUE_LIMIT = 16 << 20


def streams_between(pids: Iterable[int], sockets: dict[int, UnixPeer], *,
                    peek: bool = True) -> list[dict[str, Any]]:
    """The unix stream connections of these processes (a tree) to processes of another
    tree (an application and its database's socket): each of the tree's ends, its peer's
    inode and the bytes queued for it, unread (read once the trees are frozen). CRIU
    dumps each end as external; the restore connects the two trees again with a new
    socket pair, the queued bytes in it (see restore/restorer.py)."""
    wanted = set(pids)
    found: dict[int, dict[str, Any]] = {}
    for pid, fd, sock, peer in _connected(wanted, sockets):
        if not sock.stream or not peer.owners or peer.path == JOURNALD_STDOUT \
                or any(o in wanted for o in peer.owners) or sock.inode in found:
            continue
        queued = _peek(pid, int(fd)) if peek else b""
        found[sock.inode] = {"inode": sock.inode, "peer": sock.peer,
                             "queue": base64.b64encode(queued).decode()}
    return list(found.values())


def nonblocking_sockets(pids: Iterable[int], inodes: Iterable[int]) -> list[int]:
    """Of these sockets (by inode) that the processes hold, those open non-blocking
    (O_NONBLOCK). The restore hands a tree a socket of its own for each (see
    ``connect_streams``), and CRIU leaves a file it inherits as it gets it: each must be
    non-blocking again, or a server that waits in epoll and then reads blocks in the read
    (a PostgreSQL backend then never sees its shutdown, and pg_ctl waits out its 60 s)."""
    wanted, found = set(inodes), set()
    for pid in pids:
        for fd, target in _fds(pid):
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m is None or int(m[1]) not in wanted or int(m[1]) in found:
                continue
            try:
                flags = int(_fdinfo(pid, fd).get("flags", "0"), 8)
            except ValueError:
                continue
            if flags & os.O_NONBLOCK:
                found.add(int(m[1]))
    return sorted(found)


def _peek(pid: int, fd: int) -> bytes:
    """What is queued on ``pid``'s socket ``fd`` for it to read, left where it is."""
    try:
        copy = pidfd_getfd(pid, fd)
    except (SeamlessError, OSError) as e:
        log.warning("could not read what is queued on socket %d of %d: %s", fd, pid, e)
        return b""
    sock = socket.socket(fileno=copy)
    try:
        return sock.recv(QUEUE_LIMIT, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""
    finally:
        sock.close()


def mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this mount namespace, longest mount point
    first."""
    return sorted(((m.target, m.fstype) for m in mountinfo()),
                  key=lambda m: len(m[0]), reverse=True)


def mount_of(path: str, table: list[tuple[str, str]]) -> tuple[str, str]:
    """The mount point holding ``path`` and its filesystem type (``table`` longest mount
    point first, as :func:`mounts` gives it); ("/", "?") when none does."""
    for point, fstype in table:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            return point, fstype
    return "/", "?"


def fs_type(path: str, table: list[tuple[str, str]]) -> str:
    return mount_of(path, table)[1]


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
    return {m.mount_id for m in mountinfo(pid)}


def _fd_mount_id(pid: int, fd: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fdinfo(pid: int, fd: str) -> dict[str, str]:
    """The fields of /proc/PID/fdinfo/FD (pos, flags, mnt_id ...); empty when gone."""
    try:
        lines = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines) if v}


def _path_files(pid: int) -> Iterator[tuple[str, str, os.stat_result, int | None, set[int]]]:
    """The files ``pid`` holds by path: (fd, path, its stat, the fd's mount ID, the mount
    IDs of the process's own namespace). Not a memfd: its "/memfd:NAME" is no path, and
    it lives on a mount of the kernel's that no namespace shows; CRIU carries it."""
    ids = _mount_ids(pid)
    for fd, target in _fds(pid):
        if not target.startswith("/") or target.startswith("/memfd:"):
            continue
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        yield fd, target, st, _fd_mount_id(pid, fd), ids


def _path_fifos(pid: int) -> Iterator[tuple[str, os.stat_result, int | None, set[int]]]:
    """The named pipes ``pid`` holds by path (see :func:`_path_files`)."""
    for _, target, st, mnt, ids in _path_files(pid):
        if stat.S_ISFIFO(st.st_mode):
            yield target, st, mnt, ids


#: What a file opened in another mount namespace is, for the restore to replace it.
FOREIGN_FIFO, FOREIGN_DEVICE, FOREIGN_FILE = "fifo", "device", "file"
FOREIGN_KINDS = {FOREIGN_FIFO: ("named pipe", "logind's session pipe"),
                 FOREIGN_DEVICE: ("device", "a sandboxed service's stdin, /dev/null"),
                 FOREIGN_FILE: ("file", "handed to a sandboxed service")}


def foreign_files(pids: Iterable[int]) -> dict[str, dict[str, Any]]:
    """Files these processes hold that were opened in another mount namespace, by CRIU
    key (``file[MNT:INODE]``): CRIU cannot find their mount and refuses to dump them.

    - sshd's login sessions hold a named pipe that logind, in a namespace of its own,
      passes pam_systemd (/run/systemd/sessions/N.ref): the restore hands it a new one;
    - a sandboxed service (a mount namespace of its own) has the stdin (/dev/null) that
      systemd opened in the host's before it made the service's namespace, and any file
      of the host's it was handed: the restore opens the same path again, with the same
      flags and, for a regular file, at the same offset.

    They are dumped as external files: each record has the path, the kind
    (:data:`FOREIGN_FIFO`, ...), the open flags and the offset."""
    found: dict[str, dict[str, Any]] = {}
    for pid in pids:
        for fd, target, st, mnt, ids in _path_files(pid):
            if mnt is None or mnt in ids:
                continue
            if stat.S_ISFIFO(st.st_mode):
                kind = FOREIGN_FIFO
            elif stat.S_ISCHR(st.st_mode):
                kind = FOREIGN_DEVICE
            elif stat.S_ISREG(st.st_mode):
                kind = FOREIGN_FILE
            else:
                continue
            info = _fdinfo(pid, fd)
            try:
                flags, pos = int(info.get("flags", "0"), 8), int(info.get("pos", "0"))
            except ValueError:
                flags, pos = os.O_RDONLY, 0
            found[f"file[{mnt:x}:{st.st_ino:x}]"] = {
                "path": target, "kind": kind, "flags": flags, "pos": pos}
    return found


def foreign_fifos(pids: Iterable[int]) -> dict[str, str]:
    """The named pipes of :func:`foreign_files`, by CRIU key -> path."""
    return {key: f["path"] for key, f in foreign_files(pids).items()
            if f["kind"] == FOREIGN_FIFO}


def volatile_fifos(pids: Iterable[int],
                   table: list[tuple[str, str]] | None = None) -> list[dict[str, int | str]]:
    """The named pipes on tmpfs (or in /tmp) these processes have open, with mode and
    owner: the new boot does not have them and CRIU reopens each by its path (its buffered
    data travels in the images). Pipes from another namespace are left to foreign_files."""
    table = mounts() if table is None else table
    found: dict[str, dict[str, int | str]] = {}
    for pid in pids:
        for target, st, mnt, ids in _path_fifos(pid):
            if target in found or (ids and mnt not in ids):
                continue
            if lost_at_boot(target, table):
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


#: Where networkd keeps a file for each DHCPv4 lease it holds (only looked at: its
#: contents are networkd's own).
NETWORKD_LEASES = Path("/run/systemd/netif/leases")


def _any_entry(directory: Path) -> bool:
    try:
        return any(directory.iterdir())
    except OSError:
        return False


def networkd_leases(networkctl_json: str | None = None, boottime: float | None = None
                    ) -> dict[str, dict[str, tuple[int, int]]]:
    """The IPv4 addresses systemd-networkd leased over DHCP that the kernel shows as
    permanent: told to keep its dynamic addresses (``KeepConfiguration=dhcp``, which the
    restore sets for the boot it restores into, see
    ``restore.restorer.keep_leases_through_networkd``), networkd gives its lease an
    unlimited lifetime. The lease is surely valid until networkd renews it (its T1):
    that is the time left given, as :func:`leased_addresses` gives it."""
    if networkctl_json is None:
        if not _any_entry(NETWORKD_LEASES):
            return {}  # no networkd, or no DHCP lease: nothing to ask it
        try:
            # read while the trees are frozen: a networkd that does not answer at once
            # leaves its leases as the kernel shows them
            networkctl_json = run(["networkctl", "--json=short"], timeout=5).stdout.decode()
        except (CommandError, OSError, subprocess.TimeoutExpired):
            return {}
    now = time.clock_gettime(time.CLOCK_BOOTTIME) if boottime is None else boottime
    found: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        links = json.loads(networkctl_json or "{}").get("Interfaces") or []
    except (ValueError, AttributeError):
        return {}
    for link in links:
        renewal = ((link.get("DHCPv4Client") or {}).get("Lease") or {}).get("Timeout1USec")
        left = int(renewal / 1e6 - now) if isinstance(renewal, int) else 0
        if left <= 0:
            continue
        for a in link.get("Addresses") or []:
            octets = a.get("Address") or []
            if a.get("ConfigSource") == "DHCPv4" and a.get("ValidLifetimeUSec") is None \
                    and len(octets) == 4:
                found.setdefault(link.get("Name", "?"), {})[".".join(map(str, octets))] = (
                    left, left)
    return found


#: systemd-networkd's state of each link it manages, by interface index.
NETWORKD_LINKS = Path("/run/systemd/netif/links")


def networkd_files(links: Path = NETWORKD_LINKS) -> dict[str, str]:
    """By interface name, the .network file networkd configures it with (its
    ``NETWORK_FILE=``, as systemd 252 and 257 write it): the restore tells only those
    to keep the leases it puts back. Nothing without networkd. The state file is
    networkd's own, unchanged in this since systemd 219; an interface it does not
    name here costs only precision (the restore then tells every .network file)."""
    try:
        entries = list(links.iterdir())
    except OSError:
        return {}
    found = {}
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            name = socket.if_indextoname(int(entry.name))
            state = entry.read_text()
        except OSError:
            continue  # the link is gone
        m = re.search(r"(?m)^NETWORK_FILE=(\S+)$", state)
        if m:
            found[name] = os.path.basename(m[1])
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
    #: By interface: the name of the .network file systemd-networkd configures it with.
    network_files: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls) -> Network:
        gateways = default_gateways()
        leases = leased_addresses()
        if not any(":" not in a for kept in leases.values() for a in kept):
            # no IPv4 lease as the kernel shows them: networkd may be keeping its own
            for name, kept in networkd_leases().items():
                for address, times in kept.items():
                    leases.setdefault(name, {}).setdefault(address, times)
        return cls(psutil.net_connections("inet"), psutil.net_if_addrs(), gateways,
                   uplink_interfaces(gateways), leases, time.time(), networkd_files())

    def addresses(self, pids: Iterable[int]) -> list[dict[str, Any]]:
        """The interface addresses the TCP sockets of these processes need, with each
        interface, prefix length and IPv4 default gateway, for the restore to bring up when
        the new boot has not yet (it restores before the network is configured):

        - a connection's address, established or closing: CRIU binds and connects it
          back to it;
        - a listening socket's or a UDP socket's address: CRIU binds it there;
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
            # Every socket the tree holds bound to an address, whatever its state: CRIU
            # binds each back, a connection closing (CLOSE_WAIT, FIN_WAIT ...) and a UDP
            # socket too, and fails the tree where the address is missing (a probe's
            # connection closing at the freeze, on Debian 12: "Can't bind inet socket
            # back").
            if c.pid not in wanted or not c.laddr:
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
                        if name in self.network_files:
                            entry["network_file"] = self.network_files[name]
                    found.append(entry)
        return sorted(found, key=lambda e: (e["interface"], e["address"]))

    def established(self, pids: Iterable[int], *, loopback: bool = False
                    ) -> list[dict[str, Any]]:
        """The established TCP connections (not over loopback) of these processes, as
        4-tuples: the restore in the new kernel locks them again before their addresses come
        up, as CRIU's dump had them locked in the old one (see restore/netlock.py). An IPv4
        connection on an IPv6 socket is given as IPv4, as CRIU locks it. With ``loopback``,
        the connections over loopback instead (locked until every tree is back)."""
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
            if local.is_loopback != loopback:
                continue
            found.append({"family": local.version, "local": str(local), "lport": c.laddr.port,
                          "remote": str(remote), "rport": c.raddr.port})
        return sorted(found, key=lambda e: (e["local"], e["lport"], e["remote"], e["rport"]))


#: Within :func:`one_look`: each process's descriptors and mapped files, read once.
_looked: dict[tuple[str, int], Any] | None = None


@contextlib.contextmanager
def one_look() -> Iterator[None]:
    """Read each process's descriptors and mapped files once, however many questions
    are asked of them meanwhile: the checkpoint asks about ten of each frozen tree
    (its sockets, files on tmpfs, disk mounts, fifos, ...) while it is frozen, and the
    plan as many of each running one. On the host this halves the time (40 -> 20 ms
    for 74 processes); under TCG it is tenths of seconds of the freeze. The answers
    are of one moment: what a running process opens meanwhile is not seen."""
    global _looked
    outer, _looked = _looked, ({} if _looked is None else _looked)
    try:
        yield
    finally:
        _looked = outer


def _fds(pid: int) -> Iterable[tuple[str, str]]:
    if _looked is None:
        return procfs.fd_targets(pid)
    key = ("fd", pid)
    if key not in _looked:
        _looked[key] = tuple(procfs.fd_targets(pid))
    return _looked[key]  # type: ignore[no-any-return]


def _mapped_files(pid: int) -> set[str]:
    if _looked is not None and ("maps", pid) in _looked:
        return set(_looked["maps", pid])
    files = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    files.add(parts[5].strip())
    except OSError:
        pass
    if _looked is not None:
        _looked["maps", pid] = frozenset(files)
    return files


@one_look()
def inspect(
    trees: Iterable[ProcessTree],
    everyone: Iterable[ProcessInfo],
) -> list[Finding]:
    """What would stop these trees from being checkpointed and restored."""
    trees = list(trees)
    tree_of = {pid: tree.root.pid for tree in trees for pid in tree.pids}
    units = {pid: tree.root.unit for tree in trees for pid in tree.pids}
    chosen = set(tree_of)
    names = {p.pid: p.name for p in everyone}
    sockets = unix_sockets()
    table = mounts()
    findings: list[Finding] = []
    if sockets is None:
        findings.append(Finding(0, "unix sockets", "could not list unix socket peers (ss)",
                                "install iproute2", blocking=True))
    for tree in trees:
        findings += sandbox_findings(tree)
        findings += replaced_files_findings(tree)
        findings += carried_files_findings(tree, table)
        findings += network_fs_findings(tree, table)
    for pid in sorted(chosen):
        fds = list(_fds(pid))
        for fd, target in fds:
            m = re.fullmatch(r"socket:\[(\d+)\]", target)
            if m and sockets is not None:
                finding = _unix_finding(pid, fd, int(m.group(1)), sockets, tree_of, names,
                                        units.get(pid))
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
        foreign = foreign_files([pid])
        for f in sorted(foreign.values(), key=lambda f: str(f["path"])):
            if str(f["path"]).endswith(procfs.DELETED):
                findings.append(Finding(
                    pid, f["path"], "a file opened in another mount namespace and deleted "
                    "since (HAProxy's startup log buffer): CRIU cannot dump it, and the "
                    "restore cannot open it again", _exclusion_of(units.get(pid), pid),
                    blocking=True))
                continue
            findings.append(Finding(
                pid, f["path"], "a {} opened in another mount namespace ({}): CRIU cannot "
                "dump it as it is".format(*FOREIGN_KINDS[f["kind"]]),
                "dumped as an external file; the restore "
                + ("hands it a new named pipe" if f["kind"] == FOREIGN_FIFO
                   else "opens the same path again"),
                blocking=False))
        fifos |= {f["path"] for f in foreign.values()}
        for path in sorted({t for _, t in fds if t.startswith("/")} | _mapped_files(pid)):
            if path.endswith(" (deleted)") or path in fifos:
                continue  # deleted files travel as ghost files
            if lost_at_boot(path, table):
                if _carried(path):
                    findings.append(Finding(
                        pid, path, "a file on tmpfs or in /tmp: the new boot does not have "
                        "it and CRIU does not copy it into the images",
                        "carried in the checkpoint and made again before the restore",
                        blocking=False))
                    continue
                findings.append(Finding(
                    pid, path, "a large file on tmpfs or in /tmp: the new boot does not have "
                    "it and CRIU does not copy it into the images",
                    f"move it to a disk-backed path, or exclude the process (--exclude pid:{pid})",
                    blocking=True))
    return findings


def _drop_in(unit: str | None, setting: str) -> str:
    if unit is None or not unit.endswith(".service"):
        return f"run it with {setting}"
    return (f"give the unit {setting} (systemctl edit {unit}: [Service] {setting}) and "
            f"restart it once (systemctl restart {unit})")


def sandbox_findings(tree: ProcessTree) -> list[Finding]:
    """What in a tree's sandbox CRIU refuses by design, each with the remedy: once
    applied (a drop-in, a setting, and one restart of the service), it is carried."""
    found: list[Finding] = []
    unit, exclude = tree.root.unit, _exclusion(tree)
    shm = [pid for pid in tree.pids if namespaces.sysv_shm_maps(pid)]
    if shm and not namespaces.own_namespace(tree.root.pid, "ipc"):
        found.append(Finding(
            shm[0], f"SysV shared memory ({len(shm)} processes map it)",
            "a SysV shared memory segment in the host's IPC namespace: CRIU carries SysV "
            "IPC only with an IPC namespace of the tree's own (PostgreSQL keeps one)",
            _drop_in(unit, "PrivateIPC=yes") + f"; or {exclude}", blocking=True))
    owned = namespaces.foreign_owned(tree.root.pid)
    if owned:
        found.append(Finding(
            tree.root.pid, f"user namespace (PrivateUsers=yes) with {', '.join(owned)} "
            "namespaces of the host's",
            "a user namespace of its own beside namespaces the host's user namespace "
            "owns: CRIU cannot enter them from it",
            _drop_in(unit, "PrivateUsers=no") + f"; or {exclude}", blocking=True))
    for pid in tree.pids:
        size = largest_mapping(pid)
        if size // PAGEMAP_RATIO > MAPPING_LIMIT:
            found.append(Finding(
                pid, f"a mapping of {size >> 30} GiB of address space",
                f"CRIU needs {size // PAGEMAP_RATIO >> 20} MiB of memory to dump it (its "
                "page map cache for the largest mapping), more than it can get",
                "make the program reserve less address space (MariaDB: "
                "innodb_buffer_pool_size_max = innodb_buffer_pool_size in its [mariadbd] "
                f"section, then restart it); or {exclude}", blocking=True))
            break
    for pid in tree.pids:
        code = first_code_mapping(pid)
        if code is not None and "s" in code[0]:
            name = next((p.name for p in tree.members if p.pid == pid), "")
            how = ("PHP: opcache.jit_buffer_size=0 in an ini file of its conf.d, then "
                   "restart it" if name.startswith("php") else
                   "turn off the program's JIT, then restart it")
            found.append(Finding(
                pid, f"a shared executable mapping ({code[1] or 'anonymous'})",
                "the lowest executable mapping is shared (a JIT's code buffer): CRIU "
                "writes its parasite's first instructions there, and cannot write to a "
                "shared one", f"{how}; or {exclude}", blocking=True))
            break
    disconnected = namespaces.unreachable_binds(tree.root.pid)
    if disconnected:
        found.append(Finding(
            tree.root.pid, f"a private tmpfs of its own ({', '.join(disconnected)})",
            "a /tmp of a filesystem of the service's own, mounted nowhere else "
            "(PrivateTmp=disconnected, which DynamicUser=yes implies since systemd 256): "
            "CRIU cannot dump such a bind",
            _drop_in(unit, "PrivateTmp=yes") + " (its /tmp then lives in the host's, "
            f"which is carried); or {exclude}", blocking=True))
    streams = namespaces.foreign_unix_sockets(tree.pids, tree.root.pid)
    if streams:
        found.append(Finding(
            streams[0], "a unix socket from outside its network namespace",
            "a network namespace of its own (PrivateNetwork=yes) and a unix socket of the "
            "host's (its journal stream): CRIU finds sockets in the tree's namespace only",
            _drop_in(unit, "PrivateNetwork=no") + f"; or {exclude}", blocking=True))
    uring = [pid for pid in tree.pids if namespaces.uses_io_uring(pid)]
    if uring:
        name = next((p.name for p in tree.members if p.pid == uring[0]), "")
        if name in ("mariadbd", "mysqld"):
            how = "innodb_use_native_aio=0 in its [mariadbd] section, then restart it"
        else:
            # libuv (BIND 9.20's event loop) uses a ring to batch epoll_ctl, with no
            # setting to turn it off, and goes back to plain epoll when it gets none.
            how = (_drop_in(unit, "SystemCallFilter=~io_uring_setup:ENOSYS") + ": a "
                   "program that finds no io_uring falls back to epoll, as libuv's (BIND) "
                   "does; the plan shows whether it did")
        found.append(Finding(
            uring[0], "io_uring", "an io_uring instance: CRIU cannot checkpoint io_uring",
            f"keep the program from io_uring ({how}); or {exclude}", blocking=True))
    return found


#: CRIU 3.17 allocates 8 bytes for every 4 KiB page of a tree's largest mapping, at once.
PAGEMAP_RATIO = 512
MAPPING_LIMIT = 1 << 30


def largest_mapping(pid: int) -> int:
    """The size of ``pid``'s largest mapping, in bytes (0 when it is gone)."""
    largest = 0
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                start, _, end = line.split(" ", 1)[0].partition("-")
                largest = max(largest, int(end, 16) - int(start, 16))
    except (OSError, ValueError):
        pass
    return largest


#: The user address space's end on x86-64 (the vsyscall page lies above it), and the
#: least CRIU takes as room for its parasite's code.
TASK_SIZE = 0x7FFFFFFFF000
PARASITE_ROOM = 4096


def first_code_mapping(pid: int, proc: Path = Path("/proc")) -> tuple[str, str] | None:
    """The permissions and path of ``pid``'s lowest executable mapping, the one CRIU
    injects its parasite through (None when it has none or is gone)."""
    try:
        with open(proc / str(pid) / "maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                start, _, end = fields[0].partition("-")
                low, high = int(start, 16), int(end, 16)
                if "x" in fields[1] and high <= TASK_SIZE and high - low >= PARASITE_ROOM:
                    return fields[1], fields[5].strip() if len(fields) > 5 else ""
    except (OSError, ValueError, IndexError):
        pass
    return None


#: Deleted-but-mapped files (libraries replaced by the upgrade) travel as ghost files in
#: the images, each up to this size (CRIU's default is 1 MiB).
GHOST_LIMIT = 512 << 20


def replaced_files(pids: Iterable[int]) -> dict[str, int]:
    """The files these processes map or hold open that were deleted or replaced on disk
    since (an `apt full-upgrade` replaces libc, libssl ...): path -> size in bytes."""
    found: dict[tuple[int, int], tuple[str, int]] = {}
    for pid in pids:
        for path, st in procfs.deleted_files(pid):
            if stat.S_ISREG(st.st_mode) and not path.startswith(("/dev/", "/memfd:", "/SYSV")):
                found[(st.st_dev, st.st_ino)] = (path, st.st_size)
    return dict(sorted(found.values()))


def replaced_files_findings(tree: ProcessTree) -> list[Finding]:
    """The tree's files replaced on disk since it started: shown, and carried in the
    images as ghost files; one larger than CRIU is allowed to carry blocks."""
    files = replaced_files(tree.pids)
    if not files:
        return []
    large = [p for p, size in files.items() if size > GHOST_LIMIT]
    if large:
        return [Finding(tree.root.pid, f"{large[0]} (deleted)",
                        f"a file deleted or replaced on disk since it was opened, larger "
                        f"than the {GHOST_LIMIT >> 20} MiB the images carry of one",
                        f"restart the process so it opens the new file; or {_exclusion(tree)}",
                        blocking=True)]
    total = sum(files.values())
    names = ", ".join(sorted(files)[:3]) + (", ..." if len(files) > 3 else "")
    return [Finding(tree.root.pid, f"{len(files)} files replaced on disk ({names})",
                    "deleted or replaced on disk since they were opened (a package upgrade): "
                    "the disk no longer has them",
                    f"carried in the images as ghost files ({total / (1 << 20):.1f} MiB)",
                    blocking=False)]


def carried_files_findings(tree: ProcessTree, table: list[tuple[str, str]]) -> list[Finding]:
    """Each open file on tmpfs or in /tmp is small enough to carry (see
    :func:`_carried`), but together they may be more than one tree carries: one left out
    would make the tree's restore fail, so the plan refuses it."""
    sizes = {}
    for path in volatile_files(tree.pids, table):
        with contextlib.suppress(OSError):
            sizes[path] = os.stat(path).st_size
    total = sum(sizes.values())
    if total <= runtime.TREE_LIMIT:
        return []
    largest = sorted(sizes, key=lambda p: sizes[p], reverse=True)
    names = ", ".join(largest[:3]) + (", ..." if len(largest) > 3 else "")
    return [Finding(tree.root.pid, f"{len(sizes)} open files on tmpfs or in /tmp ({names})",
                    f"{total / (1 << 20):.1f} MiB in all: more than the "
                    f"{runtime.TREE_LIMIT >> 20} MiB a tree carries of such files",
                    f"move the larger ones to a disk-backed path; or {_exclusion(tree)}",
                    blocking=True)]


def _exclusion(tree: ProcessTree) -> str:
    return _exclusion_of(tree.root.unit, tree.root.pid)


def _exclusion_of(unit: str | None, pid: int) -> str:
    how = f"--exclude unit:{unit}" if unit else f"--exclude pid:{pid}"
    return f"leave it out ({how}) and let systemd start it afresh after the upgrade"


def _carried(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size <= runtime.FILE_LIMIT


#: Filesystems of the kernel's own, which no disk holds (with VOLATILE_FS).
VIRTUAL_FS = {"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "debugfs", "tracefs",
              "securityfs", "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "autofs",
              "binfmt_misc", "efivarfs", "nsfs"}


def _used_paths(pid: int) -> set[str]:
    """What ``pid`` uses by path: its working directory, root and executable, the files
    it holds open and those it maps."""
    found = {t for _, t in _fds(pid) if t.startswith("/")} | _mapped_files(pid)
    for link in ("cwd", "root", "exe"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/{link}"))
    return {p.removesuffix(procfs.DELETED) for p in found}


def disk_mounts(pids: Iterable[int], table: list[tuple[str, str]] | None = None) -> list[str]:
    """The mount points, other than "/", of the disk (or network) filesystems under which
    these processes use a path: the boot mounts them (fstab) only after init."""
    table = mounts() if table is None else table
    found = set()
    for pid in pids:
        for path in _used_paths(pid):
            point, fstype = mount_of(path, table)
            if point != "/" and fstype not in VOLATILE_FS | VIRTUAL_FS:
                found.add(point)
    return sorted(found)


#: Filesystems the boot mounts once the network is up (remote-fs.target).
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "lustre", "afs",
              "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.s3fs", "fuse.rclone"}


def network_fs_findings(tree: ProcessTree, table: list[tuple[str, str]]) -> list[Finding]:
    """A tree working on a network filesystem (a /home over NFS): the restore runs
    before any network is configured, so the filesystem is not mounted yet and the
    tree cannot come back; with the way back, it would send every tree back."""
    return [Finding(
        tree.root.pid, f"files on {point} ({fs_type(point, table)})",
        "a network filesystem: the new boot mounts it only once the network is up, after "
        "the restore, which cannot open the tree's files then",
        _exclusion(tree), blocking=True)
        for point in disk_mounts(tree.pids, table) if fs_type(point, table) in NETWORK_FS]


#: Mounted before init too: initramfs-tools and dracut mount a /usr of its own.
MOUNTED_BEFORE_INIT = ("/usr",)


@one_look()
def after_init_reasons(trees: Iterable[ProcessTree]) -> list[str]:
    """Why some of these trees cannot be restored before init, as their processes show
    it now: a mount namespace of their own, or files on a filesystem the boot mounts only
    after init. The new boot's restore finds the rest (see seamless.restore.boot)."""
    table = mounts()
    found = []
    for tree in trees:
        why = after_init_reason(
            tree.root.unit or tree.root.command or "?",
            mount_namespace=namespaces.own_namespace(tree.root.pid, "mnt"),
            unmounted=[m for m in disk_mounts(tree.pids, table)
                       if m not in MOUNTED_BEFORE_INIT])
        if why is not None:
            found.append(why)
    return found


def volatile_files(pids: Iterable[int], table: list[tuple[str, str]] | None = None) -> list[str]:
    """The regular files on tmpfs or in /tmp these processes hold open or map, small
    enough to be carried (see :mod:`seamless.runtime`)."""
    table = mounts() if table is None else table
    found = set()
    for pid in pids:
        for path in {t for _, t in _fds(pid) if t.startswith("/")} | _mapped_files(pid):
            if not path.endswith(" (deleted)") and lost_at_boot(path, table) \
                    and _carried(path):
                found.add(path)
    return sorted(found)


def _unix_finding(
    pid: int, fd: str, inode: int, sockets: dict[int, UnixPeer],
    tree_of: dict[int, int], names: dict[int, str], unit: str | None = None,
) -> Finding | None:
    """What the plan says of ``pid``'s socket ``inode`` (``unit``: the systemd unit of
    ``pid``'s tree, which the remedy then names)."""
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
            "carried: the restore connects the two trees again with a new socket pair, "
            "with the bytes in flight", blocking=False)
    if peer.path == JOURNALD_STDOUT:
        return Finding(pid, f"fd {fd} -> journald stdout stream",
                       "a stream to journald, which is restarted rather than preserved",
                       "handed over as an external socket and reconnected at restore",
                       blocking=False)
    return Finding(
        pid, f"fd {fd} -> unix stream socket to {outside}",
        "a stream unix socket to a process that is not checkpointed "
        "(CRIU can't dump half of a stream connection)",
        f"{_exclusion_of(unit, pid)}; or include the peer in the checkpoint", blocking=True)
