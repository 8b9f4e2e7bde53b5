"""The one place that makes system calls through ctypes.

Each call turns a failure's errno into a :class:`SyscallError` whose message
says what it means for the operator and what to do.  Tests replace ``_libc``
(or the functions themselves): nothing else in seamless talks to libc.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Any

from seamless.errors import SeamlessError

#: libc, with errno saved after every call (ctypes.get_errno).
_libc: Any = ctypes.CDLL(None, use_errno=True)

# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
SYS_REBOOT = 169
SYS_KEXEC_FILE_LOAD = 320
SYS_PIDFD_GETFD = 438

# kexec_file_load(2) flags (include/uapi/linux/kexec.h).
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_NO_INITRAMFS = 0x4

# reboot(2) (include/uapi/linux/reboot.h).
LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 0x28121969
LINUX_REBOOT_CMD_KEXEC = 0x45584543

# mount(2) flags (include/uapi/linux/mount.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

_SIGNATURE = (
    "the running kernel enforces signed kexec images and the signature of this kernel "
    "is missing or not trusted",
    "there is no way around it: use a kernel signed with a key the running kernel trusts "
    "(the distribution's own signed linux-image package)",
)

#: What kexec_file_load's errors mean, and what to do about them.
_KEXEC_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSYS: (
        "the running kernel has no kexec_file_load (built without CONFIG_KEXEC_FILE)",
        "boot a kernel with CONFIG_KEXEC_FILE=y once, with a normal reboot",
    ),
    errno.EPERM: (
        "kexec is not permitted: not root, or the kernel is locked down, or kexec is "
        "disabled by kernel.kexec_load_disabled",
        "run as root; see /sys/kernel/security/lockdown and "
        "/proc/sys/kernel/kexec_load_disabled (once 1, it stays 1 until a reboot)",
    ),
    errno.ENOEXEC: (
        "the file is not a kernel this kernel can kexec",
        "give a 64-bit x86 bzImage (/boot/vmlinuz-RELEASE); `dmesg | tail` says why",
    ),
    errno.EKEYREJECTED: _SIGNATURE,
    errno.EBADMSG: _SIGNATURE,
    errno.ENOKEY: _SIGNATURE,
    errno.EBUSY: (
        "another kexec load or unload is in progress",
        "wait for it to finish and try again",
    ),
    errno.EINVAL: (
        "the kernel rejected the load: command line too long, or an invalid argument",
        "shorten the command line; `dmesg | tail` says what was rejected",
    ),
    errno.ENOMEM: (
        "not enough memory to load the kernel and initramfs",
        "free some memory, or use a smaller initramfs (dracut --hostonly)",
    ),
}

_REBOOT_ERRORS: dict[int, tuple[str, str]] = {
    errno.EPERM: ("rebooting is not permitted (not root, CAP_SYS_BOOT)", "run as root"),
    errno.EINVAL: (
        "no kernel is loaded for kexec, or the kernel has no kexec support",
        "load one first (seamless kexec --kernel PATH)",
    ),
}


class SyscallError(SeamlessError):
    """A system call failed; ``errno`` says how."""

    def __init__(
        self, call: str, err: int, table: dict[int, tuple[str, str]] | None = None
    ) -> None:
        message, hint = (table or {}).get(err, (os.strerror(err), None))
        super().__init__(f"{call}: {message} ({errno.errorcode.get(err, err)})", hint=hint)
        self.call = call
        self.errno = err


def _check(rc: int, call: str, table: dict[int, tuple[str, str]] | None = None) -> None:
    if rc == -1:
        raise SyscallError(call, ctypes.get_errno(), table)


def kexec_file_load(kernel_fd: int, initrd_fd: int | None, cmdline: str, flags: int = 0) -> None:
    """Load ``kernel_fd`` (and ``initrd_fd``) with ``cmdline`` as the kernel to kexec into."""
    if initrd_fd is None:
        initrd_fd, flags = -1, flags | KEXEC_FILE_NO_INITRAMFS
    buf = cmdline.encode() + b"\0"
    rc: int = _libc.syscall(
        ctypes.c_long(SYS_KEXEC_FILE_LOAD),
        ctypes.c_int(kernel_fd),
        ctypes.c_int(initrd_fd),
        ctypes.c_ulong(len(buf)),
        ctypes.c_char_p(buf),
        ctypes.c_ulong(flags),
    )
    _check(rc, "kexec_file_load", _KEXEC_ERRORS)


def pidfd_getfd(pid: int, fd: int) -> int:
    """A descriptor of this process for the open file ``fd`` of process ``pid`` (a
    copy, as dup would make: the same socket, its queues and offsets)."""
    pidfd = os.pidfd_open(pid)
    try:
        rc: int = _libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                                ctypes.c_int(fd), ctypes.c_uint(0))
        _check(rc, f"pidfd_getfd({pid}, {fd})")
    finally:
        os.close(pidfd)
    os.set_inheritable(rc, False)
    return rc


def kexec_unload() -> None:
    """Unload the kernel loaded for kexec (no error when none is loaded)."""
    rc: int = _libc.syscall(
        ctypes.c_long(SYS_KEXEC_FILE_LOAD),
        ctypes.c_int(-1),
        ctypes.c_int(-1),
        ctypes.c_ulong(0),
        ctypes.c_char_p(None),
        ctypes.c_ulong(KEXEC_FILE_UNLOAD),
    )
    _check(rc, "kexec_file_load(KEXEC_FILE_UNLOAD)", _KEXEC_ERRORS)


def reboot_kexec() -> None:
    """Jump into the loaded kernel now.  Returns only on failure (which raises)."""
    rc: int = _libc.syscall(
        ctypes.c_long(SYS_REBOOT),
        ctypes.c_uint(LINUX_REBOOT_MAGIC1),
        ctypes.c_uint(LINUX_REBOOT_MAGIC2),
        ctypes.c_uint(LINUX_REBOOT_CMD_KEXEC),
        ctypes.c_void_p(None),
    )
    _check(rc, "reboot(LINUX_REBOOT_CMD_KEXEC)", _REBOOT_ERRORS)


# ioctl(2) requests of include/uapi/linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int).
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def _fs_ioctl(target: str, request: int, call: str) -> int:
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SyscallError(f"{call} {target}", e.errno or errno.EIO) from e
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            return e.errno
        raise SyscallError(f"{call} {target}", e.errno or errno.EIO) from e
    finally:
        os.close(fd)
    return 0


def freeze_fs(target: str) -> int:
    """Freeze the filesystem mounted at ``target`` (FIFREEZE): its journal is written
    out and marked clean, and writers wait until it is thawed.  Returns 0, or the errno
    when it cannot be frozen here (EBUSY: frozen already; EOPNOTSUPP, ENOTTY, EINVAL:
    no freezing for this filesystem); any other failure raises."""
    return _fs_ioctl(target, FIFREEZE, "freezing")


def thaw_fs(target: str) -> int:
    """Thaw a filesystem :func:`freeze_fs` froze.  0, or the errno (EINVAL: not frozen)."""
    return _fs_ioctl(target, FITHAW, "thawing")


def sync() -> None:
    """Write every dirty buffer to its device (sync(2) cannot fail)."""
    _libc.sync()


AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """Change the owner of what ``fd`` is open on, even a descriptor opened with O_PATH
    on a symbolic link itself (fchownat with AT_EMPTY_PATH): no name is looked up."""
    rc: int = _libc.fchownat(
        ctypes.c_int(fd), ctypes.c_char_p(b""), ctypes.c_uint(uid), ctypes.c_uint(gid),
        ctypes.c_int(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
    )
    _check(rc, "fchownat")


#: umount2(2) flags (include/linux/fs.h).
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8


def detach_mount(target: str) -> None:
    """Detach the mount at ``target`` from the tree now (umount2 with MNT_DETACH); the
    unmount propagates to its peers and slaves as any unmount does."""
    rc: int = _libc.umount2(ctypes.c_char_p(os.fsencode(target)),
                            ctypes.c_int(MNT_DETACH | UMOUNT_NOFOLLOW))
    _check(rc, f"umount2 {target}")


def remount_readonly(target: str, flags: int = 0) -> int:
    """Remount the filesystem at ``target`` read-only, keeping the per-mount ``flags``.

    Returns 0, or ``errno.EBUSY`` when a file there is open for writing (the
    caller decides whether that matters); any other failure raises.
    """
    rc: int = _libc.mount(
        ctypes.c_char_p(None),
        ctypes.c_char_p(os.fsencode(target)),
        ctypes.c_char_p(None),
        ctypes.c_ulong(MS_REMOUNT | MS_RDONLY | flags),
        ctypes.c_void_p(None),
    )
    if rc == -1:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            return err
        raise SyscallError(f"remounting {target} read-only", err)
    return 0
