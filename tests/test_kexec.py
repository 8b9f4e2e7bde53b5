"""The kexec stage on the host: images, command lines, initramfs, loading and entering.

Every system call is faked: an autouse fixture replaces libc in seamless.syscalls
with one that fails the test on any call, so nothing here can load a kernel,
remount a filesystem or reboot, even when the tests run as root.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from seamless import syscalls
from seamless.cli import cli
from seamless.errors import ExitCode, SeamlessError
from seamless.kexec import boothooks, cmdline, initrd, loader
from seamless.kexec import cli as kexec_cli
from seamless.kexec.image import KernelImage, KexecPolicy, kexec_policy, lockdown_state
from seamless.log import log
from seamless.memstore import handoff
from seamless.memstore import region as memstore_region
from seamless.memstore.region import Region

RELEASE = "6.1.0-56-cloud-amd64"
MEMMAP = "memmap=256M!1G"
RUNNING = (
    "BOOT_IMAGE=/boot/vmlinuz-6.1.0-55-cloud-amd64 root=UUID=1234-abcd ro quiet "
    f"{MEMMAP} seamless.restore=2 initrd=\\initrd.img console=ttyS0"
)
EXPECTED = f"root=UUID=1234-abcd ro quiet {MEMMAP} console=ttyS0"
#: The real one, for the tests that run it over a fake libc.
SYSCALLS_KEXEC_FILE_LOAD = syscalls.kexec_file_load
DRACUT_LISTING = ["usr/lib/dracut/hooks/pre-pivot/90-seamless-restore.sh", "usr/bin/bash"]


def make_bzimage(
    path: Path,
    *,
    release: str = RELEASE,
    protocol: tuple[int, int] = (2, 15),
    loadflags: int = 0x01,
    xloadflags: int = 0x03,
    magic: bytes = b"HdrS",
    setup_sects: int = 4,
    payload: int = 8192,
    cut: int = 0,
) -> Path:
    """A file with a bzImage's setup header (Documentation/arch/x86/boot.rst)."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, payload // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, protocol[0] << 8 | protocol[1])
    version = f"{release} (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC".encode()
    struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)
    setup[0x400:0x400 + len(version) + 1] = version + b"\0"
    setup[0x211] = loadflags
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2048)
    data = bytes(setup) + b"\xcc" * payload
    path.write_bytes(data[: len(data) - cut])
    return path


class ForbiddenLibc:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a test reached the real libc.{name}")


class FakeLibc:
    """libc whose calls fail with ``err`` (0: succeed), recording their arguments."""

    def __init__(self, err: int = 0) -> None:
        self.err = err
        self.calls: list[tuple[str, list[Any]]] = []

    def _call(self, name: str, args: tuple[Any, ...]) -> int:
        self.calls.append((name, [a.value for a in args]))
        if self.err:
            ctypes.set_errno(self.err)
            return -1
        return 0

    def syscall(self, *args: Any) -> int:
        return self._call("syscall", args)

    def mount(self, *args: Any) -> int:
        return self._call("mount", args)

    def sync(self) -> None:
        self.calls.append(("sync", []))


@pytest.fixture(autouse=True)
def no_real_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syscalls, "_libc", ForbiddenLibc())

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a test reached a real command or rebuild")

    monkeypatch.setattr(initrd, "run", forbidden)
    monkeypatch.setattr(boothooks, "rebuild", forbidden)
    monkeypatch.setattr(memstore_region, "find_region", forbidden)


# --- the kernel image -------------------------------------------------------------------------


def test_reads_a_valid_bzimage(tmp_path: Path) -> None:
    path = make_bzimage(tmp_path / "vmlinuz")
    image = KernelImage.read(path)
    assert image.release == RELEASE
    assert image.version_string.startswith(f"{RELEASE} (debian-kernel@")
    assert image.protocol == (2, 15) and image.protocol_str == "2.15"
    assert image.size == path.stat().st_size == 5 * 512 + 8192
    assert image.max_cmdline == 2048 - 30 - 1


def test_a_signed_image_with_trailing_data_is_fine(tmp_path: Path) -> None:
    path = make_bzimage(tmp_path / "vmlinuz")
    path.write_bytes(path.read_bytes() + b"PKCS7 signature" * 100)
    assert KernelImage.read(path).release == RELEASE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magic": b"\x7fELF"}, "is not a bzImage"),
        ({"xloadflags": 0x02}, "no 64-bit entry point"),
        ({"xloadflags": 0x01}, "cannot be loaded above 4 GiB"),
        ({"loadflags": 0x00}, "is a zImage"),
        ({"cut": 100}, "is truncated"),
        ({"protocol": (2, 6)}, "boot protocol 2.06"),
    ],
    ids=["not-a-kernel", "32-bit-only", "not-above-4g", "zimage", "truncated", "old-protocol"],
)
def test_bad_images_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    path = make_bzimage(tmp_path / "vmlinuz", **kwargs)
    with pytest.raises(SeamlessError, match=message) as exc:
        KernelImage.read(path)
    assert exc.value.status == ExitCode.UNCHANGED
    assert exc.value.hint


