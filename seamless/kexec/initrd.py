"""The target kernel's initramfs, which must carry the boot-time restorer."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from seamless import kernel_modules
from seamless.errors import SeamlessError
from seamless.kexec import boothooks
from seamless.log import log
from seamless.run import run

#: Where each generator puts the restorer's hook inside the initramfs.
DRACUT_HOOK = "dracut/hooks/pre-pivot/90-seamless-restore.sh"
INITRAMFS_TOOLS_SCRIPT = "scripts/init-bottom/seamless"


def default_initrd(release: str) -> Path:
    return Path(f"/boot/initrd.img-{release}")


def check_readable(initrd: Path, release: str) -> None:
    if not initrd.exists():
        raise SeamlessError(
            f"initramfs {initrd} does not exist",
            hint=f"build it with `seamless install-restorer --rebuild {release}`, "
            "or give one with --initrd",
        )
    if not initrd.is_file() or not os.access(initrd, os.R_OK):
        raise SeamlessError(f"cannot read initramfs {initrd}", hint="run seamless as root")


CPIO_MAGIC = b"070701"
#: Compressed segments, by their magic: the stdlib's, or a command writing to stdout.
DECOMPRESSORS: dict[bytes, Callable[[bytes], bytes] | list[str]] = {
    b"\x1f\x8b": gzip.decompress,
    b"\xfd7zXZ": lzma.decompress,
    b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"],
    b"\x02\x21\x4c\x18": ["lz4", "-dc"],
}


def _cpio_names(data: bytes) -> tuple[list[str], int]:
    """Names in the concatenated uncompressed newc archives at the start of ``data``, and
    the offset where they end (the start of a compressed segment, or the end)."""
    names: list[str] = []
    pos = 0
    while True:
        while pos < len(data) and data[pos] == 0:
            pos += 1  # padding between archives
        if data[pos:pos + 6] != CPIO_MAGIC:
            return names, pos
        header = data[pos:pos + 110]
        fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        filesize, namesize = fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode(errors="replace")
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3
        if name != "TRAILER!!!":
            names.append(name)


def read_cpio_names(initrd: Path) -> list[str] | None:
    """The paths inside ``initrd`` read directly (an uncompressed early archive followed by
    one compressed one, as dracut and initramfs-tools write them); None if it is not
    laid out that way. Much faster than lsinitrd, which lists sizes and modes too."""
    data = initrd.read_bytes()
    names, end = _cpio_names(data)
    if end < len(data):
        rest = data[end:]
        how = next((d for magic, d in DECOMPRESSORS.items() if rest.startswith(magic)), None)
        if how is None:
            return None
        if callable(how):
            plain = how(rest)
        else:
            if shutil.which(how[0]) is None:
                return None
            result = run(how, input=rest, check=False, timeout=300)
            if result.returncode != 0:
                return None
            plain = result.stdout
        more, end = _cpio_names(plain)
        if end < len(plain):
            return None
        names += more
    return names or None


def list_files(initrd: Path) -> list[str]:
    """The paths inside ``initrd`` (relative, no leading ``./``), with whichever lister exists."""
    try:
        names = read_cpio_names(initrd)
    except (ValueError, IndexError, OSError, EOFError, lzma.LZMAError):
        names = None
    if names is not None:
        return [n.removeprefix("./").lstrip("/") for n in names]
    if shutil.which("lsinitrd"):
        out = run(["lsinitrd", initrd], timeout=300).stdout.decode(errors="replace")
        # `ls -l` style lines: the path is the last field (before " -> " for a link).
        names = [line.split(" -> ")[0].split()[-1] for line in out.splitlines() if line.split()]
    elif shutil.which("lsinitramfs"):
        out = run(["lsinitramfs", initrd], timeout=300).stdout.decode(errors="replace")
        names = [line.strip() for line in out.splitlines() if line.strip()]
    else:
        raise SeamlessError(
            "cannot look inside the initramfs: neither lsinitrd nor lsinitramfs is installed",
            hint="apt-get install dracut (or initramfs-tools)",
        )
    return [n.removeprefix("./").lstrip("/") for n in names]


def has_restorer(initrd: Path, names: list[str] | None = None) -> bool:
    """Whether ``initrd`` (whose files are ``names``, when listed already) carries the
    restorer of dracut or of initramfs-tools."""
    for name in list_files(initrd) if names is None else names:
        if name.endswith(DRACUT_HOOK) or name == INITRAMFS_TOOLS_SCRIPT or name.endswith(
            "/" + INITRAMFS_TOOLS_SCRIPT
        ):
            return True
    return False


#: What the new kernel needs to see the store: the memmap= region's bus, and its
#: block device (the other pmem modules load with them).
STORE_MODULES = kernel_modules.named("initrd")
MODULES = Path("/lib/modules")


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def store_modules_missing(names: list[str], release: str,
                          modules: Path = MODULES) -> list[str] | None:
    """Of :data:`STORE_MODULES`, those kernel ``release`` has neither built in nor in its
    initramfs (whose files are ``names``): without them it cannot open the store, and
    every tree would be lost. None when it cannot tell (no modules.builtin)."""
    try:
        builtin = {_module_name(line.strip()) for line in
                   (modules / release / "modules.builtin").read_text().splitlines()}
    except OSError:
        return None
    carried = {_module_name(n) for n in names if n.endswith((".ko", ".ko.xz", ".ko.zst",
                                                             ".ko.gz"))}
    return [m for m in STORE_MODULES if m not in builtin and m not in carried]


def check_store_modules(initrd: Path, release: str, names: list[str] | None = None) -> None:
    """Refuse a new kernel that could not open the store in its initramfs."""
    missing = store_modules_missing(list_files(initrd) if names is None else names, release,
                                    MODULES)
    if missing is None:
        log.warning("cannot tell whether %s can open the store: %s has no modules.builtin",
                    release, MODULES / release)
    elif missing:
        raise SeamlessError(
            f"{release} could not open the store: {', '.join(missing)} is neither built "
            f"into it nor in {initrd}",
            hint="rebuild the initramfs with the restorer (seamless install-restorer, then "
            "seamless kexec --rebuild-initrd), or use a kernel with CONFIG_X86_PMEM_LEGACY")


def check_restorer(initrd: Path, release: str) -> bool:
    """Whether ``initrd`` carries the restorer; one that does must also carry what opens
    the store in ``release`` (a :class:`SeamlessError` if not, or if it cannot be read)."""
    check_readable(initrd, release)
    names = list_files(initrd)
    if not has_restorer(initrd, names):
        return False
    check_store_modules(initrd, release, names)
    return True


def rebuild(release: str) -> Path:
    """Rebuild /boot/initrd.img-RELEASE with the restorer, and check that it has it."""
    initrd = boothooks.rebuild(release)
    if not has_restorer(initrd):
        raise SeamlessError(
            f"the rebuilt {initrd} still lacks the restorer",
            hint="run `seamless install-restorer`, then try again",
        )
    return initrd
