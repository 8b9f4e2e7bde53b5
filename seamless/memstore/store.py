"""The store: a filesystem on the preserved region, holding generations of checkpoints.

Layout (everything root-only: directories 0700, files 0600)::

    header                  store.proto Header: magic, format, region geometry
    generations/gen-N       a sealed generation (its ``manifest`` last)
    generations/gen-N.partial   being written; never mistaken for a complete one

The filesystem is ext4 with 4 KiB blocks, mounted with DAX when the device
offers it, at /run/seamless/store.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seamless.errors import ExitCode, SeamlessError
from seamless.log import log
from seamless.memstore import handoff
from seamless.memstore.generation import PARTIAL, Generation, shred
from seamless.memstore.records import Header, RecordError
from seamless.memstore.region import Region, find_region
from seamless.mounts import mounts
from seamless.run import CommandError, run

MOUNTPOINT = Path("/run/seamless/store")
HEADER = "header"
GENERATIONS = "generations"
LABEL = "seamless-store"
FS_TYPE = "ext4"
#: Smaller than this holds no useful checkpoint (and ext4's own metadata takes some).
MIN_SIZE = 16 << 20
_GEN = re.compile(r"gen-(\d+)")

#: How long a generation whose restore failed is kept for a retry (``seamless restore
#: --generation N``) before it is overwritten: it holds the processes' memory.
KEEP_FAILED_SECONDS = 24 * 3600


def no_region_error() -> SeamlessError:
    return SeamlessError(
        "no preserved region: the kernel command line has no memmap=SIZE!START",
        hint="reserve one with `seamless setup --region SIZE` and reboot")


@dataclass
class Store:
    """A mounted store, by its directory."""

    root: Path

    @property
    def generations_dir(self) -> Path:
        return self.root / GENERATIONS

    def header(self) -> Header:
        try:
            return Header.from_bytes((self.root / HEADER).read_bytes())
        except FileNotFoundError as e:
            raise SeamlessError(f"{self.root} is not a seamless store (no header)",
                                hint="format it: seamless store format",
                                exit_code=ExitCode.CHECK_FAILED) from e

    def generations(self) -> list[tuple[int, Generation]]:
        """Sealed generations, oldest first."""
        found = []
        for p in self.generations_dir.iterdir() if self.generations_dir.is_dir() else []:
            m = _GEN.fullmatch(p.name)
            if m and (p / "manifest").is_file():
                found.append((int(m.group(1)), Generation(p)))
        return sorted(found, key=lambda t: t[0])

    def generation(self, number: int | None = None) -> tuple[int, Generation]:
        """Generation ``number``, or the newest one."""
        gens = self.generations()
        if not gens:
            raise SeamlessError(f"the store at {self.root} holds no generation",
                                hint="seamless checkpoint writes one")
        if number is None:
            return gens[-1]
        for n, g in gens:
            if n == number:
                return n, g
        raise SeamlessError(f"the store holds no generation {number}",
                            hint="seamless store status lists them: "
                            + ", ".join(str(n) for n, _ in gens))

    def partials(self) -> list[Path]:
        if not self.generations_dir.is_dir():
            return []
        return sorted(p for p in self.generations_dir.iterdir() if p.name.endswith(PARTIAL))

    def new_generation(self) -> tuple[int, Generation]:
        """The next generation to write (numbers never repeat within a store's life).
        A partial generation is overwritten and removed: the caller holds seamless's
        lock, so it is one a killed run left, never one being written."""
        numbers = [0]
        for p in self.generations_dir.iterdir():
            m = _GEN.fullmatch(p.name.removesuffix(PARTIAL))
            if m:
                numbers.append(int(m.group(1)))
        for partial in self.partials():
            log.warning("overwriting %s, left by a checkpoint that did not finish", partial)
            shred(partial)
        n = max(numbers) + 1
        return n, Generation(self.generations_dir / f"gen-{n}")

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fits(self, nbytes: int) -> bool:
        """Will ``nbytes`` more fit?"""
        return nbytes <= self.free()

    def report_path(self, number: int) -> Path:
        """Where the restore of generation ``number`` leaves its report in the store."""
        return self.root / f"report-{number}.json"

    def report(self, number: int) -> handoff.Report | None:
        """The report of the last restore of generation ``number``, if one ran."""
        try:
            return handoff.Report.from_json(json.loads(self.report_path(number).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def kept_until(self, number: int) -> float | None:
        """When generation ``number``, kept after a failed restore or after an upgrade
        that never came back, is to be overwritten (None: it is not one)."""
        report = self.report(number)
        until = report.kept_until if report else None
        if isinstance(until, (int, float)):
            return float(until)
        record = handoff.read(self.root)
        if record is not None and record.generation == number \
                and record.used_by_boot is None and record.source_boot_id != handoff.boot_id():
            # its upgrade entered the new kernel, and no boot restored it since
            return record.times.get("entering", 0.0) + KEEP_FAILED_SECONDS
        return None

    def expire(self, now: float | None = None) -> list[int]:
        """Overwrite and remove every generation kept after a failed restore whose time
        is up (see :data:`KEEP_FAILED_SECONDS`); its report says when. Returns their
        numbers."""
        now = time.time() if now is None else now
        done = []
        for n, g in self.generations():
            until = self.kept_until(n)
            if until is None or until > now:
                continue
            g.wipe()
            report = self.report(n) or handoff.Report(generation=n)
            report.expired, report.wiped = now, True
            self.report_path(n).write_text(json.dumps(report.to_json(), indent=2))
            log.info("generation %d was kept for a retry until %s: overwritten", n,
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(until)))
            done.append(n)
        return done

    def status(self) -> dict[str, Any]:
        st = os.statvfs(self.root)
        gens = []
        for n, g in self.generations():
            try:
                gens.append({"number": n, "path": str(g.final), **g.manifest().to_json(),
                             "kept_until": self.kept_until(n)})
            except SeamlessError as e:
                gens.append({"number": n, "path": str(g.final), "error": e.message})
        return {
            "mountpoint": str(self.root),
            "size": st.f_blocks * st.f_frsize,
            "used": (st.f_blocks - st.f_bfree) * st.f_frsize,
            "free": st.f_bavail * st.f_frsize,
            "generations": gens,
            "partial": [str(p) for p in self.partials()],
        }


# -- the device ---------------------------------------------------------------


def device_size(device: Path) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def mounted_at(device: Path) -> list[str]:
    real = os.path.realpath(device)
    return [m.target for m in mounts()
            if m.source.startswith("/") and os.path.realpath(m.source) == real]


def signature(device: Path) -> tuple[str | None, str | None]:
    """(filesystem type, label) that blkid finds on the device, or (None, None)."""
    result = run(["blkid", "-p", "-o", "export", device], check=False)
    if result.returncode == 2:
        return None, None  # nothing recognised
    if result.returncode != 0:
        raise SeamlessError(f"cannot read {device}: "
                            + result.stderr.decode(errors="replace").strip())
    fields = dict(line.split("=", 1) for line in result.stdout.decode().splitlines()
                  if "=" in line)
    return fields.get("TYPE") or fields.get("PTTYPE") or "unknown", fields.get("LABEL")


def dax_capable(device: Path) -> bool:
    flag = Path("/sys/block") / device.name / "queue" / "dax"
    try:
        return flag.read_text().strip() == "1"
    except OSError:
        return False


def _check_device(device: Path) -> None:
    try:
        mode = device.stat().st_mode
    except FileNotFoundError as e:
        raise SeamlessError(f"{device} does not exist",
                            hint="load the pmem drivers: modprobe -a nd_e820 nd_pmem") from e
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        raise SeamlessError(f"{device} is neither a block device nor a file")


def format_store(device: Path, region: Region, *, force: bool = False,
                 mountpoint: Path = MOUNTPOINT) -> Store:
    """Make a new, empty store on ``device`` and mount it."""
    _check_device(device)
    size = device_size(device)
    if size != region.size:
        raise SeamlessError(
            f"{device} holds {size} bytes but the region is {region.size} bytes",
            hint="the device is not the preserved region's")
    if size < MIN_SIZE:
        raise SeamlessError(f"the region is too small for a store ({size >> 20} MiB)",
                            hint=f"reserve at least {MIN_SIZE >> 20} MiB")
    where = mounted_at(device)
    if where and where != [str(mountpoint)]:
        raise SeamlessError(f"{device} is busy: mounted at {', '.join(where)}",
                            hint="unmount it first; nothing was written")
    fstype, label = signature(device) if not where else (FS_TYPE, LABEL)
    if fstype and label != LABEL and not force:
        raise SeamlessError(
            f"{device} holds data that is not a seamless store ({fstype}"
            + (f", label {label!r})" if label else ")"),
            hint="--force overwrites it; nothing was written")
    if where:
        unmount(mountpoint)
    own_device(device)
    _mkfs(device)
    return _mount_new(device, region, mountpoint, size)


def _mkfs(device: Path) -> None:
    run(["mkfs.ext4", "-F", "-q", "-b", "4096", "-m", "0", "-L", LABEL,
         "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", device])


def _mount_new(device: Path, region: Region, mountpoint: Path, size: int) -> Store:
    dax = mount(device, mountpoint)
    root = Store(mountpoint)
    header = Header(region_start=region.start, region_size=region.size, device_size=size,
                    uuid=str(uuid.uuid4()), created=time.time(), dax=dax)
    _write_private(mountpoint / HEADER, header.to_bytes())
    (mountpoint / GENERATIONS).mkdir(mode=0o700, exist_ok=True)
    os.chmod(mountpoint, 0o700)
    return root


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def mount(device: Path, mountpoint: Path = MOUNTPOINT) -> bool:
    """Mount the store's filesystem, with DAX when the device offers it; True with DAX."""
    mountpoint.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(mountpoint.parent, 0o700)
    mountpoint.mkdir(mode=0o700, exist_ok=True)
    options = "nodev,nosuid,noexec"
    loop = [] if stat.S_ISBLK(device.stat().st_mode) else ["-o", "loop"]
    if dax_capable(device):
        try:
            run(["mount", "-t", FS_TYPE, "-o", options + ",dax=always", *loop, device,
                 mountpoint])
            return True
        except CommandError as e:
            log.info("DAX refused for %s (%s); mounting through the page cache", device, e)
    run(["mount", "-t", FS_TYPE, "-o", options, *loop, device, mountpoint])
    return False


def unmount(mountpoint: Path = MOUNTPOINT) -> None:
    run(["umount", mountpoint])


def is_dax(mountpoint: Path) -> bool:
    for m in mounts():
        if m.target == str(mountpoint):
            return "dax" in m.options or "dax=always" in m.options
    return False


def own_device(device: Path) -> None:
    """Let only root read the store's block device: it holds every checkpointed
    process's memory, and udev gives the disk group read access to every disk (the
    udev rule seamless installs keeps it so at every boot and event)."""
    st = os.stat(device)
    if stat.S_ISBLK(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (
            0, 0, 0o600):
        os.chown(device, 0, 0)
        os.chmod(device, 0o600)
        log.info("only root may read %s now (it was %o, group %d)", device,
                 stat.S_IMODE(st.st_mode), st.st_gid)


def open_store(region: Region | None = None, mountpoint: Path = MOUNTPOINT) -> Store:
    """The running system's store, mounted (mounting it when needed) and checked against
    the region's geometry."""
    if region is None:
        region = find_region()
    if region is None:
        raise no_region_error()
    if region.device is None:
        raise SeamlessError(
            f"the region ({region.memmap}) has no pmem device"
            + ("" if region.reserved_now else ": the running kernel does not reserve it yet"),
            hint="reboot with the argument on the command line" if not region.reserved_now
            else "load the drivers: modprobe -a nd_e820 nd_pmem")
    where = mounted_at(region.device)
    if str(mountpoint) not in where:
        if where:
            raise SeamlessError(f"{region.device} is busy: mounted at {', '.join(where)}",
                                hint="unmount it first")
        fstype, label = signature(region.device)
        if label != LABEL:
            raise SeamlessError(
                f"{region.device} is not a seamless store"
                + (f" (it holds {fstype})" if fstype else ""),
                hint="format it: seamless store format")
        mount(region.device, mountpoint)
    own_device(region.device)
    store = Store(mountpoint)
    try:
        header = store.header()
    except RecordError as e:
        raise SeamlessError(f"the store's header is damaged: {e.message}",
                            hint="format the store again (its contents are lost)",
                            exit_code=ExitCode.CHECK_FAILED) from e
    check_geometry(header, region, device_size(region.device))
    return store


def check_geometry(header: Header, region: Region, size: int) -> None:
    if (header.region_start, header.region_size, header.device_size) != (
        region.start, region.size, size
    ):
        raise SeamlessError(
            f"the store was formatted for a region of {header.region_size} bytes at "
            f"{header.region_start:#x} ({header.device_size} bytes of device), but this "
            f"region is {region.size} bytes at {region.start:#x} ({size} bytes)",
            hint="the region moved or changed size: its contents cannot be trusted; "
            "format the store again", exit_code=ExitCode.CHECK_FAILED)


def wipe(store: Store, device: Path, region: Region) -> Store:
    """Overwrite every byte of the region with zeros, and leave an empty store."""
    mountpoint = store.root
    unmount(mountpoint)
    size = device_size(device)
    zeros = bytes(4 << 20)
    fd = os.open(device, os.O_WRONLY)
    try:
        written = 0
        while written < size:
            written += os.write(fd, zeros[: min(len(zeros), size - written)])
        os.fsync(fd)
    finally:
        os.close(fd)
    _mkfs(device)
    return _mount_new(device, region, mountpoint, size)

