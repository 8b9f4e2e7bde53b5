"""The target kernel's initramfs, which must carry the boot-time restorer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from seamless.errors import SeamlessError
from seamless.restore import boothooks
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


def list_files(initrd: Path) -> list[str]:
    """The paths inside ``initrd`` (relative, no leading ``./``), with whichever lister exists."""
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


def has_restorer(initrd: Path) -> bool:
    """Whether ``initrd`` carries the restorer of dracut or of initramfs-tools."""
    for name in list_files(initrd):
        if name.endswith(DRACUT_HOOK) or name == INITRAMFS_TOOLS_SCRIPT or name.endswith(
            "/" + INITRAMFS_TOOLS_SCRIPT
        ):
            return True
    return False


def rebuild(release: str) -> Path:
    """Rebuild /boot/initrd.img-RELEASE with the restorer, and check that it has it."""
    initrd = boothooks.rebuild(release)
    if not has_restorer(initrd):
        raise SeamlessError(
            f"the rebuilt {initrd} still lacks the restorer",
            hint="run `seamless install-restorer`, then try again",
        )
    return initrd
