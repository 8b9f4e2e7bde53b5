"""Restoring the trees of a checkpoint, in order, one failure not stopping the others."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from seamless.criu import (
    CgroupMode,
    CriuError,
    CriuOptions,
    CriuResult,
    CriuTimeoutError,
    NotifyHandler,
)
from seamless.memstore.handoff import TREE_INFO
from seamless.restore.restorer import restore_all, restore_options


class FakeCriu:
    def __init__(self, fail: set[str]) -> None:
        self.fail = fail
        self.calls: list[tuple[str, CriuOptions]] = []

    def restore(self, images_dir: Path, options: CriuOptions | None = None,
                on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        assert options is not None
        for inherit in options.inherit_fd:
            os.fstat(inherit.fd)  # open while CRIU runs
        self.calls.append((images_dir.name, options))
        if images_dir.name in self.fail:
            raise CriuError("restore", "CRIU reported failure; errno 17 EEXIST")
        return CriuResult("restore", 0.1, pid=int(images_dir.name))

    def features(self, *names: str) -> dict[str, bool]:
        return dict.fromkeys(names, True)


def write_tree(root: Path, pid: int, order: int, external: list[str]) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / TREE_INFO).write_text(json.dumps({
        "order": order, "root": pid, "pids": [pid], "unit": f"app{pid}.service",
        "cgroup": f"/system.slice/app{pid}.service", "command": f"/usr/bin/app{pid} --x",
        "user": "root", "external": external,
    }))


def test_trees_come_back_in_order_and_a_failure_stops_none(tmp_path: Path) -> None:
    write_tree(tmp_path, 300, 0, [])
    write_tree(tmp_path, 100, 2, ["unix[555]"])
    write_tree(tmp_path, 200, 1, [])
    criu = FakeCriu(fail={"200"})
    opened: list[int] = []

    def stream(identifier: str, unit: str | None) -> int:
        assert identifier == "app100" and unit == "app100.service"
        r, w = os.pipe()
        os.close(r)
        opened.append(w)
        return w

    report = restore_all(tmp_path, criu, stream=stream)

    assert [name for name, _ in criu.calls] == ["300", "200", "100"]
    assert not report.ok
    assert [t.root for t in report.failed] == [200]
    assert "EEXIST" in (report.failed[0].error or "")
    restored = {t.root: t.pid for t in report.trees if t.restored}
    assert restored == {300: 300, 100: 100}
    options = dict(criu.calls)["100"]
    assert options.ext_unix_sk and options.inherit_fd[0].key == "socket:[555]"
    assert options.manage_cgroups == CgroupMode.SOFT and options.shell_job
    for fd in opened:  # our copies are closed once CRIU is done
        try:
            os.fstat(fd)
            raise AssertionError("fd left open")
        except OSError:
            pass
    assert report.to_json()["trees"][1]["restored"] is False


class FakePager:
    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_a_lazy_restore_keeps_the_daemon_of_each_tree_restored(tmp_path: Path) -> None:
    """Each tree gets its daemon before CRIU restores it lazily; a tree that fails ends its
    daemon; the report keeps the others'."""
    write_tree(tmp_path, 300, 0, [])
    write_tree(tmp_path, 200, 1, [])
    criu = FakeCriu(fail={"200"})
    started: list[FakePager] = []

    def pager(images_dir: Path) -> Any:
        started.append(FakePager(images_dir))
        return started[-1]

    report = restore_all(tmp_path, criu, stream=lambda *_: os.open(os.devnull, os.O_WRONLY),
                         pager=pager)

    assert [o.lazy_pages for _, o in criu.calls] == [True, True]
    assert [p.images_dir.name for p in started] == ["300", "200"]
    assert list(report.pagers) == [300] and report.pagers[300] is started[0]  # type: ignore[comparison-overlap]
    assert not started[0].stopped
    assert started[1].stopped  # its restore failed
    lazy = {t.root: t.lazy for t in report.trees}
    assert lazy == {300: True, 200: False}


def test_restore_command_refuses_a_directory_without_trees(tmp_path: Path) -> None:
    """Bad input: a clear error, exit 1, and no CRIU started (safe on this host)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "seamless", "restore", "--images",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode in (1,), out.stderr
    assert "no checkpointed tree" in out.stderr or "needs root" in out.stderr
    assert "Traceback" not in out.stderr


def test_socket_directories_are_recorded_and_made_again(tmp_path: Path) -> None:
    """A tree that bound a unix socket in /tmp/x: its directory (mode, owner) is recorded
    at dump time and made again before the restore when the new boot cleaned it."""
    import socket as socketlib

    from seamless.collect.resources import bound_unix_paths, socket_dirs
    from seamless.restore.restorer import recreate_dirs

    table = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
             "0000: 00000002 00000000 00010000 0001 01 13691 /tmp/tmux-0/default\n"
             "0000: 00000002 00000000 00010000 0001 01 13692 @abstract\n"
             "0000: 00000003 00000000 00000000 0001 03 13693\n")
    assert bound_unix_paths(table) == {13691: "/tmp/tmux-0/default"}

    d = tmp_path / "sockdir"
    d.mkdir(mode=0o750)
    d.chmod(0o750)
    with socketlib.socket(socketlib.AF_UNIX) as s:
        s.bind(str(d / "sock"))
        inode = os.fstat(s.fileno()).st_ino
        recorded = socket_dirs([os.getpid()], {inode: str(d / "sock")})
    assert recorded == [{"path": str(d), "mode": 0o750, "uid": os.getuid(), "gid": os.getgid()}]
    (d / "sock").unlink()
    d.rmdir()
    recreate_dirs(recorded)
    assert d.is_dir() and d.stat().st_mode & 0o7777 == 0o750


def test_the_restore_locks_connections_the_way_the_dump_did() -> None:
    from seamless.collect.checkpoint import dump_options
    from seamless.collect.processes import ProcessInfo, ProcessTree

    p = ProcessInfo(42, 1, "app", ("app",), "root", "/system.slice/app.service", 1 << 20)
    dumped = dump_options(ProcessTree(p, [p]))
    restored = restore_options(())
    assert restored.tcp_established and dumped.tcp_established
    # external sockets: every one the dump allows, the restore connects again (CRIU
    # refuses an external peer in the image without it, at a path or an abstract name)
    assert restored.ext_unix_sk and dumped.ext_unix_sk
    assert restored.network_lock == dumped.network_lock is not None


# --- the addresses of established and listening TCP sockets ----------------------------------

ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0202000A\t0003\t0\t0\t1024\t00000000\t0\t0\t0
eth0\t0002000A\t00000000\t0001\t0\t0\t1024\t00FFFFFF\t0\t0\t0
"""


