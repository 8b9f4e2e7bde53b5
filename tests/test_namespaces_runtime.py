"""A sandboxed service's mount namespace and runtime files, read off a fake /proc and a
fake systemctl (seamless.collect.namespaces, seamless.runtime)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from seamless import runtime
from seamless.collect import namespaces

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
40 30 0:40 / /run/user/102 rw master:20 - tmpfs tmpfs rw
41 30 0:41 / /run/credentials/systemd-journald.service ro master:21 - tmpfs tmpfs ro
42 30 0:42 / /run/seamless/store rw master:22 - ext4 /dev/pmem0 rw
43 22 0:43 / /tmp rw master:23 - tmpfs tmpfs rw
44 30 0:44 / /run/credentialsx rw master:24 - tmpfs tmpfs rw
45 43 0:45 / /tmp/.criu.mntns.Ab12Cd rw master:25 - tmpfs none rw
"""


def fake_proc(tmp_path: Path, own_mnt: bool) -> Path:
    proc = tmp_path / "proc"
    for pid, ns in (("self", "mnt:[1]"), ("7", "mnt:[2]" if own_mnt else "mnt:[1]")):
        (proc / pid / "ns").mkdir(parents=True)
        os.symlink(ns, proc / pid / "ns" / "mnt")
    (proc / "7" / "mountinfo").write_text(MOUNTINFO)
    return proc


def test_a_services_namespace_leaves_out_logins_credentials_and_the_store(
    tmp_path: Path,
) -> None:
    """Mounts made in the host after the service started propagate into its namespace:
    a login's /run/user/UID, systemd 257's credentials of journald, the store, a yard
    an earlier CRIU restore left in /tmp."""
    proc = fake_proc(tmp_path, own_mnt=True)
    assert namespaces.skipped_mounts(7, ["/run/seamless/store"], proc) == [
        "/run/credentials/systemd-journald.service", "/run/seamless/store", "/run/user/102",
        "/tmp/.criu.mntns.Ab12Cd"]


def test_a_tree_in_the_hosts_namespace_skips_nothing(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, own_mnt=False)
    assert namespaces.skipped_mounts(7, ["/run/seamless/store"], proc) == []


