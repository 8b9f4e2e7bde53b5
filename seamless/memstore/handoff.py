"""What the old kernel hands the new one about the generation to restore, and the proof
that the new boot is the one the upgrade started.

A generation in the store outlives the boot that wrote it. Without a proof, a kernel
loaded by a coordinator that was then killed, a later ``systemctl kexec`` of that kernel,
or ``seamless.restore=N`` left on a boot loader's command line would restore an old
generation over a system that ran on since: every process twice, or back in time.

So each upgrade mints a one-time token. The new kernel's command line carries it
(``seamless.token=``); the store carries only its SHA-256, in the upgrade record, with the
generation, the machine and the boot the generation was written in. The record is written
just before the kexec (a coordinator that dies earlier leaves none, and a rollback removes
it). The restorer restores only a generation whose record matches the token on its
command line and is not yet used, and marks it used before the first tree comes back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: The upgrade record, in the store's root.
RECORD = "upgrade.json"
#: Beside each tree's images: what the restore needs to know about the tree.
TREE_INFO = "seamless-tree.json"
#: journald's socket that services' stdout and stderr stream into: the checkpoint leaves
#: such a stream out (CRIU's external), the restore hands the tree a new one.
JOURNALD_STDOUT = "/run/systemd/journal/stdout"
#: The new kernel's argument that carries the token.
TOKEN_ARG = "seamless.token="
MACHINE_ID = Path("/etc/machine-id")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def new_token() -> str:
    return secrets.token_hex(16)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def boot_id(path: Path = BOOT_ID) -> str:
    return path.read_text().strip()


def machine_id(path: Path = MACHINE_ID) -> str:
    """The machine's id (empty when it has none, as in an initramfs without it)."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def token_from_cmdline(text: str) -> str | None:
    for arg in text.split():
        if arg.startswith(TOKEN_ARG):
            return arg.removeprefix(TOKEN_ARG)
    return None


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The items of a record that are fields of ``cls``: a record written by another
    version of seamless reads, its keys unknown here left out."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class WayBack:
    """The boot that wrote the generation, for the new kernel to go back to with every
    tree when it cannot run them all (see :mod:`seamless.restore.wayback`): its kernel
    and initramfs (paths in the real root) and command line without the restore's
    arguments (the way back adds its own)."""

    release: str
    kernel: str
    initrd: str
    cmdline: str


@dataclass
class UpgradeRecord:
    """The upgrade record (``upgrade.json``), version 1."""

    generation: int
    token_sha256: str
    #: The boot the generation was written in (its manifest says the same).
    source_boot_id: str
    machine_id: str = ""
    source_release: str = ""
    target_release: str = ""
    lazy_pages: bool = False
    #: When each phase of the upgrade began (wall clock), for the report.
    times: dict[str, float] = field(default_factory=dict)
    #: The services left out of the checkpoint and stopped before the kexec: the new
    #: boot starts them again.
    stopped_units: list[str] = field(default_factory=list)
    #: What ``seamless upgrade --json`` printed before the kexec (kernels, command line,
    #: each tree and its dump time): the new boot's ``seamless status --json`` reports it,
    #: since the command itself never returns.
    result: dict[str, Any] = field(default_factory=dict)
    #: The new command line's seamless.last_pid= (the way back keeps the same PIDs free).
    last_pid: int = 0
    #: Where the new kernel goes back to when it refuses the trees; None: nowhere (the
    #: trees it can restore run there, the others are kept for a retry by hand).
    way_back: WayBack | None = None
    #: Commands the new kernel must pass (run in its real root, exit 0) before any tree
    #: runs there (``seamless upgrade --require``).
    requires: list[str] = field(default_factory=list)
    #: Set by the new kernel that refused the trees and went back: its release, why, and
    #: when. A record with it is restored whole, never sent back again.
    refused: dict[str, Any] | None = None
    #: The boot that restored it: a record is used once.
    used_by_boot: str | None = None
    #: Why trees cannot be restored before init, as the upgrade's plan found: the
    #: command line then tells the initramfs to leave them all to
    #: seamless-restore.service (see :func:`after_init_reason`).
    after_init: list[str] = field(default_factory=list)
    version: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpgradeRecord:
        known = _known(cls, data)
        if isinstance(known.get("way_back"), dict):
            known["way_back"] = WayBack(**{k: str(v) for k, v in
                                           _known(WayBack, known["way_back"]).items()})
        return cls(**known)