def test_network_addresses_name_interface_prefix_and_gateway() -> None:
    import socket
    from types import SimpleNamespace as NS

    import psutil

    from seamless.collect.resources import Network, default_gateways

    def conn(pid: int, ip: str, status: str = psutil.CONN_ESTABLISHED) -> NS:
        return NS(pid=pid, status=status, laddr=NS(ip=ip, port=22))

    conns = [conn(10, "10.0.2.15"), conn(10, "127.0.0.1"), conn(11, "fd00::5"),
             conn(10, "192.168.9.9", psutil.CONN_LISTEN), conn(99, "172.16.0.1")]
    interfaces = {
        "lo": [NS(family=socket.AF_INET, address="127.0.0.1", netmask="255.0.0.0")],
        "eth0": [NS(family=socket.AF_INET, address="10.0.2.15", netmask="255.255.255.0"),
                 NS(family=socket.AF_INET6, address="fd00::5", netmask="ffff:ffff:ffff:ffff::"),
                 NS(family=socket.AF_INET, address="192.168.9.9", netmask="255.255.255.0")],
        "eth1": [NS(family=socket.AF_INET, address="172.16.0.1", netmask="255.255.0.0")],
    }
    assert default_gateways(ROUTES) == {"eth0": "10.0.2.2"}

    # 10.0.2.15 and fd00::5 are DHCP and SLAAC leases; 192.168.9.9 is static
    leases = {"eth0": {"10.0.2.15": (3600, 1800), "fd00::5": (600, 600)}}
    def network(conns: list[NS], uplinks: set[str], now: float = 1000.0) -> Network:
        gateways = default_gateways(ROUTES) if uplinks else {}
        return Network(conns, interfaces, gateways, uplinks, leases, now)

    found = network(conns, {"eth0"}).addresses([10, 11])

    # a listening socket's address is in; loopback and another process's connection not;
    # a leased address says until when
    assert found == [
        {"interface": "eth0", "address": "10.0.2.15", "prefix": 24, "gateway": "10.0.2.2",
         "valid_until": 4600, "preferred_until": 2800},
        {"interface": "eth0", "address": "192.168.9.9", "prefix": 24, "gateway": "10.0.2.2"},
        {"interface": "eth0", "address": "fd00::5", "prefix": 64,
         "valid_until": 1600, "preferred_until": 1600},
    ]

    # Listening on every address: the leased addresses of the uplinks (here eth0), IPv6
    # ones too for "::", not the static one (it may be a failover's virtual address, and
    # the network manager configures it itself), none of another interface's; an IPv4
    # connection on an IPv6 socket is its IPv4 address, ::ffff:0.0.0.0 every IPv4 one.
    addresses = {
        listening: [e["address"] for e in network(
            [conn(12, listening, psutil.CONN_LISTEN)], {"eth0"}).addresses([12])]
        for listening in ("0.0.0.0", "::", "::ffff:172.16.0.1", "::ffff:0.0.0.0")}
    assert addresses == {"0.0.0.0": ["10.0.2.15"],
                         "::": ["10.0.2.15", "fd00::5"],
                         "::ffff:172.16.0.1": ["172.16.0.1"],
                         "::ffff:0.0.0.0": ["10.0.2.15"]}
    # listening on every address with no uplink: nothing to bring up
    assert network([conn(12, "0.0.0.0", psutil.CONN_LISTEN)], set()).addresses([12]) == []

    # a connection closing at the freeze (CLOSE_WAIT: the client hung up first) and a
    # UDP socket are bound to their addresses too: CRIU binds them back
    closing = network([conn(13, "172.16.0.1", psutil.CONN_CLOSE_WAIT),
                       conn(13, "192.168.9.9", psutil.CONN_NONE)], set()).addresses([13])
    assert [e["address"] for e in closing] == ["192.168.9.9", "172.16.0.1"]

    # networkd's .network file of the interface goes with each lease, not a static one
    managed = Network(conns, interfaces, default_gateways(ROUTES), {"eth0"}, leases, 1000.0,
                      {"eth0": "10-dhcp.network"})
    assert [e.get("network_file") for e in managed.addresses([10, 11])] == [
        "10-dhcp.network", None, "10-dhcp.network"]


