"""What the new boot does to the restored processes' files: the tmpfs systemd mounts,
and tmpfiles.d's cleaning of /tmp (seamless.restore.bootfs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from seamless.restore import bootfs

TMP_MOUNT = """[Unit]
Description=Temporary Directory /tmp
ConditionPathIsSymbolicLink=!/tmp

[Mount]
What=tmpfs
Where=/tmp
Type=tmpfs
Options=mode=1777,strictatime,nosuid,nodev,size=50%%,nr_inodes=1m
"""
RUN_LOCK = "[Mount]\nWhat=tmpfs\nWhere=/run/lock\nType=tmpfs\nOptions=mode=1777,nosuid\n"


def debian13(root: Path) -> None:
    """The units as Debian 13's systemd package ships and enables them."""
    units = root / "usr/lib/systemd/system"
    wants = units / "local-fs.target.wants"
    wants.mkdir(parents=True)
    (units / "tmp.mount").write_text(TMP_MOUNT)
    (units / "run-lock.mount").write_text(RUN_LOCK)
    for unit in ("tmp.mount", "run-lock.mount"):
        (wants / unit).symlink_to(f"../{unit}")


def test_debian_13_mounts_tmp_and_run_lock(tmp_path: Path) -> None:
    """With the unit's options as mount takes them (systemd writes a % as %%)."""
    debian13(tmp_path)
    found = bootfs.boot_tmpfs(tmp_path)
    assert found == [
        bootfs.DEV_SHM,
        bootfs.Tmpfs("/tmp", "mode=1777,strictatime,nosuid,nodev,size=50%,nr_inodes=1m",
                     "tmp.mount"),
        bootfs.Tmpfs("/run/lock", "mode=1777,nosuid", "run-lock.mount"),
    ]


def test_debian_12_keeps_tmp_on_disk(tmp_path: Path) -> None:
    """Debian 12 ships tmp.mount as an example (/usr/share/systemd), not enabled."""
    (tmp_path / "usr/share/systemd").mkdir(parents=True)
    (tmp_path / "usr/share/systemd/tmp.mount").write_text(TMP_MOUNT)
    assert bootfs.boot_tmpfs(tmp_path) == [bootfs.DEV_SHM]


def test_a_masked_unit_or_an_fstab_line_is_the_operators_choice(tmp_path: Path) -> None:
    debian13(tmp_path)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    (tmp_path / "etc/systemd/system/tmp.mount").symlink_to("/dev/null")
    (tmp_path / "etc/fstab").write_text("# <fs> <mount>\n/dev/vda2 /run/lock ext4 rw 0 0\n")
    assert bootfs.boot_tmpfs(tmp_path) == [bootfs.DEV_SHM]


def test_the_tmpfs_are_mounted_before_the_trees_unless_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian13(tmp_path)
    for d in ("tmp", "run/lock", "dev/shm"):
        (tmp_path / d).mkdir(parents=True)
    calls: list[list[str]] = []

    class Done:
        returncode = 0
        stderr = b""

    def run(argv: list[Any], **kwargs: Any) -> Done:
        calls.append([str(a) for a in argv])
        return Done()

    monkeypatch.setattr(bootfs, "run", run)
    monkeypatch.setattr(bootfs, "is_mount", lambda p: p == tmp_path / "dev/shm")
    assert bootfs.mount_boot_tmpfs(tmp_path) == ["/tmp", "/run/lock"]
    assert calls[0] == ["mount", "-n", "-t", "tmpfs", "-o",
                        "mode=1777,strictatime,nosuid,nodev,size=50%,nr_inodes=1m", "tmpfs",
                        str(tmp_path / "tmp")]


def test_a_restore_before_init_keeps_tmp_for_the_boot(tmp_path: Path) -> None:
    """Restored before init (initramfs-tools), the trees' /tmp files and the services'
    private /tmp would be removed by the boot's tmpfiles: /run/tmpfiles.d overrides keep
    them for this boot; everything else of the files is as the distribution has it, and
    an operator's own file in /etc wins."""
    lib = tmp_path / "usr/lib/tmpfiles.d"
    lib.mkdir(parents=True)
    (lib / "tmp.conf").write_text("# Clear tmp directories separately\nD /tmp 1777 root root -\n"
                                  "#q /var/tmp 1777 root root 30d\n")
    (lib / "systemd-tmp.conf").write_text(
        "x /tmp/systemd-private-%b-*\nX /tmp/systemd-private-%b-*/tmp\n"
        "R! /tmp/systemd-private-*\nR! /var/tmp/systemd-private-*\n")
    (tmp_path / "tmp/tmux-0").mkdir(parents=True)
    (tmp_path / "tmp/systemd-private-OLD-redis-server.service-x").mkdir()
    (tmp_path / "var/tmp/systemd-private-OLD-redis-server.service-y").mkdir(parents=True)
    (tmp_path / "var/tmp/a-users-file").touch()
    written = bootfs.keep_tmp(tmp_path, before_init=True)
    run = tmp_path / "run/tmpfiles.d"
    assert written == [run / "tmp.conf", run / "systemd-tmp.conf", run / bootfs.KEEP_FILE]
    tmp = (run / "tmp.conf").read_text().splitlines()
    assert "d /tmp 1777 root root -" in tmp and "#q /var/tmp 1777 root root 30d" in tmp
    assert not any(line.startswith("D ") for line in tmp)
    private = (run / "systemd-tmp.conf").read_text().splitlines()
    assert "x /tmp/systemd-private-%b-*" in private
    assert not any(line.startswith("R!") for line in private)
    # systemd 256 and later: x keeps a path from D, R and aging alike
    assert (run / bootfs.KEEP_FILE).read_text().splitlines()[1:] == [
        "x /tmp/systemd-private-OLD-redis-server.service-x", "x /tmp/tmux-0",
        "x /var/tmp/systemd-private-OLD-redis-server.service-y"]

    (tmp_path / "etc/tmpfiles.d").mkdir(parents=True)
    (tmp_path / "etc/tmpfiles.d/tmp.conf").write_text("# the operator's\n")
    for f in written:
        f.unlink()
    assert bootfs.keep_tmp(tmp_path, before_init=True) == [run / "systemd-tmp.conf",
                                                           run / bootfs.KEEP_FILE]


def test_after_switch_root_only_the_earlier_boots_private_tmp_is_kept(tmp_path: Path) -> None:
    """The boot's tmpfiles ran already; a later cleanup would age the private /tmp of
    the services restored (named after the boot they started in)."""
    (tmp_path / "tmp/tmux-0").mkdir(parents=True)
    (tmp_path / "tmp/systemd-private-OLD-cron.service-x").mkdir()
    written = bootfs.keep_tmp(tmp_path, before_init=False)
    assert [p.name for p in written] == [bootfs.KEEP_FILE]
    assert written[0].read_text().splitlines()[1:] == [
        "x /tmp/systemd-private-OLD-cron.service-x"]
    os.remove(written[0])
    (tmp_path / "tmp/systemd-private-OLD-cron.service-x").rmdir()
    assert bootfs.keep_tmp(tmp_path, before_init=False) == []