#: A socket, address, file or connection as :mod:`seamless.collect.resources` and
#: :mod:`seamless.runtime` read it and the restore makes it again.
Entry = dict[str, Any]


def after_init_reason(name: str, *, mount_namespace: bool, unmounted: Sequence[str] = (),
                      missing: Sequence[str] = ()) -> str | None:
    """Why a tree cannot be restored before init, or None: a mount namespace of its own
    (CRIU makes it again only from the real root), files on a filesystem the boot mounts
    only after init (``unmounted``), or a socket connected to a path the running system
    binds only after init (``missing``)."""
    if mount_namespace:
        return f"{name}: a mount namespace of its own"
    if unmounted:
        return f"{name}: its files on {unmounted[0]}, mounted after init"
    if missing:
        return f"{name}: connected to {missing[0]}, made after init"
    return None


@dataclass
class TreeInfo:
    """What the restore needs to know of a tree besides its CRIU images
    (``seamless-tree.json``, beside them), version 1. The checkpoint writes it
    (:func:`seamless.collect.checkpoint.tree_info`), the new kernel's restore reads it."""

    #: The tree's root PID: the name of its directory, the PID it comes back with.
    root: int
    #: The restore goes in the same order as the dump.
    order: int = 0
    pids: list[int] = field(default_factory=list)
    unit: str | None = None
    cgroup: str = ""
    command: str = ""
    user: str = ""
    #: CRIU's external resources (``unix[INODE]``, ``file[...]``) that the restore hands
    #: the tree instead: a new journal stream, another tree's end, a reopened file.
    external: list[str] = field(default_factory=list)
    #: What the restore opens for each external file (see collect/resources.py).
    foreign_files: dict[str, Entry] = field(default_factory=dict)
    #: Restored with its mount namespace, from the new boot's mounts.
    mount_namespace: bool = False
    #: Unix stream connections to other trees, connected again by the restore.
    streams: list[Entry] = field(default_factory=list)
    #: Its external unix sockets (inodes) that were open non-blocking: the restore's
    #: new socket for each is made non-blocking too.
    nonblocking: list[int] = field(default_factory=list)
    #: The directories of its bound unix sockets, made again when the boot has none.
    socket_dirs: list[Entry] = field(default_factory=list)
    #: Sockets of the running system it is connected to, which CRIU connects by path.
    peer_paths: list[str] = field(default_factory=list)
    #: The mount points, other than the root's, of the disk filesystems holding its
    #: files (working directory, executables, files open or mapped): a restore before
    #: init, when the boot has mounted only the root, leaves the tree to the unit.
    mounts: list[str] = field(default_factory=list)
    #: Its named pipes on tmpfs, made again.
    fifos: list[Entry] = field(default_factory=list)
    #: Its unit's runtime files, PID files, tmpfs files it holds (see seamless/runtime.py).
    runtime_files: list[Entry] = field(default_factory=list)
    #: Addresses its sockets are bound to, brought up before it runs.
    addresses: list[Entry] = field(default_factory=list)
    #: Its established TCP connections, locked until it runs; and those over loopback.
    connections: list[Entry] = field(default_factory=list)
    loopback: list[Entry] = field(default_factory=list)
    version: int = 1

    @property
    def name(self) -> str:
        """Its unit, or its command when it has none (for messages)."""
        return self.unit or self.command or "?"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TreeInfo:
        """Read a record, one an earlier seamless wrote too (without ``version``): keys
        it does not know are left out. ValueError when it is not a tree's record."""
        if not isinstance(data, dict) or "root" not in data:
            raise ValueError("not a tree's record: no root")
        known = _known(cls, data)
        info = cls(**known)
        info.root = int(info.root)
        info.order = int(data.get("order", info.root))
        info.pids = [int(p) for p in info.pids]
        info.nonblocking = [int(i) for i in info.nonblocking]
        info.unit = None if info.unit is None else str(info.unit)
        info.mount_namespace = bool(info.mount_namespace)
        return info


def write_tree_info(images_dir: Path, info: TreeInfo) -> Path:
    path = images_dir / TREE_INFO
    path.write_text(json.dumps(info.to_json(), indent=2))
    return path


def read_tree_info(images_dir: Path) -> TreeInfo:
    """The record beside a tree's images; OSError or ValueError when it does not read."""
    return TreeInfo.from_json(json.loads((images_dir / TREE_INFO).read_text()))