def test_networkd_s_file_of_each_link(tmp_path: Path) -> None:
    """networkd's state of each link names the .network file it configures the link
    with; a link gone since, or a name that is no index, is left out."""
    import socket

    from seamless.collect.resources import networkd_files

    (tmp_path / "1").write_text("ADMIN_STATE=configured\n"
                                "NETWORK_FILE=/etc/systemd/network/10-lo.network\n")
    (tmp_path / "999999").write_text("NETWORK_FILE=/etc/systemd/network/20-gone.network\n")
    (tmp_path / "lock").write_text("")
    assert networkd_files(tmp_path) == {socket.if_indextoname(1): "10-lo.network"}
    assert networkd_files(tmp_path / "none") == {}


def test_only_the_network_files_of_the_leases_put_back_keep_them(tmp_path: Path) -> None:
    """The drop-ins go to the .network files that managed the leases put back; when a
    lease's file is not known (""), or none is given, to every .network file."""
    from seamless.restore.restorer import NETWORKD_KEEP, keep_leases_through_networkd

    shipped = tmp_path / "usr/lib/systemd/network"
    shipped.mkdir(parents=True)
    for name in ("10-dhcp.network", "80-container-ve.network", "80-vm-vt.network"):
        (shipped / name).write_text("[Network]\nDHCP=yes\n")

    def kept(files: list[str]) -> list[str]:
        for old in tmp_path.glob("run/systemd/network/*.d/" + NETWORKD_KEEP):
            old.unlink()
        return [p.parent.name for p in keep_leases_through_networkd(tmp_path, files)]

    assert kept(["10-dhcp.network"]) == ["10-dhcp.network.d"]
    assert kept(["10-dhcp.network", ""]) == kept([]) == [
        "10-dhcp.network.d", "80-container-ve.network.d", "80-vm-vt.network.d"]


IP_ADDR_JSON = """[
 {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8,
   "scope": "host", "valid_life_time": 4294967295, "preferred_life_time": 4294967295}]},
 {"ifname": "eth0", "addr_info": [
  {"family": "inet", "local": "10.0.2.15", "prefixlen": 24, "scope": "global",
   "dynamic": true, "valid_life_time": 86372, "preferred_life_time": 86372},
  {"family": "inet", "local": "10.0.2.100", "prefixlen": 32, "scope": "global",
   "valid_life_time": 4294967295, "preferred_life_time": 4294967295},
  {"family": "inet6", "local": "fd00::5", "prefixlen": 64, "scope": "global",
   "dynamic": true, "mngtmpaddr": true, "valid_life_time": 86000, "preferred_life_time": 14000},
  {"family": "inet6", "local": "fd00::a1b2", "prefixlen": 64, "scope": "global",
   "temporary": true, "dynamic": true, "valid_life_time": 600, "preferred_life_time": 300},
  {"family": "inet6", "local": "fd00::dead", "prefixlen": 64, "scope": "global",
   "dynamic": true, "deprecated": true, "valid_life_time": 60, "preferred_life_time": 0},
  {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link",
   "valid_life_time": 4294967295, "preferred_life_time": 4294967295}]}
]"""


def test_leased_addresses_are_the_dynamic_ones_in_use() -> None:
    from seamless.collect.resources import leased_addresses

    # not the static or virtual 10.0.2.100, a privacy, a deprecated or a link-local one
    assert leased_addresses(IP_ADDR_JSON) == {
        "eth0": {"10.0.2.15": (86372, 86372), "fd00::5": (86000, 14000)}}
    assert leased_addresses("[]") == {}


#: ``networkctl --json=short`` (systemd 257) after a boot that kept the leases
#: (KeepConfiguration=dhcp): the DHCPv4 address has no lifetime, its lease a renewal time;
#: a static one and the NDisc one (whose lifetime the kernel shows) are not networkd's
#: leases to add.
NETWORKCTL_JSON = """{"Interfaces": [
 {"Name": "lo", "Addresses": [{"Address": [127, 0, 0, 1], "ConfigSource": "foreign"}]},
 {"Name": "eth0", "DHCPv4Client": {"Lease": {"LeaseTimestampUSec": 107944798,
   "Timeout1USec": 43307944798, "Timeout2USec": 75707944798}},
  "Addresses": [
   {"Address": [10, 0, 2, 15], "ConfigSource": "DHCPv4", "ConfigState": "configured"},
   {"Address": [10, 0, 2, 100], "ConfigSource": "static"},
   {"Address": [254, 192, 0, 0, 0, 0, 0, 0, 80, 84, 0, 255, 254, 18, 52, 86],
    "ConfigSource": "NDisc", "ValidLifetimeUSec": 86508951458}]},
 {"Name": "eth1", "Addresses": [{"Address": [192, 0, 2, 7], "ConfigSource": "DHCPv4"}]}
]}"""


def test_networkd_s_kept_leases_count_as_leased_until_their_renewal() -> None:
    """networkd keeping its leases gives them no lifetime in the kernel: the lease is
    read off networkd instead, valid until its renewal (T1) at the latest."""
    from seamless.collect.resources import networkd_leases

    assert networkd_leases(NETWORKCTL_JSON, boottime=200.0) == {
        "eth0": {"10.0.2.15": (43107, 43107)}}
    assert networkd_leases(NETWORKCTL_JSON, boottime=43400.0) == {}  # due for renewal
    assert networkd_leases("", boottime=1.0) == {} == networkd_leases("[]", boottime=1.0)


