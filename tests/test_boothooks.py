"""Installing the restorer's boot hooks (into a directory standing in for /)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from seamless.errors import SeamlessError
from seamless.restore import boothooks


def test_installs_for_each_generator_present(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/dracut/modules.d").mkdir(parents=True)
    (tmp_path / "usr/share/initramfs-tools").mkdir(parents=True)
    done = boothooks.install(tmp_path)
    module = tmp_path / "usr/lib/dracut/modules.d/90seamless"
    assert done.dracut == module
    for name in ("module-setup.sh", "seamless-restore.sh", "seamless-lib.sh"):
        assert os.access(module / name, os.X_OK)
    conf = (tmp_path / "etc/dracut.conf.d" / boothooks.DRACUT_CONF_NAME).read_text()
    assert "add_dracutmodules+=" in conf and " seamless " in conf
    assert (tmp_path / "usr/share/seamless/seamless-lib.sh").is_file()
    script = tmp_path / "etc/initramfs-tools/scripts/init-bottom/seamless"
    assert script in done.initramfs_tools and os.access(script, os.X_OK)


def test_only_dracut(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/dracut/modules.d").mkdir(parents=True)
    done = boothooks.install(tmp_path)
    assert done.dracut is not None and done.initramfs_tools == []
    assert not (tmp_path / "etc/initramfs-tools").exists()


def test_no_generator_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(SeamlessError, match="neither dracut nor initramfs-tools"):
        boothooks.install(tmp_path)
    assert list(tmp_path.iterdir()) == []
