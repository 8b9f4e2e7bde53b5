"""The target kernel's image, and whether the running kernel lets us kexec it.

:meth:`KernelImage.read` checks the x86 boot protocol header of a bzImage
(Documentation/arch/x86/boot.rst) the way the kernel's own kexec_file_load
probe does (arch/x86/kernel/kexec-bzimage64.c), so a bad file is refused
with a useful message before anything is loaded.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from seamless.errors import SeamlessError

SECTOR = 512
#: The setup header's fields (offsets in the file, as in struct boot_params).
SETUP_SECTS = 0x1F1
SYSSIZE = 0x1F4
BOOT_FLAG = 0x1FE
HEADER = 0x202
VERSION = 0x206
KERNEL_VERSION = 0x20E
LOADFLAGS = 0x211
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
HEADER_END = 0x240

LOADED_HIGH = 0x1
XLF_KERNEL_64 = 0x1
XLF_CAN_BE_LOADED_ABOVE_4G = 0x2
#: kexec_file_load's bzImage64 loader wants protocol 2.12 (xloadflags) or later.
MIN_PROTOCOL = (2, 12)
#: The kernel keeps this much of cmdline_size free for "elfcorehdr=0x...".
ELFCOREHDR_RESERVE = 30

_HINT = "give the target kernel's bzImage, usually /boot/vmlinuz-RELEASE"


@dataclass(frozen=True)
class KernelImage:
    path: Path
    #: The first word of the embedded version string: what `uname -r` will say.
    release: str
    #: The whole embedded version string (release, builder, build date).
    version_string: str
    protocol: tuple[int, int]
    size: int
    #: The header's cmdline_size: the longest command line it takes, without the NUL.
    cmdline_size: int

    @property
    def protocol_str(self) -> str:
        return f"{self.protocol[0]}.{self.protocol[1]:02d}"

    @property
    def max_cmdline(self) -> int:
        """The longest command line (without NUL) kexec_file_load accepts for it."""
        return self.cmdline_size - ELFCOREHDR_RESERVE - 1

    @classmethod
    def read(cls, path: Path) -> KernelImage:
        """Check that ``path`` is a 64-bit bzImage kexec_file_load can load."""
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(HEADER_END)
                if not _is_bzimage(head):
                    raise SeamlessError(f"{path} is not a bzImage kernel", hint=_HINT)
                setup_sects = head[SETUP_SECTS] or 4
                (pointer,) = struct.unpack_from("<H", head, KERNEL_VERSION)
                f.seek(pointer + 0x200)
                raw = f.read(256)
        except FileNotFoundError as e:
            raise SeamlessError(f"kernel image {path} does not exist", hint=_HINT) from e
        except IsADirectoryError as e:
            raise SeamlessError(f"kernel image {path} is a directory", hint=_HINT) from e
        except OSError as e:
            raise SeamlessError(f"cannot read kernel image {path}: {e.strerror}",
                                hint="run seamless as root") from e
        (major, minor) = head[VERSION + 1], head[VERSION]
        if (major, minor) < MIN_PROTOCOL:
            raise SeamlessError(
                f"{path} uses boot protocol {major}.{minor:02d}; kexec_file_load needs "
                f"{MIN_PROTOCOL[0]}.{MIN_PROTOCOL[1]} or later", hint="use a kernel from 3.8 on")
        if not head[LOADFLAGS] & LOADED_HIGH:
            raise SeamlessError(f"{path} is a zImage, not a bzImage", hint=_HINT)
        xloadflags = struct.unpack_from("<H", head, XLOADFLAGS)[0]
        if not xloadflags & XLF_KERNEL_64:
            raise SeamlessError(f"{path} has no 64-bit entry point (a 32-bit-only kernel)",
                                hint="give an x86_64 kernel")
        if not xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G:
            raise SeamlessError(f"{path} cannot be loaded above 4 GiB, which kexec_file_load "
                                "needs", hint="give a relocatable x86_64 kernel")
        (syssize,) = struct.unpack_from("<I", head, SYSSIZE)
        expected = (setup_sects + 1) * SECTOR + syssize * 16
        if size < expected:
            raise SeamlessError(f"{path} is truncated: {size} bytes, its header says at "
                                f"least {expected}", hint="reinstall the kernel's package")
        version_string = raw.split(b"\0", 1)[0].decode(errors="replace").strip()
        if not version_string:
            raise SeamlessError(f"{path} carries no kernel version string", hint=_HINT)
        (cmdline_size,) = struct.unpack_from("<I", head, CMDLINE_SIZE)
        return cls(path=path, release=version_string.split()[0], version_string=version_string,
                   protocol=(major, minor), size=size, cmdline_size=cmdline_size)


def _is_bzimage(head: bytes) -> bool:
    return (
        len(head) == HEADER_END
        and head[HEADER:HEADER + 4] == b"HdrS"
        and struct.unpack_from("<H", head, BOOT_FLAG)[0] == 0xAA55
    )


@dataclass(frozen=True)
class KexecPolicy:
    """What the running kernel allows (informational; the kernel decides at load)."""

    #: The active lockdown mode ("none", "integrity", "confidentiality"), None if unknown.
    lockdown: str | None
    #: Whether kexec_file_load will refuse an image without a trusted signature.
    signature_enforced: bool
    #: kernel.kexec_load_disabled: every kexec load is refused until a reboot.
    load_disabled: bool
    #: Why the signature is thought enforced (empty when it is not).
    reasons: tuple[str, ...] = ()


def lockdown_state(path: Path = Path("/sys/kernel/security/lockdown")) -> str | None:
    """The active lockdown mode, the bracketed word in ``none [integrity] ...``."""
    try:
        text = path.read_text()
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


def kexec_policy(
    lockdown_path: Path = Path("/sys/kernel/security/lockdown"),
    cmdline_path: Path = Path("/proc/cmdline"),
    disabled_path: Path = Path("/proc/sys/kernel/kexec_load_disabled"),
    config_path: Path | None = None,
) -> KexecPolicy:
    lockdown = lockdown_state(lockdown_path)
    reasons = []
    if lockdown in ("integrity", "confidentiality"):
        reasons.append(f"lockdown={lockdown}")
    args = _read(cmdline_path).split()
    for arg in args:
        if arg.startswith("lockdown=") or arg == "module.sig_enforce=1":
            reasons.append(f"{arg} on the command line")
    config = config_path or Path(f"/boot/config-{os.uname().release}")
    if "CONFIG_KEXEC_SIG_FORCE=y" in _read(config).splitlines():
        reasons.append("CONFIG_KEXEC_SIG_FORCE=y")
    return KexecPolicy(
        lockdown=lockdown,
        signature_enforced=bool(reasons),
        load_disabled=_read(disabled_path).strip() == "1",
        reasons=tuple(reasons),
    )


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