def test_short_or_missing_or_directory_images(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"#!/bin/sh\n")
    with pytest.raises(SeamlessError, match="not a bzImage"):
        KernelImage.read(tmp_path / "short")
    with pytest.raises(SeamlessError, match="does not exist"):
        KernelImage.read(tmp_path / "missing")
    with pytest.raises(SeamlessError, match="is a directory"):
        KernelImage.read(tmp_path)


def test_lockdown_and_signature_policy(tmp_path: Path) -> None:
    lockdown = tmp_path / "lockdown"
    lockdown.write_text("none [integrity] confidentiality\n")
    assert lockdown_state(lockdown) == "integrity"
    assert lockdown_state(tmp_path / "absent") is None
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text("root=/dev/vda1 module.sig_enforce=1\n")
    disabled = tmp_path / "disabled"
    disabled.write_text("1\n")
    config = tmp_path / "config"
    config.write_text("CONFIG_KEXEC_FILE=y\nCONFIG_KEXEC_SIG_FORCE=y\n")
    policy = kexec_policy(lockdown, proc_cmdline, disabled, config)
    assert policy.lockdown == "integrity" and policy.load_disabled
    assert policy.signature_enforced
    assert policy.reasons == (
        "lockdown=integrity", "module.sig_enforce=1 on the command line",
        "CONFIG_KEXEC_SIG_FORCE=y")
    lockdown.write_text("[none] integrity confidentiality\n")
    proc_cmdline.write_text("root=/dev/vda1\n")
    disabled.write_text("0\n")
    config.write_text("# CONFIG_KEXEC_SIG_FORCE is not set\n")
    policy = kexec_policy(lockdown, proc_cmdline, disabled, config)
    assert policy == KexecPolicy(lockdown="none", signature_enforced=False, load_disabled=False)


# --- the command line -------------------------------------------------------------------------


def test_split_keeps_quoted_values() -> None:
    assert cmdline.split(' a=1  dyndbg="file x.c +p" "b c" d\t') == [
        "a=1", 'dyndbg="file x.c +p"', '"b c"', "d"]


def test_default_drops_one_shot_arguments_and_appends() -> None:
    assert cmdline.join(cmdline.build(RUNNING)) == EXPECTED
    assert cmdline.build(RUNNING, append='foo=1 bar="x y"')[-2:] == ["foo=1", 'bar="x y"']
    # Arguments after "--" belong to init and are kept as they are.
    assert cmdline.build("ro -- seamless.x=1 BOOT_IMAGE=a") == [
        "ro", "--", "seamless.x=1", "BOOT_IMAGE=a"]


def test_cmdline_replaces_everything() -> None:
    assert cmdline.build(RUNNING, replace=f"root=/dev/vda2 {MEMMAP}") == [
        "root=/dev/vda2", MEMMAP]


def test_restore_argument_is_seamless_own() -> None:
    args = ["ro", "seamless.restore=1", "seamless.token=old", "--", "single"]
    assert cmdline.with_restore(args, 7, token="t") == [
        "ro", "panic=10", "seamless.restore=7", "seamless.token=t", "--", "single"]
    assert cmdline.with_restore(args, None) == ["ro", "--", "single"]
    assert cmdline.with_restore(["ro", "seamless.after_init"], 2, after_init=True) == [
        "ro", "panic=10", "seamless.restore=2", "seamless.after_init"]
    assert cmdline.with_restore(["ro", "seamless.after_init"], 2) == [
        "ro", "panic=10", "seamless.restore=2"]
    # the operator's own panic= is theirs (one for init is not the kernel's)
    assert cmdline.with_restore(["ro", "panic=0"], 0) == ["ro", "panic=0", "seamless.restore=0"]
    assert cmdline.with_restore(["ro", "--", "panic=0"], 0) == [
        "ro", "panic=10", "seamless.restore=0", "--", "panic=0"]