def test_networkd_is_asked_only_when_it_holds_a_lease(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read while the trees are frozen: no networkctl on a server whose networkd holds
    no DHCP lease (static addresses, another network manager)."""
    from seamless.collect import resources
    from seamless.run import CommandError

    asked: list[list[str]] = []

    def run(argv: list[str], **_: object) -> Any:
        asked.append(argv)
        raise CommandError(argv, 1, "networkd does not run")

    monkeypatch.setattr(resources, "run", run)
    monkeypatch.setattr(resources, "NETWORKD_LEASES", tmp_path)
    assert resources.networkd_leases() == {} and asked == []
    (tmp_path / "2").touch()
    assert resources.networkd_leases() == {} and asked == [["networkctl", "--json=short"]]


def test_uplinks_are_the_default_route_s_interfaces_and_the_network_devices(
        tmp_path: Path) -> None:
    from seamless.collect.resources import uplink_interfaces

    for name, device in (("lo", False), ("eth0", True), ("br0", False), ("veth1", False),
                         ("enp1s0", True)):
        (tmp_path / name).mkdir()
        if device:
            (tmp_path / name / "device").symlink_to(tmp_path)
    # the test bed's guest has no default route: its NIC is still an uplink
    assert uplink_interfaces({}, tmp_path) == {"eth0", "enp1s0"}
    assert uplink_interfaces({"br0": "192.0.2.1"}, tmp_path) == {"br0", "eth0", "enp1s0"}
    assert uplink_interfaces({"br0": "192.0.2.1"}, tmp_path / "missing") == {"br0"}


def test_bring_up_adds_only_missing_addresses() -> None:
    from seamless.restore.restorer import bring_up_addresses

    commands: list[list[str]] = []

    def ip(args: list[str]) -> bool:
        commands.append(args)
        return True

    wanted = [{"interface": "eth0", "address": "10.0.2.15", "prefix": 24, "gateway": "10.0.2.2",
               "valid_until": 4600, "preferred_until": 2800},
              {"interface": "eth0", "address": "10.0.2.16", "prefix": 24, "gateway": "10.0.2.2"},
              {"interface": "eth0", "address": "fd00::5", "prefix": 64},
              {"interface": "eth0", "address": "fd00::6", "prefix": 64, "valid_until": 900},
              {"interface": "eth1", "address": "172.16.0.1", "prefix": 16}]

    added = bring_up_addresses(wanted, present=lambda: {"172.16.0.1"}, command=ip, now=1000)

    # the lease's time left; one default route per gateway; none for a lease run out
    assert added == ["10.0.2.15/24 on eth0", "10.0.2.16/24 on eth0", "fd00::5/64 on eth0"]
    assert commands == [
        ["link", "set", "eth0", "up"],
        ["addr", "add", "10.0.2.15/24", "dev", "eth0", "valid_lft", "3600",
         "preferred_lft", "1800"],
        ["route", "add", "default", "via", "10.0.2.2", "dev", "eth0"],
        ["link", "set", "eth0", "up"],
        ["addr", "add", "10.0.2.16/24", "dev", "eth0"],
        ["link", "set", "eth0", "up"],
        ["addr", "add", "fd00::5/64", "dev", "eth0", "nodad"],
    ]
    assert bring_up_addresses([], present=lambda: set(), command=ip) == []


def test_what_the_new_boot_does_not_have() -> None:
    """Files on tmpfs and in /tmp (emptied at every boot) are lost; devices are not
    files of that kind; /var/tmp stays."""
    from seamless.collect.resources import lost_at_boot

    table = [("/run", "tmpfs"), ("/dev/shm", "tmpfs"), ("/dev", "devtmpfs"), ("/", "ext4")]
    assert lost_at_boot("/run/crond.pid", table)
    assert lost_at_boot("/dev/shm/PostgreSQL.1", table)
    assert lost_at_boot("/tmp/app.lock", table)  # on the root's disk, emptied at boot
    assert not lost_at_boot("/dev/null", table)
    assert not lost_at_boot("/var/tmp/app.lock", table)
    assert not lost_at_boot("/proc/1/status", table)


def test_the_disk_mounts_a_tree_uses_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount points, other than the root's, of the disk filesystems under a tree's
    working directory and open files: a restore before init waits for them. A tmpfs
    (carried along) and the kernel's own filesystems are not recorded."""
    from seamless.collect.resources import disk_mounts

    for d in ("srv", "data", "shm", "unused"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "srv")
    table = sorted([(str(tmp_path / d), fs) for d, fs in (
        ("srv", "xfs"), ("data", "ext4"), ("shm", "tmpfs"), ("unused", "ext4"))]
        + [("/proc", "proc"), ("/", "ext4")], key=lambda m: len(m[0]), reverse=True)
    with open(tmp_path / "data/db", "w"), open(tmp_path / "shm/lock", "w"):
        assert disk_mounts([os.getpid()], table) == [str(tmp_path / "data"),
                                                      str(tmp_path / "srv")]
    monkeypatch.chdir("/")
    assert disk_mounts([os.getpid()], table) == []
    assert disk_mounts([2**22 + 1], table) == []  # no such process


def test_the_upgrade_tells_which_trees_wait_for_the_real_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree working on a filesystem of its own (not /usr, which the initramfs mounts)
    is named with the mount point; one working on the root's is not."""
    from seamless.collect import resources
    from seamless.collect.processes import ProcessInfo, ProcessTree

    (tmp_path / "srv").mkdir()
    me = ProcessInfo(os.getpid(), 1, "app", ("app",), "root", "/system.slice/app.service", 0)
    tree = ProcessTree(me, [me])
    monkeypatch.setattr(resources, "mounts", lambda: [
        (str(tmp_path / "srv"), "ext4"), ("/usr", "ext4"), ("/", "ext4")])
    monkeypatch.chdir(tmp_path / "srv")
    assert resources.after_init_reasons([tree]) == [
        f"app.service: its files on {tmp_path / 'srv'}, mounted after init"]
    monkeypatch.chdir("/usr")
    assert resources.after_init_reasons([tree]) == []


def test_a_tree_working_on_a_network_filesystem_is_refused_by_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore runs before the network: a tree on NFS cannot come back, so the plan
    says so, with how to leave it out; one on a local filesystem of its own is fine."""
    from seamless.collect import resources
    from seamless.collect.processes import ProcessInfo, ProcessTree

    (tmp_path / "home").mkdir()
    me = ProcessInfo(os.getpid(), 1, "tmux", ("tmux",), "root", "/user.slice/a.scope", 0)
    tree = ProcessTree(me, [me])
    table = [(str(tmp_path / "home"), "nfs4"), ("/", "ext4")]
    monkeypatch.chdir(tmp_path / "home")
    [finding] = resources.network_fs_findings(tree, table)
    assert finding.blocking and finding.pid == os.getpid()
    assert finding.resource == f"files on {tmp_path / 'home'} (nfs4)"
    assert "--exclude unit:a.scope" in finding.hint
    assert resources.network_fs_findings(tree, [(str(tmp_path / "home"), "xfs"),
                                                ("/", "ext4")]) == []


def test_named_pipes_on_tmpfs_are_recorded_and_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pam_systemd's session pipe (/run/systemd/sessions/N.ref, held by sshd) lives on
    tmpfs: recorded with mode and owner, not a blocking finding, made again (with its
    directory) before the restore."""
    from seamless.collect import resources
    from seamless.collect.resources import volatile_fifos

    monkeypatch.setattr(resources, "CLEANED_AT_BOOT", ())  # tmp_path is in /tmp
    from seamless.restore.restorer import recreate_fifos

    run = tmp_path / "run"
    fifo = run / "systemd/sessions/3.ref"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo, 0o600)
    fifo.chmod(0o620)
    fd = os.open(fifo, os.O_RDWR)  # open, as sshd holds it
    try:
        tmpfs = [(str(run), "tmpfs"), ("/", "ext4")]
        recorded = volatile_fifos([os.getpid()], tmpfs)
        assert recorded == [{"path": str(fifo), "mode": 0o620, "uid": os.getuid(),
                             "gid": os.getgid()}]
        assert volatile_fifos([os.getpid()], [("/", "ext4")]) == []  # on disk: it stays
    finally:
        os.close(fd)
    fifo.unlink()
    fifo.parent.rmdir()

    recreate_fifos(recorded)

    import stat as statlib
    st = fifo.stat()
    assert statlib.S_ISFIFO(st.st_mode) and statlib.S_IMODE(st.st_mode) == 0o620
    recreate_fifos(recorded)  # already there: left alone