@dataclass
class Report:
    """What the restore of a generation says (``last-upgrade.json`` in /run and
    /var/lib/seamless, ``report-N.json`` in the store): written by the new boot's
    restore, completed by the lazy restore's finisher and the expiry, read by ``seamless
    status``, the metrics and a retry. A field that is None is not written."""

    generation: int | None
    #: The release the trees were restored in.
    to: str = ""
    #: Every tree restored.
    ok: bool = False
    boot_id: str = ""
    #: When each phase began or ended (wall clock): the upgrade's, then the restore's.
    times: dict[str, float] = field(default_factory=dict)
    #: The release the generation was written in ("from" in the JSON).
    source: str | None = None
    #: Where the restore ran: "initramfs" (before init) or "systemd" (the unit).
    stage: str | None = None
    #: The boot the generation was written in, and what its upgrade printed.
    boot_id_before: str | None = None
    upgrade: dict[str, Any] | None = None
    #: The kernel that refused the trees and went back (see UpgradeRecord.refused).
    refused: dict[str, Any] | None = None
    #: Why the restore before init left the trees to seamless-restore.service.
    deferred: str | None = None
    #: The drop-ins that keep networkd from removing, as it starts, the leased addresses
    #: the restore put back (this boot only).
    networkd_keeps: list[str] | None = None
    no_way_back: str | None = None
    #: The files of the generation that did not verify.
    corrupt: list[str] | None = None
    #: What the restore before init mounted for systemd (see restore/bootfs.py).
    mounted: list[str] | None = None
    #: Each tree's result (restore.restorer.TreeRestore, as JSON).
    trees: list[dict[str, Any]] | None = None
    adopted: list[str] | None = None
    #: The services the upgrade left out and stopped, started again.
    started_again: list[str] | None = None
    #: A lazy restore's memory: "arriving", "back" or "incomplete".
    memory: str | None = None
    #: Written while the trees run and the restore still hands them over.
    finishing: bool | None = None
    wiped: bool | None = None
    error: str | None = None
    #: Until when the generation is kept for a retry, and when it was overwritten.
    kept_until: float | None = None
    expired: float | None = None

    #: Always written, even when None.
    ALWAYS = ("generation", "to", "ok", "boot_id", "times")

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None or k in self.ALWAYS}
        if "source" in data:
            data["from"] = data.pop("source")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """ValueError when ``data`` is not a report."""
        if not isinstance(data, dict):
            raise ValueError("not a report")
        data = {("source" if k == "from" else k): v for k, v in data.items()}
        known = _known(cls, data)
        report = cls(**{"generation": None, **known})
        if not isinstance(report.times, dict):
            raise ValueError("not a report: its times are not a mapping")
        return report

    @property
    def restored_trees(self) -> list[dict[str, Any]]:
        return self.trees or []


def write(store_root: Path, record: UpgradeRecord) -> Path:
    """Write the record whole (a new file renamed over the old one, synced)."""
    path = store_root / RECORD
    tmp = path.with_name(RECORD + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record.to_json(), f)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    dir_fd = os.open(store_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read(store_root: Path) -> UpgradeRecord | None:
    """The record, or None when there is none or it does not read."""
    try:
        data = json.loads((store_root / RECORD).read_text())
        return UpgradeRecord.from_json(data) if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def remove(store_root: Path) -> None:
    (store_root / RECORD).unlink(missing_ok=True)


def refusal(record: UpgradeRecord | None, generation: int, token: str | None,
            source_boot_id: str, this_boot: str, this_machine: str = "") -> str | None:
    """Why this boot must not restore ``generation`` (written in boot ``source_boot_id``,
    its manifest says), or None when the record proves that it was started for it."""
    if token is None:
        return ("this boot was not started by seamless upgrade (no seamless.token= on its "
                "command line): a generation is restored only by the boot its upgrade made")
    if record is None or record.generation != generation:
        return (f"no upgrade record for generation {generation}: its upgrade did not reach "
                "the kexec")
    if not hmac.compare_digest(record.token_sha256, digest(token)):
        return (f"the token on the command line is not generation {generation}'s: this "
                "kernel was loaded by another upgrade, or by hand")
    if record.used_by_boot is not None:
        return f"generation {generation} was restored already, by boot {record.used_by_boot}"
    if record.source_boot_id != source_boot_id:
        return (f"the upgrade record and generation {generation} come from different boots "
                f"({record.source_boot_id} and {source_boot_id})")
    if record.source_boot_id == this_boot:
        return "this is the boot that wrote the generation: nothing to restore"
    if record.machine_id and this_machine and record.machine_id != this_machine:
        return f"generation {generation} was written on another machine ({record.machine_id})"
    return None