def test_region_must_be_on_the_new_command_line() -> None:
    cmdline.require_region(["ro", MEMMAP], MEMMAP)
    with pytest.raises(SeamlessError, match="lacks the preserved region") as exc:
        cmdline.require_region(["ro"], MEMMAP)
    assert exc.value.status == ExitCode.UNCHANGED
    assert exc.value.hint is not None and f"--append '{MEMMAP}'" in exc.value.hint
    with pytest.raises(SeamlessError, match="lacks"):
        cmdline.require_region(["ro", "--", MEMMAP], MEMMAP)  # an argument for init
    with pytest.raises(SeamlessError, match="another region"):
        cmdline.require_region(["ro", MEMMAP, "memmap=64M!512M"], MEMMAP)
    with pytest.raises(SeamlessError, match="another region"):
        cmdline.require_region(["ro", "memmap=256M!2G"], MEMMAP)
    # Other kinds of memmap= (reserving RAM, not preserving it) are not the store's business.
    cmdline.require_region(["memmap=64K$0x18690000", MEMMAP], MEMMAP)


def test_command_line_length_limit() -> None:
    cmdline.check_length("x" * 100, 100)
    with pytest.raises(SeamlessError, match="101 bytes"):
        cmdline.check_length("x" * 101, 100)


# --- the initramfs ----------------------------------------------------------------------------


def test_lsinitrd_listing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    listing = (
        "Image: /boot/initrd.img-6.1.0-56-cloud-amd64: 12M\n"
        "========================================================================\n"
        "drwxr-xr-x  12 root root 0 Jan  1 00:00 .\n"
        "lrwxrwxrwx   1 root root 7 Jan  1 00:00 lib -> usr/lib\n"
        "-rwxr-xr-x   1 root root 631 Jan  1 00:00 "
        "usr/lib/dracut/hooks/pre-pivot/90-seamless-restore.sh\n"
    )
    seen: list[list[str]] = []

    def fake_run(argv: list[str | Path], **kwargs: Any) -> Any:
        seen.append([str(a) for a in argv])
        return type("Done", (), {"stdout": listing.encode()})()

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(initrd, "run", fake_run)
    assert "lib" in initrd.list_files(tmp_path / "i")
    assert initrd.has_restorer(tmp_path / "i")
    assert seen[0] == ["lsinitrd", str(tmp_path / "i")]
    listing = listing.replace("90-seamless-restore.sh", "90-other.sh")
    assert not initrd.has_restorer(tmp_path / "i")


def test_lsinitramfs_listing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    listing = ".\nconf\nscripts/init-bottom\nscripts/init-bottom/seamless\n"
    monkeypatch.setattr(shutil, "which",
                        lambda name: "/usr/bin/lsinitramfs" if name == "lsinitramfs" else None)
    monkeypatch.setattr(initrd, "run", lambda argv, **kw: type("D", (), {
        "stdout": listing.encode()})())
    assert initrd.has_restorer(tmp_path / "i")
    listing = ".\nconf\nscripts/init-bottom/udev\n"
    assert not initrd.has_restorer(tmp_path / "i")


def test_no_initramfs_lister(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SeamlessError, match="neither lsinitrd nor lsinitramfs"):
        initrd.has_restorer(tmp_path / "i")


def test_missing_initrd(tmp_path: Path) -> None:
    with pytest.raises(SeamlessError, match="does not exist") as exc:
        initrd.check_readable(tmp_path / "initrd.img-x", "x")
    assert exc.value.hint is not None and "install-restorer --rebuild x" in exc.value.hint
    assert initrd.default_initrd(RELEASE) == Path(f"/boot/initrd.img-{RELEASE}")


# --- system calls: errno to messages ----------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (errno.ENOSYS, "no kexec_file_load"),
        (errno.EPERM, "kexec_load_disabled"),
        (errno.ENOEXEC, "not a kernel this kernel can kexec"),
        (errno.EKEYREJECTED, "signature of this kernel is missing or not trusted"),
        (errno.EBADMSG, "signature of this kernel is missing or not trusted"),
        (errno.EBUSY, "another kexec load"),
        (errno.EINVAL, "command line too long"),
        (errno.ENOMEM, "not enough memory"),
        (errno.EIO, "Input/output error"),
    ],
)
def test_kexec_errno_messages(monkeypatch: pytest.MonkeyPatch, err: int, message: str) -> None:
    monkeypatch.setattr(syscalls, "_libc", FakeLibc(err))
    with pytest.raises(syscalls.SyscallError, match=message) as exc:
        syscalls.kexec_file_load(3, 4, "ro")
    assert exc.value.errno == err
    assert exc.value.status == ExitCode.UNCHANGED
    if err in (errno.EKEYREJECTED, errno.EBADMSG):
        assert exc.value.hint is not None and "no way around it" in exc.value.hint