def test_pipes_from_another_mount_namespace_become_external_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """logind passes sshd its session pipe from its own mount namespace: CRIU cannot
    find that mount, so the pipe is dumped as an external file (file[MNT:INODE]) and
    not recorded to be made again at its path; the restore hands it a new named pipe."""
    import stat as statlib

    from seamless.collect import resources
    from seamless.restore.restorer import new_pipe

    fifo = tmp_path / "1.ref"
    os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDWR)
    try:
        mnt = resources._fd_mount_id(os.getpid(), str(fd))
        assert mnt is not None and mnt in resources._mount_ids(os.getpid())
        assert resources.foreign_fifos([os.getpid()]) == {}  # our own namespace's
        monkeypatch.setattr(resources, "_mount_ids", lambda pid: {-1})  # as if foreign
        found = resources.foreign_fifos([os.getpid()])
        assert found == {f"file[{mnt:x}:{fifo.stat().st_ino:x}]": str(fifo)}
        assert resources.volatile_fifos([os.getpid()], [(str(tmp_path), "tmpfs")]) == []
    finally:
        os.close(fd)

    new = new_pipe(4242, 0, tmp_path / "pipes")
    try:
        assert statlib.S_ISFIFO(os.fstat(new).st_mode)
        assert (tmp_path / "pipes" / "4242-0").exists()
    finally:
        os.close(new)


# --- the lock of TCP connections, made again in the new kernel -------------------------------


def test_established_connections_are_recorded_as_criu_locks_them() -> None:
    from types import SimpleNamespace as NS

    import psutil

    from seamless.collect.resources import Network

    def conn(pid: int, local: str, remote: str | None,
             status: str = psutil.CONN_ESTABLISHED) -> NS:
        return NS(pid=pid, status=status, laddr=NS(ip=local, port=22),
                  raddr=NS(ip=remote, port=47306) if remote else ())

    conns = [conn(10, "::ffff:10.0.2.15", "::ffff:10.0.2.2"), conn(11, "fd00::5", "fd00::1"),
             conn(10, "127.0.0.1", "127.0.0.1"), conn(10, "0.0.0.0", None, psutil.CONN_LISTEN),
             conn(99, "10.0.2.15", "10.0.2.9")]

    found = Network(conns, {}, {}, set(), {}, 0.0).established([10, 11])

    assert found == [
        {"family": 4, "local": "10.0.2.15", "lport": 22, "remote": "10.0.2.2", "rport": 47306},
        {"family": 6, "local": "fd00::5", "lport": 22, "remote": "fd00::1", "rport": 47306},
    ]


def test_loopback_connections_are_recorded_apart() -> None:
    """A connection over loopback is between two trees of this machine (a client and its
    database): recorded apart, to stay locked until both are back."""
    from types import SimpleNamespace as NS

    import psutil

    from seamless.collect.resources import Network

    conns = [NS(pid=10, status=psutil.CONN_ESTABLISHED, laddr=NS(ip="127.0.0.1", port=5432),
                raddr=NS(ip="127.0.0.1", port=40000)),
             NS(pid=10, status=psutil.CONN_ESTABLISHED, laddr=NS(ip="10.0.2.15", port=22),
                raddr=NS(ip="10.0.2.2", port=50000))]
    network = Network(conns, {}, {}, set(), {}, 0.0)
    assert network.established([10], loopback=True) == [
        {"family": 4, "local": "127.0.0.1", "lport": 5432, "remote": "127.0.0.1",
         "rport": 40000}]
    assert [c["local"] for c in network.established([10])] == ["10.0.2.15"]


