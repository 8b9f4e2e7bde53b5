"""A sandboxed service's mount namespace and runtime files, read off a fake /proc and a
fake systemctl (seamless.collect.namespaces, seamless.collect.runtime)."""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from seamless.collect import namespaces, runtime

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
40 30 0:40 / /run/user/102 rw master:20 - tmpfs tmpfs rw
41 30 0:41 / /run/credentials/systemd-journald.service ro master:21 - tmpfs tmpfs ro
42 30 0:42 / /run/seamless/store rw master:22 - ext4 /dev/pmem0 rw
43 22 0:43 / /tmp rw master:23 - tmpfs tmpfs rw
44 30 0:44 / /run/credentialsx rw master:24 - tmpfs tmpfs rw
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
    a login's /run/user/UID, systemd 257's credentials of journald, the store."""
    proc = fake_proc(tmp_path, own_mnt=True)
    assert namespaces.skipped_mounts(7, ["/run/seamless/store"], proc) == [
        "/run/credentials/systemd-journald.service", "/run/seamless/store", "/run/user/102"]


def test_a_tree_in_the_hosts_namespace_skips_nothing(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, own_mnt=False)
    assert namespaces.skipped_mounts(7, ["/run/seamless/store"], proc) == []


def test_unit_paths_find_private_tmp_of_this_boot_or_else_an_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service restored by an earlier upgrade and not restarted since has the private
    /tmp named after the boot it started in."""
    tmp, var_tmp = tmp_path / "tmp", tmp_path / "var/tmp"
    for d in (tmp, var_tmp):
        d.mkdir(parents=True)
    (tmp / "systemd-private-NEW-nginx.service-a").mkdir()
    (tmp / "systemd-private-OLD-nginx.service-b").mkdir()
    (var_tmp / "systemd-private-OLD-nginx.service-c").mkdir()
    (tmp / "systemd-private-OLD-other.service-d").mkdir()
    shown = ("Id=nginx.service\nPIDFile=/run/nginx.pid\nRuntimeDirectory=nginx x\n"
             "PrivateTmp=yes\n\nId=cron.service\nPIDFile=\nRuntimeDirectory=\n"
             "PrivateTmp=no\n")

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        assert argv[:2] == ["systemctl", "show"]
        return subprocess.CompletedProcess(argv, 0, shown.encode(), b"")

    real_glob = glob.glob
    monkeypatch.setattr(runtime, "run", run)
    monkeypatch.setattr(runtime, "_boot_id", lambda: "NEW")
    monkeypatch.setattr(glob, "glob",
                        lambda p: [x.replace(str(tmp_path), "")
                                   for x in real_glob(str(tmp_path) + p)])
    found = runtime.unit_paths(["nginx.service", "cron.service", None, "x.scope"])
    assert found == {
        "nginx.service": ["/run/nginx.pid", "/run/nginx", "/run/x",
                          "/tmp/systemd-private-NEW-nginx.service-a",
                          "/var/tmp/systemd-private-OLD-nginx.service-c"],
        "cron.service": [],
    }