def test_kexec_file_load_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(syscalls, "_libc", libc)
    syscalls.kexec_file_load(3, 4, f"ro {MEMMAP}")
    syscalls.kexec_file_load(3, None, "ro")
    syscalls.kexec_unload()
    cmd = f"ro {MEMMAP}".encode()
    assert libc.calls == [
        ("syscall", [320, 3, 4, len(cmd) + 1, cmd, 0]),
        ("syscall", [320, 3, -1, 3, b"ro", syscalls.KEXEC_FILE_NO_INITRAMFS]),
        ("syscall", [320, -1, -1, 0, None, syscalls.KEXEC_FILE_UNLOAD]),
    ]


def test_reboot_and_remount_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc()
    monkeypatch.setattr(syscalls, "_libc", libc)
    syscalls.sync()
    syscalls.reboot_kexec()
    assert syscalls.remount_readonly("/boot", syscalls.MS_NODEV) == 0
    assert libc.calls == [
        ("sync", []),
        ("syscall", [169, 0xFEE1DEAD, 0x28121969, 0x45584543, None]),
        ("mount", [None, b"/boot", None, 0x20 | 0x1 | 0x4, None]),
    ]


def test_remount_busy_is_returned_other_errors_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syscalls, "_libc", FakeLibc(errno.EBUSY))
    assert syscalls.remount_readonly("/") == errno.EBUSY
    monkeypatch.setattr(syscalls, "_libc", FakeLibc(errno.EINVAL))
    with pytest.raises(syscalls.SyscallError, match="remounting /boot read-only"):
        syscalls.remount_readonly("/boot")
    monkeypatch.setattr(syscalls, "_libc", FakeLibc(errno.EINVAL))
    with pytest.raises(syscalls.SyscallError, match="no kernel is loaded"):
        syscalls.reboot_kexec()


# --- loading and entering ---------------------------------------------------------------------


@dataclass
class FakeKernel:
    """The syscalls of seamless.syscalls, recorded; a loaded kernel shows in ``loaded_file``."""

    loaded_file: Path
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)
    unfreezable: set[str] = field(default_factory=set)
    mounts_file: Path | None = None

    def kexec_file_load(self, kernel_fd: int, initrd_fd: int | None, line: str,
                        flags: int = 0) -> None:
        initrd_path = None if initrd_fd is None else Path(os.readlink(f"/proc/self/fd/{initrd_fd}"))
        self.calls.append(("kexec_file_load", Path(os.readlink(f"/proc/self/fd/{kernel_fd}")),
                           initrd_path, line))
        self.loaded_file.write_text("1\n")

    def kexec_unload(self) -> None:
        self.calls.append(("kexec_unload",))
        self.loaded_file.write_text("0\n")

    def sync(self) -> None:
        self.calls.append(("sync",))

    def remount_readonly(self, target: str, flags: int = 0) -> int:
        self.calls.append(("remount", target))
        if target in self.busy:
            return errno.EBUSY
        if self.mounts_file is not None:  # the table shows it read-only from now on
            lines = []
            for line in self.mounts_file.read_text().splitlines():
                fields = line.split(" ")
                if fields[1].replace("\\040", " ") == target:
                    fields[3] = fields[3].replace("rw", "ro", 1)
                lines.append(" ".join(fields))
            self.mounts_file.write_text("\n".join(lines) + "\n")
        return 0

    def freeze_fs(self, target: str) -> int:
        self.calls.append(("freeze", target))
        return errno.EOPNOTSUPP if target in self.unfreezable else 0

    def thaw_fs(self, target: str) -> int:
        self.calls.append(("thaw", target))
        return 0

    def reboot_kexec(self) -> None:
        self.calls.append(("reboot_kexec",))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/vda1 / ext4 rw,relatime,errors=remount-ro 0 0
