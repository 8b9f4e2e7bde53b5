"""CRIU's yards (seamless.criu.yards): the restore takes away what CRIU leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from seamless import syscalls
from seamless.criu import yards

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
43 22 0:43 / /tmp rw shared:23 - tmpfs tmpfs rw
108 43 0:41 / /tmp/.criu.mntns.DY2ZxD rw,relatime shared:49 - tmpfs none rw
109 108 0:41 /x /tmp/.criu.mntns.DY2ZxD/mnt-0000000371 rw shared:50 - tmpfs none rw
110 43 0:50 / /tmp/criu\\040notes rw shared:51 - tmpfs none rw
"""


def test_the_yards_are_read_off_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "self" / "mountinfo"
    info.parent.mkdir()
    info.write_text(MOUNTINFO)
    assert yards.yards(tmp_path) == {"/tmp/.criu.mntns.DY2ZxD",
                                     "/tmp/.criu.mntns.DY2ZxD/mnt-0000000371"}
    assert yards.yards(tmp_path / "gone") == set()
    # a mount point whose name is not UTF-8 does not stop it
    info.write_bytes(MOUNTINFO.encode() + b"111 43 0:51 / /tmp/\xff rw - tmpfs none rw\n")
    assert len(yards.yards(tmp_path)) == 2


def test_release_detaches_deepest_first_and_a_failure_is_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    yard = tmp_path / ".criu.mntns.DY2ZxD"
    (yard / "mnt-1").mkdir(parents=True)
    detached: list[str] = []

    def detach(target: str) -> None:
        detached.append(target)
        if target.endswith("busy"):
            raise syscalls.SyscallError("umount2", 16)

    monkeypatch.setattr(syscalls, "detach_mount", detach)
    yards.release({str(yard), str(yard / "mnt-1"), str(tmp_path / "busy")})
    assert detached == [str(yard / "mnt-1"), str(yard), str(tmp_path / "busy")]
    assert not yard.exists()  # its directory is gone too

