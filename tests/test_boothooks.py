"""Installing the restorer's boot hooks (into a directory standing in for /)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from seamless import kernel_modules
from seamless.criu.modules import CRIU_MODULES
from seamless.errors import SeamlessError
from seamless.kexec import boothooks
from seamless.kexec.initrd import STORE_MODULES
from seamless.memstore.region import PMEM_MODULES


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
    for place in (module, tmp_path / "usr/share/seamless"):
        assert (place / "kernel-modules").read_text() == kernel_modules.LIST.read_text()
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


def test_the_restore_unit_and_the_expiry_timer_are_enabled(tmp_path: Path) -> None:
    (tmp_path / "usr/share/initramfs-tools").mkdir(parents=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    done = boothooks.install(tmp_path)
    units = tmp_path / "etc/systemd/system"
    assert done.unit == units / "seamless-restore.service"
    for target, name in (("sysinit.target", "seamless-restore.service"),
                         ("timers.target", "seamless-expire.timer")):
        link = units / f"{target}.wants" / name
        assert os.readlink(link) == f"/etc/systemd/system/{name}"
        assert (units / name).read_text().startswith(("#", "["))
    assert "ExecStart=seamless store expire" in (units / "seamless-expire.service").read_text()
    boothooks.install(tmp_path)  # again: no error


def test_a_udev_rule_lets_only_root_read_the_store_s_device(tmp_path: Path) -> None:
    (tmp_path / "usr/share/initramfs-tools").mkdir(parents=True)
    boothooks.install(tmp_path)
    rule = (tmp_path / "etc/udev/rules.d" / boothooks.UDEV_RULES).read_text()
    line = [w for w in rule.splitlines() if w and not w.startswith("#")]
    assert line == ['SUBSYSTEM=="block", KERNEL=="pmem*", ATTRS{provider}=="e820", '
                    'OWNER="root", GROUP="root", MODE="0600"']


def test_the_store_s_device_is_root_s_alone(tmp_path: Path) -> None:
    import stat

    from seamless.memstore.store import own_device

    node = tmp_path / "pmem0"
    os.mknod(node, stat.S_IFBLK | 0o660, os.makedev(259, 77))
    os.chown(node, 0, 6)  # udev's default: group disk
    own_device(node)
    st = node.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    plain = tmp_path / "image"  # a loop file of the tests: left alone
    plain.write_bytes(b"")
    plain.chmod(0o644)
    own_device(plain)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_the_debian_package_s_hooks_are_its_own_and_nothing_is_copied(tmp_path: Path) -> None:
    (tmp_path / "var/lib/dpkg/info").mkdir(parents=True)
    (tmp_path / boothooks.DPKG_LIST).write_text("/usr/bin/seamless\n")
    module = tmp_path / "usr/lib/dracut/modules.d/90seamless"
    module.mkdir(parents=True)
    unit = tmp_path / "usr/lib/systemd/system/seamless-restore.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\n")
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    done = boothooks.install(tmp_path)
    assert done.dracut == module and done.unit == unit and done.initramfs_tools == []
    assert list((tmp_path / "etc/systemd/system").iterdir()) == []
    assert not (tmp_path / "etc/dracut.conf.d").exists()


def test_the_package_installs_every_hook_the_hand_install_does() -> None:
    """debian/seamless.install and the hand install (install-restorer) carry the same
    files: a hook added to one is added to the other."""
    root = Path(__file__).resolve().parents[1]
    packaged = {line.split()[0] for line in
                (root / "debian/seamless.install").read_text().splitlines() if line.strip()}
    hooks = {str(p.relative_to(root)) for d in ("dracut-module", "initramfs", "systemd", "udev")
             for p in (root / d).rglob("*") if p.is_file()}
    assert hooks <= packaged, hooks - packaged


def test_the_package_s_configuration_reads_as_shipped_and_with_its_examples(
        tmp_path: Path) -> None:
    """Every key commented out: the defaults. Uncommented, each example is a valid rule."""
    import re

    from seamless.collect.select import Selection, load_config

    text = (Path(__file__).resolve().parents[1] / "debian/seamless.toml").read_text()
    config = tmp_path / "seamless.toml"
    config.write_text(text)
    assert load_config(config) == Selection()
    config.write_text(re.sub(r"^#(include|exclude)", r"\1", text, flags=re.M))
    chosen = load_config(config)
    assert chosen.include and chosen.exclude


LIB = Path(__file__).parents[1] / "dracut-module/90seamless"


def shell_modules() -> list[str]:
    """What seamless-lib.sh reads from the list, as the initramfs's shell does."""
    out = subprocess.run(["sh", "-c", '. "$1"; seamless_modules "$2"', "sh",
                          str(LIB / "seamless-lib.sh"), str(kernel_modules.LIST)],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_the_shell_and_python_read_the_same_list() -> None:
    assert shell_modules() == list(kernel_modules.named())
    assert "nd_pmem" in shell_modules() and "nf_tables" in shell_modules()


def test_each_use_takes_its_modules_from_the_list() -> None:
    assert {*PMEM_MODULES, *CRIU_MODULES} == set(kernel_modules.named())
    assert set(STORE_MODULES) == {"nd_pmem", "nd_e820"} <= set(PMEM_MODULES)
    assert "nf_tables" in CRIU_MODULES and "nd_pmem" not in CRIU_MODULES


def test_a_list_reads_past_comments_and_blank_lines(tmp_path: Path) -> None:
    listed = tmp_path / "kernel-modules"
    listed.write_text("# a comment\n\nfoo  store initrd  # why\nbar criu\n")
    assert kernel_modules.named(path=listed) == ("foo", "bar")
    assert kernel_modules.named("initrd", path=listed) == ("foo",)
    out = subprocess.run(["sh", "-c", '. "$1"; seamless_modules "$2"', "sh",
                          str(LIB / "seamless-lib.sh"), str(listed)],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["foo", "bar"]


def test_dracut_puts_the_list_into_the_initramfs(tmp_path: Path) -> None:
    moddir = tmp_path / "90seamless"
    shutil.copytree(LIB, moddir)
    shutil.copyfile(kernel_modules.LIST, moddir / "kernel-modules")
    out = subprocess.run(
        ["bash", "-c", 'instmods() { echo "$hostonly|$*"; }; . "$1"; installkernel', "bash",
         str(moddir / "module-setup.sh")],
        env={"moddir": str(moddir), "PATH": os.environ["PATH"]},
        capture_output=True, text=True, check=True).stdout.strip()
    hostonly, modules = out.split("|")
    assert hostonly == "" and modules.split() == shell_modules()


def test_the_modules_start_loading_in_the_background(tmp_path: Path) -> None:
    """seamless_preload_modules returns at once and loads the whole list: the boot goes
    on to look for its disks while they load."""
    # modprobe finishes only once the caller has gone on: no timing to race with
    (tmp_path / "modprobe").write_text(
        f'#!/bin/sh\nwhile [ ! -e {tmp_path}/go ]; do sleep 0.05; done\n'
        f'echo "$@" > {tmp_path}/loaded\n')
    (tmp_path / "modprobe").chmod(0o755)
    out = subprocess.run(
        ["sh", "-c", '. "$1"; seamless_preload_modules; '
                     '[ -e "$2/loaded" ] && echo early; : > "$2/go"; wait; cat "$2/loaded"',
         "sh", str(LIB / "seamless-lib.sh"), str(tmp_path)],
        env={"PATH": f"{tmp_path}:{os.environ['PATH']}",
             "SEAMLESS_MODULE_LIST": str(kernel_modules.LIST)},
        capture_output=True, text=True, check=True, timeout=30).stdout.split()
    assert out[0] == "-a" and out[1:] == shell_modules()


def test_the_initramfs_leaves_a_planned_generation_to_the_unit_as_python_reads_it() -> None:
    """The command line's word and the note the initramfs leaves for the unit are the
    ones Python writes and reads."""
    from seamless.kexec import cmdline
    from seamless.restore import boot

    text = (LIB / "seamless-lib.sh").read_text()
    assert f'*" {cmdline.AFTER_INIT_ARG} "*)' in text
    assert f'echo "{boot.PLANNED}" >{boot.DEFERRED}' in text