tmpfs /run tmpfs rw,nosuid,nodev,size=201812k,mode=755 0 0
/dev/vda2 /boot ext4 rw,nodev,relatime 0 0
/dev/vdb /srv/my\\040data xfs rw,relatime 0 0
/dev/vdc /home xfs ro,relatime 0 0
/dev/pmem0 /var/lib/seamless/store ext2 rw,relatime 0 0
"""


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeKernel]:
    fake = FakeKernel(tmp_path / "kexec_loaded")
    fake.loaded_file.write_text("0\n")
    for name in ("kexec_file_load", "kexec_unload", "sync", "remount_readonly", "freeze_fs",
                 "thaw_fs", "reboot_kexec"):
        monkeypatch.setattr(syscalls, name, getattr(fake, name))
    monkeypatch.setattr(loader, "KEXEC_LOADED", fake.loaded_file)
    monkeypatch.setattr(loader, "flush_journal", lambda: fake.calls.append(("flush_journal",)))
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    fake.mounts_file = mounts
    monkeypatch.setattr(loader, "MOUNTS", mounts)
    monkeypatch.setattr(loader, "is_block_backed", lambda m: m.source.startswith("/dev/"))
    yield fake


def test_load_passes_the_files_and_closes_them(kernel: FakeKernel, tmp_path: Path) -> None:
    image = make_bzimage(tmp_path / "vmlinuz")
    rd = tmp_path / "initrd.img"
    rd.write_bytes(b"cpio")
    before = set(os.listdir("/proc/self/fd"))
    loader.load(image, rd, "ro")
    loader.load(image, None, "ro")
    assert kernel.calls == [("kexec_file_load", image, rd, "ro"),
                            ("kexec_file_load", image, None, "ro")]
    assert set(os.listdir("/proc/self/fd")) == before
    assert loader.loaded()


def test_enter_syncs_remounts_innermost_first_and_reboots_last(
    kernel: FakeKernel, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", True)
    kernel.loaded_file.write_text("1\n")
    kernel.busy.update({"/", "/srv/my data"})
    loader.enter()
    assert kernel.calls == [
        ("flush_journal",),
        ("sync",),
        ("remount", "/var/lib/seamless/store"),
        ("remount", "/srv/my data"),
        ("remount", "/boot"),
        ("remount", "/"),
        ("sync",),
        # what stayed writable is frozen (its journal clean for the new kernel), innermost
        # first, each filesystem once
        ("freeze", "/srv/my data"),
        ("freeze", "/"),
        ("reboot_kexec",),
    ]
    assert "left / read-write: busy" in caplog.text


def test_mount_flags_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    boot = next(m for m in loader.mounts(path) if m.target == "/boot")
    assert loader.kept_flags(boot) == syscalls.MS_NODEV | syscalls.MS_RELATIME and not boot.readonly


def test_enter_without_a_loaded_kernel_changes_nothing(kernel: FakeKernel) -> None:
    with pytest.raises(SeamlessError, match="no kernel is loaded") as exc:
        loader.enter()
    assert exc.value.status == ExitCode.UNCHANGED
    assert kernel.calls == []


def test_failed_reboot_says_what_was_changed(
    kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel.loaded_file.write_text("1\n")

    def fail() -> None:
        raise syscalls.SyscallError("reboot", errno.EINVAL)

    monkeypatch.setattr(syscalls, "reboot_kexec", fail)
    kernel.busy.update({"/", "/boot", "/var/lib/seamless/store"})
    kernel.unfreezable.add("/boot")
    with pytest.raises(SeamlessError, match="remounted read-only") as exc:
        loader.enter()
    assert exc.value.status == ExitCode.CHANGED
    # nothing stays frozen on the old kernel: what was frozen is thawed, outermost first;
    # /boot could not be frozen and is left alone
    tried = [c[1] for c in kernel.calls if c[0] == "freeze"]
    thawed = [c[1] for c in kernel.calls if c[0] == "thaw"]
    assert tried == ["/var/lib/seamless/store", "/boot", "/"]
    assert thawed == ["/", "/var/lib/seamless/store"]


def test_a_mount_of_a_frozen_filesystem_is_frozen_once(
    kernel: FakeKernel, tmp_path: Path
) -> None:
    table = tmp_path / "bound"
    table.write_text("/dev/vda1 / ext4 rw 0 0\n/dev/vda1 /srv/bound ext4 rw 0 0\n")
    assert loader.freeze_writable(table) == ["/srv/bound"]
    loader.thaw(["/srv/bound"])
    assert kernel.calls == [("freeze", "/srv/bound"), ("thaw", "/srv/bound")]


# --- the command ------------------------------------------------------------------------------


@dataclass
class Env:
    kernel: FakeKernel
    image: Path
    initrd: Path
    rebuilt: list[str]
    listing: list[str]


@pytest.fixture
def env(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Env:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    image = make_bzimage(tmp_path / f"vmlinuz-{RELEASE}")
    rd = tmp_path / f"initrd.img-{RELEASE}"
    rd.write_bytes(b"cpio")
    monkeypatch.setattr(initrd, "default_initrd",
                        lambda release: tmp_path / f"initrd.img-{release}")
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(RUNNING + "\n")
    monkeypatch.setattr(cmdline, "PROC_CMDLINE", proc_cmdline)
    monkeypatch.setattr(kexec_cli, "kexec_policy", lambda: KexecPolicy(
        lockdown="none", signature_enforced=False, load_disabled=False))
    region = Region(start=1 << 30, size=256 << 20, memmap=MEMMAP, reserved_now=True)
    monkeypatch.setattr(memstore_region, "find_region", lambda **kw: region)
    e = Env(kernel, image, rd, [], list(DRACUT_LISTING))
    monkeypatch.setattr(initrd, "list_files", lambda path: e.listing)

    def rebuild(release: str) -> Path:
        e.rebuilt.append(release)
        e.listing = list(DRACUT_LISTING)
        return rd

    monkeypatch.setattr(boothooks, "rebuild", rebuild)
    return e


def invoke(*args: str | Path, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["kexec", *map(str, args)], input=input)


def test_kexec_loads_and_enters(env: Env) -> None:
    result = invoke("--kernel", env.image, "--yes")
    assert result.exit_code == 0, result.output
    assert env.kernel.calls == [
        ("kexec_file_load", env.image, env.initrd, EXPECTED),
        ("flush_journal",),
        ("sync",),
        ("remount", "/var/lib/seamless/store"),
        ("remount", "/srv/my data"),
        ("remount", "/boot"),
        ("remount", "/"),
        ("sync",),
        ("reboot_kexec",),
    ]
    assert f"cmdline: {EXPECTED}" in result.stdout
    assert RELEASE in result.stderr


def test_upgrade_adds_the_restore_generation(env: Env, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """The generation's highest PID (plus the margin) is kept free in the new kernel."""
    seen = []

    def last_pid_of(region: object, number: int) -> int:
        seen.append(number)
        return 900 + cmdline.PID_MARGIN

    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setattr(kexec_cli, "last_pid_of", last_pid_of)
    monkeypatch.setattr(kexec_cli, "record_for", lambda region, number: handoff.UpgradeRecord(
        generation=number, token_sha256="", source_boot_id="boot-of-A"))
    monkeypatch.setattr(kexec_cli, "store_root", lambda region: store)
    result = invoke("--kernel", env.image, "--restore-generation", "7", "--append", "debug",
                    "--yes", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert seen == [7]
    *args, token = out["cmdline"].split(" ")
    assert " ".join(args) == (f"{EXPECTED} debug panic=10 seamless.restore=7 "
                              f"seamless.last_pid={900 + cmdline.PID_MARGIN}")
    # the new boot's proof: the token on its command line, its digest in the store
    record = handoff.read(store)
    assert record is not None and record.generation == 7 and record.target_release == RELEASE
    assert record.token_sha256 == handoff.digest(token.removeprefix("seamless.token="))
    assert out["release"] == RELEASE and out["region"] == MEMMAP and not out["dry_run"]
    assert env.kernel.calls[0] == ("kexec_file_load", env.image, env.initrd, out["cmdline"])
    assert env.kernel.names()[-1] == "reboot_kexec"


def test_dry_run_loads_then_unloads(env: Env) -> None:
    result = invoke("--kernel", env.image, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert env.kernel.calls == [("kexec_file_load", env.image, env.initrd, EXPECTED),
                                ("kexec_unload",)]
    assert json.loads(result.stdout)["dry_run"] is True


def test_initrd_without_restorer_is_rebuilt(env: Env) -> None:
    env.listing = ["usr/bin/bash"]
    result = invoke("--kernel", env.image, "--yes")
    assert result.exit_code == 0, result.output
    assert env.rebuilt == [RELEASE]
    assert env.kernel.calls[0] == ("kexec_file_load", env.image, env.initrd, EXPECTED)


def test_rebuild_initrd_on_request_but_not_in_a_dry_run(env: Env) -> None:
    assert invoke("--kernel", env.image, "--rebuild-initrd", "--dry-run").exit_code == 0
    assert env.rebuilt == []
    assert invoke("--kernel", env.image, "--rebuild-initrd", "--yes").exit_code == 0
    assert env.rebuilt == [RELEASE]


def test_declining_unloads_and_does_not_reboot(env: Env) -> None:
    result = invoke("--kernel", env.image, input="n\n")
    assert result.exit_code == ExitCode.UNCHANGED
    assert env.kernel.names() == ["kexec_file_load", "kexec_unload"]


def test_unload(env: Env) -> None:
    result = invoke("--unload")
    assert result.exit_code == 0, result.output
    assert env.kernel.names() == ["kexec_unload"]


def test_signature_rejected_by_the_kernel(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real syscalls.kexec_file_load, with libc failing as a locked-down kernel does."""
    monkeypatch.setattr(syscalls, "kexec_file_load", SYSCALLS_KEXEC_FILE_LOAD)
    monkeypatch.setattr(syscalls, "_libc", FakeLibc(errno.EKEYREJECTED))
    result = invoke("--kernel", env.image, "--yes")
    assert result.exit_code == ExitCode.UNCHANGED
    assert "signature" in result.output and "no way around it" in result.output
    assert "reboot_kexec" not in env.kernel.names()


def _bad_image(env: Env, **kwargs: Any) -> list[str]:
    make_bzimage(env.image, **kwargs)
    return ["--kernel", str(env.image)]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda e: _bad_image(e, magic=b"\x7fELF"), "not a bzImage"),
        (lambda e: _bad_image(e, xloadflags=0), "no 64-bit entry point"),
        (lambda e: _bad_image(e, cut=1), "truncated"),
        (lambda e: _bad_image(e, protocol=(2, 10)), "boot protocol 2.10"),
        (lambda e: ["--kernel", str(e.image) + ".missing"], "does not exist"),
        (lambda e: (e.initrd.unlink(), ["--kernel", str(e.image)])[1], "initramfs .* does not"),
        (lambda e: ["--kernel", str(e.image), "--initrd", str(e.image) + ".rd"], "does not exist"),
        (lambda e: ["--kernel", str(e.image), "--cmdline", "root=/dev/vda1"], "lacks the pres"),
        (lambda e: ["--kernel", str(e.image), "--append", "memmap=64M!512M"], "another region"),
    ],
    ids=["not-a-kernel", "32-bit", "truncated", "old-protocol", "missing-kernel",
         "missing-initrd", "missing-given-initrd", "no-region-arg", "other-region"],
)
def test_bad_input_loads_nothing(env: Env, setup: Any, message: str) -> None:
    result = invoke(*setup(env), "--yes")
    assert result.exit_code == ExitCode.UNCHANGED, result.output
    assert "seamless: error:" not in result.stdout
    assert env.kernel.calls == []
    assert re.search(message, result.output), result.output


def test_refusals_before_loading(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memstore_region, "find_region", lambda **kw: None)
    result = invoke("--kernel", env.image, "--yes")
    assert result.exit_code == ExitCode.UNCHANGED and "seamless setup --region" in result.output

    monkeypatch.setattr(memstore_region, "find_region", lambda **kw: Region(
        start=1 << 30, size=256 << 20, memmap=MEMMAP, reserved_now=False))
    result = invoke("--kernel", env.image, "--restore-generation", "3", "--yes")
    assert result.exit_code == ExitCode.UNCHANGED and "not reserved" in result.output

    monkeypatch.setattr(kexec_cli, "kexec_policy", lambda: KexecPolicy(
        lockdown="none", signature_enforced=False, load_disabled=True))
    result = invoke("--kernel", env.image, "--yes")
    assert result.exit_code == ExitCode.UNCHANGED and "kexec_load_disabled" in result.output

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = invoke("--kernel", env.image, "--yes")
    assert result.exit_code == ExitCode.UNCHANGED and "needs root" in result.output
    assert env.kernel.calls == []


def test_given_initrd_without_restorer_is_refused(env: Env, tmp_path: Path) -> None:
    env.listing = []
    other = tmp_path / "other.img"
    other.write_bytes(b"cpio")
    result = invoke("--kernel", env.image, "--initrd", other, "--yes")
    assert result.exit_code == ExitCode.UNCHANGED and "lacks the boot-time restorer" in (
        result.output)
    assert env.kernel.calls == [] and env.rebuilt == []


def test_usage_errors(env: Env) -> None:
    assert invoke("--yes").exit_code == ExitCode.USAGE
    assert invoke("--kernel", env.image, "--append", "a", "--cmdline", "b").exit_code == (
        ExitCode.USAGE)
    assert invoke("--kernel", env.image, "--initrd", "/x", "--rebuild-initrd").exit_code == (
        ExitCode.USAGE)
    assert env.kernel.calls == []


def test_command_is_registered() -> None:
    result = CliRunner().invoke(cli, ["kexec", "--help"])
    assert result.exit_code == 0
    assert "--restore-generation" not in result.output
    for option in ("--kernel", "--initrd", "--append", "--cmdline", "--rebuild-initrd",
                   "--dry-run", "--unload", "--yes", "--json"):
        assert option in result.output


def _newc(*names: str) -> bytes:
    out = b""
    for i, name in enumerate([*names, "TRAILER!!!"]):
        data = b"" if name == "TRAILER!!!" else name.encode() * 3
        raw = name.encode() + b"\0"
        fields = [i, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        entry = header + raw
        entry += b"\0" * (-len(entry) % 4) + data
        out += entry + b"\0" * (-len(entry) % 4)
    return out + b"\0" * 512


def test_initrd_read_directly_early_and_compressed_archives(tmp_path: Path) -> None:
    """An uncompressed early archive (microcode) then a gzip one: names from both, no
    lsinitrd needed; an unknown compression falls back (None)."""
    import gzip

    path = tmp_path / "initrd.img"
    path.write_bytes(_newc("kernel", "kernel/x86/microcode/GenuineIntel.bin")
                     + gzip.compress(_newc("usr", "usr/lib/dracut/hooks/pre-pivot/"
                                           "90-seamless-restore.sh", "init")))
    names = initrd.read_cpio_names(path)
    assert names is not None and "init" in names and "kernel" in names
    assert initrd.has_restorer(path)
    path.write_bytes(_newc("kernel") + b"\x5d\x00\x00 not a known compression")
    assert initrd.read_cpio_names(path) is None


def test_a_new_kernel_that_could_not_open_the_store_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nd_e820 and nd_pmem: built in, or in the initramfs; else every tree would be lost."""
    release = "6.12.118+deb13-amd64"
    (tmp_path / release).mkdir()
    builtin = tmp_path / release / "modules.builtin"
    builtin.write_text("kernel/drivers/nvdimm/libnvdimm.ko\nkernel/drivers/nvdimm/nd_e820.ko\n")
    carried = [f"usr/lib/modules/{release}/kernel/drivers/nvdimm/nd_pmem.ko.xz"]
    assert initrd.store_modules_missing(carried, release, tmp_path) == []
    assert initrd.store_modules_missing([], release, tmp_path) == ["nd_pmem"]
    builtin.write_text("")
    assert initrd.store_modules_missing(carried, release, tmp_path) == ["nd_e820"]
    assert initrd.store_modules_missing(carried, "7.0.0-unknown", tmp_path) is None
    monkeypatch.setattr(initrd, "MODULES", tmp_path)
    with pytest.raises(SeamlessError, match="nd_e820 is neither built into it nor in") as e:
        initrd.check_store_modules(Path("/boot/initrd.img"), release, carried)
    assert e.value.status == ExitCode.UNCHANGED


def test_kernel_check_says_in_one_line_what_would_stop_an_upgrade(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What the package's /etc/kernel/postinst.d hook prints for each new kernel."""
    from seamless.kexec import check

    boot = tmp_path / "boot"
    boot.mkdir()
    make_bzimage(boot / f"vmlinuz-{RELEASE}")
    monkeypatch.setattr(check, "Criu", lambda: (_ for _ in ()).throw(
        SeamlessError("criu is not installed")))
    assert check.problems(RELEASE, boot) == [
        f"{boot}/initrd.img-{RELEASE} is not built yet (apt builds it at the end: "
        "check again then)"]
    (boot / f"initrd.img-{RELEASE}").write_bytes(b"")
    listing = [f"usr/lib/modules/{RELEASE}/kernel/drivers/nvdimm/nd_pmem.ko.xz"]
    monkeypatch.setattr(initrd, "list_files", lambda path: listing)
    monkeypatch.setattr(initrd, "MODULES", tmp_path)  # no modules.builtin: cannot tell
    found = check.problems(RELEASE, boot)
    assert len(found) == 1 and "lacks the restorer" in found[0]
    listing.append("scripts/init-bottom/seamless")
    assert check.problems(RELEASE, boot) == []
    (boot / "vmlinuz-7.0.0").write_bytes(b"not a kernel")
    assert check.problems("7.0.0", boot)[0].startswith("its kernel image: ")

    monkeypatch.setattr(check, "problems", lambda release: ["it is not built yet"])
    monkeypatch.setattr(check, "kexec_policy", lambda: KexecPolicy(
        lockdown=None, signature_enforced=False, load_disabled=False, reasons=()))
    result = CliRunner().invoke(cli, ["kernel-check", RELEASE])
    assert result.exit_code == ExitCode.CHECK_FAILED
    assert result.stdout == (f"seamless: {RELEASE}: NOT ready for seamless upgrade: "
                             "it is not built yet\n")


def test_a_signal_before_the_kexec_leaves_nothing_frozen(
    kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel.loaded_file.write_text("1\n")
    kernel.busy.update({"/", "/boot"})

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(syscalls, "reboot_kexec", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loader.enter()
    assert [c[1] for c in kernel.calls if c[0] == "thaw"] == ["/", "/boot"]