def test_the_lock_is_criu_s_table_with_each_connection_both_ways() -> None:
    from seamless.restore.netlock import lock_script

    script = lock_script(501, [
        {"family": 4, "local": "10.0.2.15", "lport": 22, "remote": "10.0.2.2", "rport": 47306}])
    lines = script.splitlines()
    # a table left by an earlier attempt goes first
    assert lines[:3] == ["add table inet CRIU-501", "delete table inet CRIU-501",
                         "add table inet CRIU-501"]
    assert ("add chain inet CRIU-501 input { type filter hook input priority 0; }" in lines)
    assert "add rule inet CRIU-501 output meta mark 0xC114 accept" in lines
    assert ("add rule inet CRIU-501 input ip saddr . tcp sport . ip daddr . tcp dport @conns4 "
            "drop") in lines
    assert lines[-2:] == [
        "add element inet CRIU-501 conns4 { 10.0.2.2 . 47306 . 10.0.2.15 . 22 }",
        "add element inet CRIU-501 conns4 { 10.0.2.15 . 22 . 10.0.2.2 . 47306 }"]


RUN_ID = "0f4c1a52-9d1e-4b8e-a3f0-5b2d7c9e1a44"
#: CRIU 4.1's name for it: "inet CRIU-" and the run id, in a buffer of 32 bytes.
TABLE_41 = "CRIU-0f4c1a52-9d1e-4b8e-a3"


def inventory(run_id: str | None) -> bytes:
    """An inventory.img as CRIU writes it: its magic, then one entry (its size, then the
    protobuf message: img_version = 2 and, from CRIU 4.1, dump_criu_run_id)."""
    message = b"\x08\x02" + (b"\x6a" + bytes([len(run_id)]) + run_id.encode() if run_id else b"")
    return struct.pack("<II", 0x58313116, len(message)) + message


def test_the_lock_table_is_named_as_the_dumping_criu_names_it(tmp_path: Path) -> None:
    from seamless.restore.netlock import table

    assert table(501) == "inet CRIU-501"
    assert table(501, tmp_path) == "inet CRIU-501"  # no inventory
    (tmp_path / "inventory.img").write_bytes(inventory(None))  # CRIU 3.17
    assert table(501, tmp_path) == "inet CRIU-501"
    (tmp_path / "inventory.img").write_bytes(inventory(RUN_ID))
    assert table(501, tmp_path) == f"inet {TABLE_41}"
    (tmp_path / "inventory.img").write_bytes(b"\x16\x31\x31\x58\xff\x00\x00\x00\x08")
    assert table(501, tmp_path) == "inet CRIU-501"  # cut short: as if none


def test_connections_are_locked_before_any_address_and_unlocked_after_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from seamless.restore import restorer

    conn: dict[str, Any] = {"family": 4, "local": "10.0.2.15", "lport": 22,
                            "remote": "10.0.2.2", "rport": 47306}
    for pid, order in ((300, 0), (200, 1), (100, 2)):
        write_tree(tmp_path, pid, order, [])
        info_file = tmp_path / str(pid) / TREE_INFO
        info = json.loads(info_file.read_text())
        if pid != 100:  # 100 has no connection: nothing to lock
            info["connections"] = [{**conn, "rport": conn["rport"] + pid}]
            info["addresses"] = [{"interface": "eth0", "address": "10.0.2.15", "prefix": 24}]
        info_file.write_text(json.dumps(info))
    # 300 was dumped by CRIU 4.1, which names its table after the dump's run id
    (tmp_path / "300" / "inventory.img").write_bytes(inventory(RUN_ID))
    events: list[str] = []

    def bring_up(addresses: list[Any]) -> list[str]:
        events.append(f"addresses {len(addresses)}")
        return []

    monkeypatch.setattr(restorer, "bring_up_addresses", bring_up)

    def nft(script: str) -> None:
        table = script.splitlines()[0].removeprefix("add table inet ")
        events.append(("lock " if "add element" in script else "unlock ") + table)

    restore_all(tmp_path, recording(FakeCriu(fail={"200"}), events),
                stream=lambda *_: os.open(os.devnull, os.O_WRONLY), nft=nft)

    assert events == [
        f"lock {TABLE_41}", "lock CRIU-200",  # before the first address comes up
        "addresses 1", "restore 300", f"unlock {TABLE_41}",
        "addresses 1", "restore 200", "unlock CRIU-200",  # failed: CRIU left it
        "addresses 0", "restore 100",
    ]