def test_unit_paths_are_its_pid_file_and_runtime_directories(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown = ("Id=nginx.service\nPIDFile=/run/nginx.pid\nRuntimeDirectory=nginx x\n\n"
             "Id=cron.service\nPIDFile=\nRuntimeDirectory=\n")

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        assert argv[:2] == ["systemctl", "show"]
        return subprocess.CompletedProcess(argv, 0, shown.encode(), b"")

    monkeypatch.setattr(runtime, "run", run)
    found = runtime.unit_paths(["nginx.service", "cron.service", None, "x.scope"])
    assert found == {"nginx.service": ["/run/nginx.pid", "/run/nginx", "/run/x"],
                     "cron.service": []}


#: memcached restored by an earlier upgrade (boot OLD) and adopted by its unit, which made
#: private directories of this boot (NEW) that no process of it uses.
RESTORED = """\
146 130 254:0 / / ro,relatime master:1 - ext4 /dev/vda rw
168 146 0:33 /systemd-private-OLD-mc.service-a/tmp /tmp rw master:18 - tmpfs tmpfs rw
169 146 254:0 /var/tmp/systemd-private-OLD-mc.service-b/tmp /var/tmp rw master:1 - ext4 /dev/vda rw
170 146 0:25 /memcached /run/memcached rw master:5 - tmpfs tmpfs rw
"""


def test_private_tmp_is_what_the_namespace_binds_not_the_units_newest(tmp_path: Path) -> None:
    """A service carried twice without a restart: its /tmp and /var/tmp are the
    directories of the boot it started in (on tmpfs, and on disk), whatever newer ones
    its unit has."""
    proc = fake_proc(tmp_path, own_mnt=True)
    (proc / "7" / "mountinfo").write_text(RESTORED)
    (proc / "self" / "mountinfo").write_text(HOST)
    assert namespaces.private_tmp_dirs(7, proc) == [
        "/tmp/systemd-private-OLD-mc.service-a",
        "/var/tmp/systemd-private-OLD-mc.service-b"]
    # a process in the host's namespace, or one whose /tmp is the host's, has none
    assert namespaces.private_tmp_dirs(7, fake_proc(tmp_path / "x", own_mnt=False)) == []
    (proc / "7" / "mountinfo").write_text(HOST)
    assert namespaces.private_tmp_dirs(7, proc) == []


EARLYOOM = """\
146 130 254:0 / / ro,relatime master:1 - ext4 /dev/vda rw
168 146 0:33 / /tmp rw,nosuid,nodev master:18 - tmpfs tmpfs rw
57 168 0:41 /tmp /tmp rw,nosuid,nodev shared:115 - tmpfs tmpfs rw,mode=700
59 146 0:41 /var-tmp /var/tmp rw,nosuid,nodev shared:147 - tmpfs tmpfs rw,mode=700
60 146 0:25 /systemd/inaccessible/dir /home ro master:5 - tmpfs tmpfs rw
61 146 0:33 /systemd-private-x-memcached.service-y/tmp /srv/t rw master:18 - tmpfs tmpfs rw
"""
HOST = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
31 22 0:33 / /tmp rw,nosuid shared:18 - tmpfs tmpfs rw
"""


def test_a_disconnected_private_tmp_is_a_bind_criu_cannot_dump(tmp_path: Path) -> None:
    """systemd 257's PrivateTmp=disconnected (DynamicUser=yes): /tmp and /var/tmp bind two
    directories of a tmpfs mounted nowhere else; binds of the host's /tmp and /run are
    reachable."""
    proc = fake_proc(tmp_path, own_mnt=True)
    (proc / "7" / "mountinfo").write_text(EARLYOOM)
    (proc / "self" / "mountinfo").write_text(HOST)
    assert namespaces.unreachable_binds(7, proc) == ["/tmp", "/var/tmp"]
    (proc / "7" / "mountinfo").write_text(EARLYOOM.replace("0:41", "0:33"))
    assert namespaces.unreachable_binds(7, proc) == []


def test_a_unix_socket_of_the_hosts_network_namespace_is_named(tmp_path: Path) -> None:
    """PrivateNetwork=yes and a journal stream of the host's: CRIU cannot find it."""
    proc = fake_proc(tmp_path, own_mnt=True)
    header = "Num RefCount Protocol Flags Type St Inode Path\n"
    for pid, ns, inodes in (("self", "net:[1]", (3623, 100)), ("7", "net:[2]", (200,))):
        os.symlink(ns, proc / pid / "ns" / "net")
        (proc / pid / "net").mkdir()
        (proc / pid / "net" / "unix").write_text(header + "".join(
            f"0000: 00000002 00000000 00000000 0001 03 {i}\n" for i in inodes))
    (proc / "7" / "fd").mkdir()
    os.symlink("socket:[200]", proc / "7" / "fd" / "3")
    os.symlink("/dev/null", proc / "7" / "fd" / "0")
    assert namespaces.foreign_unix_sockets([7], 7, proc) == []
    os.symlink("socket:[3623]", proc / "7" / "fd" / "1")
    assert namespaces.foreign_unix_sockets([7], 7, proc) == [7]


SANDBOX = """\
146 130 254:0 / / ro,relatime master:1 - ext4 /dev/vda rw
147 146 0:25 / /run rw master:5 - tmpfs tmpfs rw
148 147 0:25 /nginx /run/nginx rw master:5 - tmpfs tmpfs rw
149 147 0:25 /user/102 /run/user/102 rw master:5 - tmpfs tmpfs rw
150 146 0:33 /systemd-private-x-nginx.service-y/tmp /tmp rw master:18 - tmpfs tmpfs rw
151 146 0:99 / /srv/own rw - tmpfs tmpfs rw
"""


def test_tmpfs_binds_are_found_at_their_host_paths(tmp_path: Path) -> None:
    """The parts of the host's tmpfs mounts bound into the namespace, at their paths in
    the host; whole host mounts, a login's /run/user and a tmpfs of its own are not."""
    proc = fake_proc(tmp_path, own_mnt=True)
    (proc / "7" / "mountinfo").write_text(SANDBOX)
    (proc / "self" / "mountinfo").write_text(HOST)
    assert namespaces.tmpfs_bind_sources(7, proc) == [
        "/run/nginx", "/tmp/systemd-private-x-nginx.service-y/tmp"]
