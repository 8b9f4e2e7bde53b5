"""Load the target kernel with kexec_file_load, and enter it.

:func:`enter` does what ``systemctl kexec`` does at its very end, without
stopping any service first: sync, remount the disks' filesystems read-only
(innermost first), sync again, reboot into the loaded kernel.  A filesystem
that stays writable (a file is open for writing on it: the root's, as a rule)
is frozen last, which writes its journal out and marks it clean: the new
kernel mounts it without replaying the journal, which cost seconds of the
blackout.  Every system call goes through
:mod:`seamless.syscalls`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from seamless import syscalls
from seamless.errors import ExitCode, SeamlessError
from seamless.log import log
from seamless.mounts import Mount, is_block_backed, mounts
from seamless.run import run

KEXEC_LOADED = Path("/sys/kernel/kexec_loaded")
MOUNTS = Path("/proc/self/mounts")

__all__ = ["Mount", "enter", "load", "loaded", "mounts", "unload"]

#: Per-mount options kept through the read-only remount (MS_REMOUNT resets them otherwise).
_MOUNT_FLAGS = {
    "nosuid": syscalls.MS_NOSUID,
    "nodev": syscalls.MS_NODEV,
    "noexec": syscalls.MS_NOEXEC,
    "noatime": syscalls.MS_NOATIME,
    "nodiratime": syscalls.MS_NODIRATIME,
    "relatime": syscalls.MS_RELATIME,
    "strictatime": syscalls.MS_STRICTATIME,
}


def kept_flags(mount: Mount) -> int:
    """The per-mount flags to keep when remounting."""
    flags = 0
    for option in mount.options:
        flags |= _MOUNT_FLAGS.get(option, 0)
    return flags


def load(kernel: Path, initrd: Path | None, cmdline: str) -> None:
    """Load ``kernel`` (with ``initrd``) to be entered later; replaces any loaded one."""
    fds: list[int] = []
    try:
        fds.append(_open(kernel))
        initrd_fd = None
        if initrd is not None:
            initrd_fd = _open(initrd)
            fds.append(initrd_fd)
        syscalls.kexec_file_load(fds[0], initrd_fd, cmdline)
    finally:
        for fd in fds:
            os.close(fd)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SeamlessError(f"cannot open {path}: {e.strerror}") from e


def unload() -> None:
    syscalls.kexec_unload()


def loaded(path: Path | None = None) -> bool:
    """Whether a kernel is loaded for kexec."""
    try:
        return (path or KEXEC_LOADED).read_text().strip() == "1"
    except OSError:
        return False


def writable_disks(mounts_path: Path | None = None) -> list[Mount]:
    """The writable block-backed mounts, innermost first."""
    return [m for m in reversed(mounts(mounts_path or MOUNTS))
            if not m.readonly and is_block_backed(m)]


def remount_readonly_all(mounts_path: Path | None = None) -> list[str]:
    """Remount every writable block-backed filesystem read-only, innermost first.

    A busy one (a file open for writing) is logged and left as it is: the
    sync before and after still writes its data.  Returns the targets remounted.
    """
    done = []
    for mount in writable_disks(mounts_path):
        try:
            err = syscalls.remount_readonly(mount.target, kept_flags(mount))
        except SeamlessError as e:
            log.warning("left %s read-write: %s", mount.target, e.message)
            continue
        if err:
            log.warning("left %s read-write: busy (a file is open for writing)", mount.target)
            continue
        log.debug("remounted %s read-only", mount.target)
        done.append(mount.target)
    return done


def freeze_writable(mounts_path: Path | None = None) -> list[str]:
    """Freeze every block-backed filesystem still writable, innermost first, each once
    (bind mounts share it). Nothing is logged once the first is frozen: the journal may
    live there. Returns the targets frozen, for :func:`thaw`."""
    writable = []
    seen = set()
    for mount in writable_disks(mounts_path):
        if mount.source not in seen:
            seen.add(mount.source)
            writable.append(mount.target)
    if writable:
        log.debug("freezing %s: their journals written out, nothing for the new kernel "
                  "to replay", ", ".join(writable))
    frozen: list[str] = []
    try:
        for target in writable:
            try:
                if syscalls.freeze_fs(target) == 0:
                    frozen.append(target)
            except SeamlessError:
                continue  # the new kernel replays its journal, as without the freeze
    except BaseException:  # a signal: nothing stays frozen behind it
        thaw(frozen)
        raise
    return frozen


def thaw(targets: list[str]) -> None:
    """Thaw what :func:`freeze_writable` froze, outermost first."""
    for target in reversed(targets):
        try:
            syscalls.thaw_fs(target)
        except SeamlessError as e:
            log.warning("%s stays frozen: %s (fsfreeze --unfreeze %s)", target, e.message,
                        target)


def flush_journal() -> None:
    """Ask journald to write what it holds (the upgrade's own lines among it) to disk:
    the kexec gives it no shutdown to do that. Best effort, bounded."""
    try:
        run(["journalctl", "--sync"], check=False, timeout=10)
    except (SeamlessError, subprocess.TimeoutExpired) as e:
        log.debug("journalctl --sync: %s", e)


def enter(loaded_path: Path | None = None, mounts_path: Path | None = None) -> None:
    """Enter the loaded kernel: sync, remount read-only, sync, freeze what is still
    writable, reboot.  Does not return."""
    if not loaded(loaded_path):
        raise SeamlessError("no kernel is loaded for kexec",
                            hint="load one first (seamless kexec --kernel PATH)")
    flush_journal()
    syscalls.sync()
    remounted = remount_readonly_all(mounts_path)
    syscalls.sync()
    frozen = freeze_writable(mounts_path)
    try:
        syscalls.reboot_kexec()
    except BaseException as e:  # a failed kexec, or a signal: nothing stays frozen
        thaw(frozen)
        if not isinstance(e, SeamlessError):
            raise
        raise SeamlessError(
            f"{e.message}; the system is still running the old kernel, with "
            f"{len(remounted)} filesystems remounted read-only ({', '.join(remounted) or '-'})",
            hint="remount them read-write (mount -o remount,rw TARGET) or reboot",
            exit_code=ExitCode.CHANGED,
        ) from e
