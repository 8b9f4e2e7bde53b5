"""Install the boot-time restorer into the initramfs generators.

The hooks (``dracut-module/`` and ``initramfs/`` in the source tree) ship as
data files under ``PREFIX/share/seamless``.  Installing copies them where
dracut and initramfs-tools look, and makes every initramfs built from then on
(including the one a kernel package builds) carry the restorer.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from seamless import kernel_modules
from seamless.errors import SeamlessError
from seamless.run import run

MODULE = "90seamless"
#: Beside the module: the dracut configuration that adds it to every initramfs.
DRACUT_CONF_NAME = "90-seamless.conf"
#: Written by dpkg when the Debian package is installed: it owns the hooks then.
DPKG_LIST = Path("var/lib/dpkg/info/seamless.list")


def source_dir() -> Path:
    """Where this installation keeps the hooks (a source checkout works too)."""
    here = Path(__file__).resolve()
    candidates = [
        Path(sys.prefix) / "share/seamless",
        Path("/usr/local/share/seamless"),
        Path("/usr/share/seamless"),
    ]
    checkout = here.parents[2]
    if (checkout / "dracut-module" / MODULE).is_dir():
        return checkout
    for c in candidates:
        if (c / "dracut" / MODULE).is_dir():
            return c
    raise SeamlessError(
        "the restorer's boot hooks are not installed with seamless",
        hint="reinstall seamless from its wheel (pip install seamless-*.whl)",
    )


def _dracut_source(src: Path) -> Path:
    return src / "dracut-module" / MODULE if (src / "dracut-module").is_dir() else (
        src / "dracut" / MODULE)


def _initramfs_source(src: Path) -> Path:
    return src / "initramfs" if (src / "initramfs").is_dir() else src / "initramfs-tools"


@dataclass
class Installed:
    dracut: Path | None = None
    initramfs_tools: list[Path] = field(default_factory=list)
    unit: Path | None = None


UNIT = "seamless-restore.service"
#: Only root may read the store's pmem device.
UDEV_RULES = "60-seamless-pmem.rules"
#: Overwrites, hourly, the generations kept after a failed restore once their day is up.
EXPIRE_UNITS = ("seamless-expire.service", "seamless-expire.timer")


def install_unit(root: Path, src: Path) -> Path:
    """The real root's restore unit (where systemd in the initramfs rules out restoring
    there), enabled in sysinit.target; and the expiry's timer, in timers.target."""
    units = root / "etc/systemd/system"
    for name in (UNIT, *EXPIRE_UNITS):
        shutil.copyfile(src / "systemd" / name, units / name)
        (units / name).chmod(0o644)
    for target, name in (("sysinit.target", UNIT), ("timers.target", EXPIRE_UNITS[1])):
        wants = units / f"{target}.wants"
        wants.mkdir(exist_ok=True)
        link = wants / name
        if not link.is_symlink():
            link.symlink_to(Path("/etc/systemd/system") / name)
    return units / UNIT


def packaged(root: Path = Path("/")) -> Installed | None:
    """The hooks as the Debian package installed them (it owns them: nothing is copied),
    or None when seamless was not installed by the package."""
    if not (root / DPKG_LIST).is_file():
        return None
    done = Installed()
    module = root / "usr/lib/dracut/modules.d" / MODULE
    if module.is_dir():
        done.dracut = module
    done.initramfs_tools = [p for p in (root / "usr/share/initramfs-tools" / rel for rel in (
        "hooks/seamless", "scripts/init-top/seamless", "scripts/init-bottom/seamless"))
        if p.is_file()]
    unit = root / "usr/lib/systemd/system" / UNIT
    done.unit = unit if unit.is_file() else None
    return done


def install(
    root: Path = Path("/"), src: Path | None = None
) -> Installed:
    """Copy the hooks under ``root`` for each generator present there (the Debian
    package's own, when it installed seamless: see :func:`packaged`)."""
    done_by_package = packaged(root)
    if done_by_package is not None:
        return done_by_package
    src = src or source_dir()
    done = Installed()
    modules_d = root / "usr/lib/dracut/modules.d"
    if modules_d.is_dir():
        target = modules_d / MODULE
        target.mkdir(exist_ok=True)
        for f in _dracut_source(src).iterdir():
            shutil.copyfile(f, target / f.name)
            (target / f.name).chmod(0o755)
        shutil.copyfile(kernel_modules.LIST, target / kernel_modules.LIST.name)
        conf = root / "etc/dracut.conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_dracut_source(src).parent / DRACUT_CONF_NAME, conf / DRACUT_CONF_NAME)
        done.dracut = target
    if (root / "usr/share/initramfs-tools").is_dir():
        lib_dir = root / "usr/share/seamless"
        lib_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_dracut_source(src) / "seamless-lib.sh", lib_dir / "seamless-lib.sh")
        shutil.copyfile(kernel_modules.LIST, lib_dir / kernel_modules.LIST.name)
        for rel in ("hooks/seamless", "scripts/init-top/seamless",
                    "scripts/init-bottom/seamless"):
            target = root / "etc/initramfs-tools" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_initramfs_source(src) / rel, target)
            target.chmod(0o755)
            done.initramfs_tools.append(target)
    if (root / "etc/systemd/system").is_dir():
        done.unit = install_unit(root, src)
    if done.dracut is None and not done.initramfs_tools:
        raise SeamlessError(
            "neither dracut nor initramfs-tools is installed",
            hint="apt-get install dracut (or initramfs-tools)",
        )
    rules = root / "etc/udev/rules.d"
    rules.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "udev" / UDEV_RULES, rules / UDEV_RULES)
    (rules / UDEV_RULES).chmod(0o644)
    return done


def rebuild(release: str) -> Path:
    """Rebuild /boot/initrd.img-RELEASE with the restorer; returns its path."""
    initrd = Path(f"/boot/initrd.img-{release}")
    if not Path(f"/lib/modules/{release}").is_dir():
        raise SeamlessError(f"kernel {release} has no modules in /lib/modules/{release}",
                            hint="install its linux-image package first")
    if shutil.which("dracut") and Path("/usr/lib/dracut/modules.d", MODULE).is_dir():
        run(["dracut", "--force", "--add", "seamless", str(initrd), release], timeout=900)
    elif shutil.which("update-initramfs"):
        run(["update-initramfs", "-u", "-k", release], timeout=900)
    else:
        raise SeamlessError("the restorer is not installed", hint="run seamless install-restorer")
    if not os.access(initrd, os.R_OK):
        raise SeamlessError(f"rebuilding the initramfs left no {initrd}")
    return initrd