def recording(criu: FakeCriu, events: list[str]) -> FakeCriu:
    """``criu``, adding "restore NAME" to ``events`` for each tree it restores."""
    real_restore = criu.restore

    def restore(images_dir: Path, options: CriuOptions | None = None,
                on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        events.append(f"restore {images_dir.name}")
        return real_restore(images_dir, options, on_notify)

    criu.restore = restore  # type: ignore[method-assign]
    return criu


def test_loopback_connections_stay_locked_until_every_tree_is_back(tmp_path: Path) -> None:
    """Both ends of a connection over loopback, in two trees: one table holds it (once,
    though both trees recorded it) from before the first restore until after the last,
    whatever order the restore uses and even when one tree fails."""
    server = {"family": 4, "local": "127.0.0.1", "lport": 6379, "remote": "127.0.0.1",
              "rport": 40000}
    client = {"family": 4, "local": "127.0.0.1", "lport": 40000, "remote": "127.0.0.1",
              "rport": 6379}
    for pid, order, conn in ((300, 0, server), (200, 1, client)):
        write_tree(tmp_path, pid, order, [])
        info_file = tmp_path / str(pid) / TREE_INFO
        info = json.loads(info_file.read_text())
        info["loopback"] = [conn]
        info_file.write_text(json.dumps(info))
    events: list[str] = []

    def nft(script: str) -> None:
        table = script.splitlines()[0].removeprefix("add table inet ")
        elements = [line for line in script.splitlines() if "add element" in line]
        events.append(f"lock {table} {len(elements)}" if elements else f"unlock {table}")

    restore_all(tmp_path, recording(FakeCriu(fail={"200"}), events),
                stream=lambda *_: os.open(os.devnull, os.O_WRONLY), nft=nft)
    # one connection, both directions: two elements
    assert events == ["lock seamless-loopback 2", "restore 300", "restore 200",
                      "unlock seamless-loopback"]


def test_trees_connected_by_a_unix_stream_are_connected_again(tmp_path: Path) -> None:
    """An application and its database, two trees, talk over a unix stream: each end
    was dumped as external; the restore hands the two trees the ends of one new socket
    pair, with what each end had queued unread, in whatever order it restores them."""
    import base64
    import socket

    from seamless.collect.resources import UnixPeer, nonblocking_sockets, streams_between

    app, db = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        app.sendall(b"SELECT 1")  # the database has not read the query yet
        db.sendall(b"row")  # nor the application its answer to an earlier one
        a, d = os.fstat(app.fileno()).st_ino, os.fstat(db.fileno()).st_ino
        me = os.getpid()
        table = {a: UnixPeer(a, d, "*", True, (me,)), d: UnixPeer(d, a, "*", True, (4242,))}
        found = streams_between([me], table)
        mine = next(s for s in found if s["inode"] == a)
        assert base64.b64decode(mine["queue"]) == b"row" and mine["peer"] == d
        assert app.recv(16) == b"row"  # peeked, not taken
        assert streams_between([me, 4242], table) == []  # both ends in one tree
        # the database waits in epoll and reads a non-blocking socket; the application
        # reads a blocking one: each gets a socket like its own
        db.setblocking(False)
        assert nonblocking_sockets([me], [a, d]) == [d]
        assert nonblocking_sockets([me], [a]) == []
    finally:
        app.close()
        db.close()

    for pid, order, inode, peer, queue in ((300, 0, 11, 22, b"row"), (200, 1, 22, 11, b"Q")):
        write_tree(tmp_path, pid, order, [f"unix[{inode}]"])
        info_file = tmp_path / str(pid) / TREE_INFO
        info = json.loads(info_file.read_text())
        info["streams"] = [{"inode": inode, "peer": peer,
                            "queue": base64.b64encode(queue).decode()}]
        info["nonblocking"] = [22] if pid == 200 else []
        info_file.write_text(json.dumps(info))
    handed: dict[str, int] = {}

    class Keeping(FakeCriu):
        def restore(self, images_dir: Path, options: CriuOptions | None = None,
                    on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
            assert options is not None and options.ext_unix_sk
            for i in options.inherit_fd:
                handed[i.key] = os.dup(i.fd)
            return super().restore(images_dir, options, on_notify)

    restore_all(tmp_path, Keeping(fail=set()), stream=lambda *_: os.open(os.devnull, os.O_WRONLY))
    first = socket.socket(fileno=handed["socket:[11]"])
    second = socket.socket(fileno=handed["socket:[22]"])
    try:
        assert os.get_blocking(first.fileno()) and not os.get_blocking(second.fileno())
        assert first.recv(16) == b"row" and second.recv(16) == b"Q"
        first.sendall(b"again")
        assert second.recv(16) == b"again"
    finally:
        first.close()
        second.close()


def test_an_interrupted_lazy_restore_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error no tree catches: the trees restored lazily are stopped with their daemons
    (their memory would never arrive) and no connection stays locked."""
    from seamless.restore import restorer

    for pid, order in ((300, 0), (200, 1)):
        write_tree(tmp_path, pid, order, [])
        info_file = tmp_path / str(pid) / TREE_INFO
        info = json.loads(info_file.read_text())
        info["connections"] = [{"family": 4, "local": "10.0.2.15", "lport": 22,
                                "remote": "10.0.2.2", "rport": pid}]
        info_file.write_text(json.dumps(info))
    killed: list[int] = []
    monkeypatch.setattr(restorer, "kill_tree", killed.append)
    scripts: list[str] = []
    criu = FakeCriu(fail=set())
    real_restore = criu.restore

    def restore(images_dir: Path, options: CriuOptions | None = None,
                on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        if images_dir.name == "200":
            raise KeyboardInterrupt
        return real_restore(images_dir, options, on_notify)

    criu.restore = restore  # type: ignore[method-assign]
    started: list[FakePager] = []

    def pager(images_dir: Path) -> Any:
        started.append(FakePager(images_dir))
        return started[-1]

    with pytest.raises(KeyboardInterrupt):
        restore_all(tmp_path, criu, stream=lambda *_: os.open(os.devnull, os.O_WRONLY),
                    pager=pager, nft=scripts.append)

    assert [p.stopped for p in started] == [True, True]
    assert killed == [300]
    unlocked = [s.splitlines()[0] for s in scripts if "add element" not in s]
    assert "add table inet CRIU-200" in unlocked


class HangingCriu(FakeCriu):
    """CRIU that runs out of its time on tree 200 (the client killed it)."""

    def restore(self, images_dir: Path, options: CriuOptions | None = None,
                on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        if images_dir.name == "200":
            self.calls.append((images_dir.name, options or CriuOptions()))
            time.sleep(0.6)  # past the whole restore's deadline too
            raise CriuTimeoutError("restore", "CRIU did not answer within 300 s and was killed")
        return super().restore(images_dir, options, on_notify)


def test_a_restore_that_runs_out_of_time_is_reported_and_the_rest_not_begun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from seamless.restore import restorer

    for pid, order in ((100, 0), (200, 1), (300, 2)):
        write_tree(tmp_path, pid, order, [])
    killed: list[int] = []
    monkeypatch.setattr(restorer, "kill_tree", lambda root, within=300: killed.append(root))
    criu = HangingCriu(fail=set())

    report = restore_all(tmp_path, criu, stream=lambda *_: os.open(os.devnull, os.O_WRONLY),
                         deadline=time.monotonic() + 0.5)

    assert [name for name, _ in criu.calls] == ["100", "200"]
    assert killed == [200]  # what CRIU made of it before it was killed does not run on
    errors = {t.root: t.error for t in report.trees}
    assert errors[100] is None and "within 300 s" in (errors[200] or "")
    assert errors[300] == "not begun: the restore ran out of time"


def test_peer_paths_are_the_running_system_s_sockets_a_tree_is_connected_to() -> None:
    """A datagram socket connected to journald's syslog socket: CRIU connects it again by
    that path. Not a peer inside the tree, nor one dumped as external."""
    import socket

    from seamless.collect.resources import UnixPeer, peer_paths

    client, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        c, o = os.fstat(client.fileno()).st_ino, os.fstat(other.fileno()).st_ino
        me = os.getpid()
        log = UnixPeer(o, 0, "/run/systemd/journal/dev-log", False, (1,))
        table = {c: UnixPeer(c, o, "*", False, (me,)), o: log}
        assert peer_paths([me], table) == ["/run/systemd/journal/dev-log"]
        assert peer_paths([me], table, [f"unix[{c}]"]) == []  # the restore connects it
        table[o] = UnixPeer(o, 0, "/tmp/app.sock", False, (me,))
        assert peer_paths([me], table) == []  # bound inside the tree
    finally:
        client.close()
        other.close()


def test_the_restore_takes_away_the_yards_once_every_criu_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What CRIU mounted in /tmp while it made the trees is taken away once the last
    CRIU is done (a held tree's CRIU still uses its own), a yard that was there before
    is left alone, and a restore without a namespace tree does not look."""
    from seamless.criu import yards

    def write(own: bool) -> None:
        for pid, order in ((300, 0), (200, 1)):
            write_tree(tmp_path, pid, order, [])
            info_file = tmp_path / str(pid) / TREE_INFO
            info = json.loads(info_file.read_text())
            info["mount_namespace"] = own and pid == 300
            info_file.write_text(json.dumps(info))

    mounted = {"/tmp/.criu.mntns.OLD"}
    events: list[str] = []

    class Mounting(FakeCriu):
        def restore(self, images_dir: Path, options: CriuOptions | None = None,
                    on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
            mounted.add(f"/tmp/.criu.mntns.{images_dir.name}")
            events.append(f"restore {images_dir.name}")
            return super().restore(images_dir, options, on_notify)

    monkeypatch.setattr(yards, "yards", lambda: set(mounted))
    monkeypatch.setattr(yards, "release",
                        lambda targets: events.append(f"release {sorted(targets)}"))
    write(own=True)
    assert restore_all(tmp_path, Mounting(fail=set()), stream=lambda *_: 0).ok
    assert events == ["restore 300", "restore 200",
                      "release ['/tmp/.criu.mntns.200', '/tmp/.criu.mntns.300']"]
    events.clear()
    for d in tmp_path.iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    write(own=False)
    assert restore_all(tmp_path, Mounting(fail=set()), stream=lambda *_: 0).ok
    assert events == ["restore 300", "restore 200"]


def test_a_tree_names_the_network_files_of_the_leases_put_back_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Of the addresses a tree's sockets need, those leased and put back name the
    .network file that managed them in the old boot ("" when not known); a static one,
    or one the new boot already has, names none."""
    from seamless.restore import restorer

    write_tree(tmp_path, 100, 0, [])
    info_file = tmp_path / "100" / TREE_INFO
    info = json.loads(info_file.read_text())
    info["addresses"] = [
        {"interface": "eth0", "address": "10.0.2.15", "prefix": 24, "valid_until": 9e9,
         "network_file": "10-dhcp.network"},
        {"interface": "eth1", "address": "10.0.3.15", "prefix": 24, "valid_until": 9e9},
        {"interface": "eth0", "address": "192.168.9.9", "prefix": 24},
        {"interface": "eth2", "address": "10.0.4.15", "prefix": 24, "valid_until": 9e9,
         "network_file": "30-there.network"},
    ]
    info_file.write_text(json.dumps(info))
    monkeypatch.setattr(restorer, "bring_up_addresses", lambda addresses: [
        f"{a['address']}/{a['prefix']} on {a['interface']}" for a in addresses
        if a["interface"] != "eth2"])  # eth2's address: the new boot has it already

    report = restore_all(tmp_path, FakeCriu(fail=set()),
                         stream=lambda *_: os.open(os.devnull, os.O_WRONLY),
                         nft=lambda script: None)
    [tree] = report.trees
    assert tree.restored and tree.network_files == ["10-dhcp.network", ""]
