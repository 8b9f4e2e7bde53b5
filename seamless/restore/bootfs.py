"""What the new boot does to the files the restored processes hold, and how the restore
keeps them: the tmpfs systemd mounts on its own, and tmpfiles.d's cleaning of /tmp.

Restored before init (initramfs-tools), the trees run before systemd has mounted
anything: their files in /tmp, /run/lock and /dev/shm would land in directories that
systemd then mounts a fresh tmpfs over, and the boot's tmpfiles would empty /tmp and the
services' private /tmp under them. Restored after switch-root (dracut), those mounts
exist already, and only the aging of the private /tmp of an earlier boot is left.

Debian 12 and 13 differ here: 13 mounts a tmpfs on /tmp and /run/lock (systemd's
tmp.mount and run-lock.mount, enabled by its package), 12 keeps /tmp on disk and empties
it at boot (``D /tmp`` in tmpfiles.d). Both are read off the real root, never assumed
from a version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from seamless.log import log
from seamless.mounts import mounts
from seamless.restore.adopt import UNIT_DIRS
from seamless.run import run


@dataclass(frozen=True)
class Tmpfs:
    """A tmpfs the boot's systemd mounts before any service runs."""

    target: str
    options: str
    unit: str  # the mount unit, or "" for what PID 1 mounts itself


#: PID 1 mounts /dev/shm itself when it is not a mount yet (systemd's mount_setup).
DEV_SHM = Tmpfs("/dev/shm", "mode=1777,nosuid,nodev", "")
#: Mount units that distributions enable to put a tmpfs on a directory of the root.
TMPFS_UNITS = ("tmp.mount", "run-lock.mount")


def _mount_unit(root: Path, unit: str) -> dict[str, str] | None:
    """The [Mount] section of ``unit`` when the boot will start it: found, neither masked
    nor replaced by an fstab line (the fstab generator's own unit wins), and wanted by
    local-fs.target."""
    found = next((root / d / unit for d in UNIT_DIRS if (root / d / unit).exists()
                  or (root / d / unit).is_symlink()), None)
    if found is None or (found.is_symlink() and os.readlink(found) == "/dev/null"):
        return None
    if not any((root / d / f"local-fs.target.{kind}" / unit).exists()
               for d in UNIT_DIRS for kind in ("wants", "requires")):
        return None
    fields: dict[str, str] = {}
    section = ""
    for line in found.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Mount]" and "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip()
    if fields.get("Type") != "tmpfs" or "Where" not in fields:
        return None
    if fields["Where"] in _fstab_targets(root):
        return None
    return fields


def _fstab_targets(root: Path) -> set[str]:
    try:
        text = (root / "etc/fstab").read_text()
    except OSError:
        return set()
    return {line.split()[1] for line in text.splitlines()
            if len(line.split()) > 1 and not line.lstrip().startswith("#")}


def boot_tmpfs(root: Path = Path("/")) -> list[Tmpfs]:
    """The tmpfs the boot's systemd will mount on the real root at ``root``."""
    found = [DEV_SHM]
    for unit in TMPFS_UNITS:
        fields = _mount_unit(root, unit)
        if fields is not None:
            options = fields.get("Options", "mode=1777").replace("%%", "%")  # unit escaping
            found.append(Tmpfs(fields["Where"], options, unit))
    return found


def is_mount(path: Path) -> bool:
    """Whether something is mounted at ``path`` (a bind mount too)."""
    return any(m.target == str(path) for m in mounts())


def mount_boot_tmpfs(root: Path = Path("/")) -> list[str]:
    """Before trees are restored ahead of init: mount now what systemd would mount over
    them later (systemd takes a mount that is there already as its own). Returns the
    mount points mounted."""
    mounted = []
    for fs in boot_tmpfs(root):
        target = root / fs.target.lstrip("/")
        if not target.is_dir() or is_mount(target):
            continue
        if any(target.iterdir()):
            # what the initramfs or the disk has there stays visible: a tmpfs over it
            # would hide it from the restored processes as systemd's would
            log.info("%s is not empty: the boot's tmpfs is mounted over it", fs.target)
        done = run(["mount", "-n", "-t", "tmpfs", "-o", fs.options, "tmpfs", target],
                   check=False)
        if done.returncode == 0:
            mounted.append(fs.target)
        else:
            log.warning("could not mount a tmpfs on %s as %s would: %s", fs.target,
                        fs.unit or "systemd", done.stderr.decode(errors="replace").strip())
    return mounted


#: What of the boot's tmpfiles.d removes what the restored processes hold in /tmp and
#: /var/tmp: Debian 12's "D /tmp" (emptied at every boot) and systemd's "R!" of every
#: service's private /tmp (``PrivateTmp=``), each line as the restore keeps it.
TMPFILES_KEEP = {
    "tmp.conf": (("D /tmp ", "d /tmp "),),
    "systemd-tmp.conf": (("R! /tmp/systemd-private-", None),
                         ("R! /var/tmp/systemd-private-", None)),
}
#: Written for this boot only: what the restored trees hold in /tmp and /var/tmp, which
#: tmpfiles then neither removes nor ages (``x``; systemd 256 and later also keep an
#: ``x`` path from ``D`` and ``R``: the lines above are for Debian 12's 252).
KEEP_FILE = "seamless-keep.conf"


def keep_tmp(root: Path = Path("/"), *, before_init: bool) -> list[Path]:
    """Keep /tmp as the restored processes have it, for this boot (/run/tmpfiles.d).

    Before init: the distribution's lines that would empty /tmp and the services'
    private /tmp are overridden (a file of /run/tmpfiles.d replaces the one of the same
    name), and every entry of /tmp is excluded. Either way, the private /tmp and /var/tmp
    of the services restored (named after the boot they started in, not this one) are
    excluded from the aging of later cleanups. An operator's own file in /etc/tmpfiles.d
    wins, as always. Returns the files written."""
    written = []
    if before_init:
        written += _override_distribution(root)
    keep: list[str] = []
    for d in ("tmp", "var/tmp"):
        try:
            entries = sorted((root / d).iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("systemd-private-") or (before_init and d == "tmp"):
                keep.append(f"x /{d}/{entry.name}")
    if keep:
        target = root / "run/tmpfiles.d" / KEEP_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("# seamless: what the restored processes hold, kept this boot\n"
                          + "\n".join(keep) + "\n")
        written.append(target)
    return written


def _override_distribution(root: Path) -> list[Path]:
    written = []
    for name, changes in TMPFILES_KEEP.items():
        if (root / "etc/tmpfiles.d" / name).exists():
            continue
        source = next((d / name for d in (root / "usr/lib/tmpfiles.d", root / "lib/tmpfiles.d")
                       if (d / name).is_file()), None)
        if source is None:
            continue
        lines: list[str] = []
        changed = False
        for line in source.read_text().splitlines():
            kept: str | None = line
            for prefix, replacement in changes:
                if line.startswith(prefix):
                    kept = None if replacement is None else replacement + line[len(prefix):]
                    changed = True
                    break
            if kept is not None:
                lines.append(kept)
        if changed:
            target = root / "run/tmpfiles.d" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("# seamless: this boot keeps /tmp as the restored processes "
                              "have it\n" + "\n".join(lines) + "\n")
            written.append(target)
    return written
