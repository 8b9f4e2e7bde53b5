"""The mount tables as every stage reads them (seamless.mounts)."""

from __future__ import annotations

import os
from pathlib import Path

from seamless import mounts

#: A name with a space (escaped by the kernel), one with a byte that is not UTF-8 (left
#: as it is by the kernel), and one whose escape stands for such a byte.
MOUNTS = (b"/dev/vda / ext4 rw,relatime 0 0\n"
          b"tmpfs /srv/my\\040data tmpfs rw,nosuid 0 0\n"
          b"tmpfs /srv/caf\xe9 tmpfs ro 0 0\n"
          b"tmpfs /srv/\\134\\351 tmpfs rw 0 0\n")

MOUNTINFO = (b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
             b"43 22 0:43 /sub /srv/my\\040data rw master:7 - tmpfs tmpfs rw\n"
             b"44 22 0:44 / /srv/caf\xe9 rw shared:9 master:8 - tmpfs none rw\n"
             b"not a mount line\n")


def test_mounts_reads_any_name_back_to_its_bytes(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_bytes(MOUNTS)
    read = mounts.mounts(table)
    assert [m.target for m in read] == ["/", "/srv/my data", os.fsdecode(b"/srv/caf\xe9"),
                                        os.fsdecode(b"/srv/\\\xe9")]
    assert [os.fsencode(m.target) for m in read][2:] == [b"/srv/caf\xe9", b"/srv/\\\xe9"]
    assert read[2].readonly and not read[1].readonly
    assert read[1].options == ("rw", "nosuid")


def test_mountinfo_reads_ids_peers_and_any_name(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "mountinfo").write_bytes(MOUNTINFO)
    root, data, cafe = mounts.mountinfo(7, tmp_path)
    assert (root.mount_id, root.parent_id, root.shared, root.master) == (22, 1, 1, None)
    assert (data.root, data.target, data.fstype, data.device) == (
        "/sub", "/srv/my data", "tmpfs", "0:43")
    assert (data.shared, data.master) == (None, 7)
    assert os.fsencode(cafe.target) == b"/srv/caf\xe9"
    assert (cafe.shared, cafe.master) == (9, 8)
    assert mounts.mountinfo(8, tmp_path) == []  # a process that is gone
