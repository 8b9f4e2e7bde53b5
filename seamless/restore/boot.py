"""The restore at boot: run from the initramfs, chrooted into the real root.

Mounts the store, verifies the generation (a tree whose images are corrupt is
not restored; the others are), restores the trees in their dump order, hands
restored services to systemd, writes the report where ``seamless status``
finds it, and (on success, unless asked to keep it) overwrites the generation:
it holds process memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import seamless
from seamless import faults, lock, procfs
from seamless.criu import Criu
from seamless.criu.modules import load_criu_modules
from seamless.errors import ExitCode, SeamlessError
from seamless.log import complete_step, count, log
from seamless.memstore import handoff
from seamless.memstore.generation import Generation, is_page_image
from seamless.memstore.records import TreeRecord
from seamless.memstore.store import KEEP_FAILED_SECONDS, Store, open_store, unmount
from seamless.restore import adopt, bootfs, lazy, metrics, wayback
from seamless.restore.lazy import Pager
from seamless.restore.restorer import (
    RESTORE_TIMEOUT,
    Hold,
    Restorer,
    RestoreReport,
    keep_leases_through_networkd,
    restore_all,
    trees_in,
)
from seamless.run import run

#: Written by the restorer (in the initramfs /run, which becomes the real root's /run)...
REPORT_RUN = Path("/run/seamless/last-upgrade.json")
#: ...and kept across boots when the real root is writable.
REPORT_VAR = Path("/var/lib/seamless/last-upgrade.json")
#: Names the file that the initramfs-tools boot script makes once /run is in the real
#: root for good (see :func:`finish_lazy`).
HANDED_OVER_ENV = "SEAMLESS_HANDED_OVER"
#: Written by a restore before init that leaves the trees to seamless-restore.service
#: (it says why): the unit runs when it is there, although the report is not.
DEFERRED = Path("/run/seamless/deferred")
#: What the initramfs writes there when the command line says the upgrade found trees
#: that cannot be restored before init (``seamless.after_init``, see seamless-lib.sh):
#: it then starts no restorer of its own.
PLANNED = "after switch-root, as the upgrade planned"
#: How long the restore of a generation's trees may take at boot: no tree is begun
#: after it (each is reported), and the boot goes on. Below seamless-restore.service's
#: TimeoutStartSec (15 min), with room for the store, the checks and the report.
RESTORE_BUDGET = 600.0


def corrupt_trees(bad_files: list[str]) -> dict[str, str]:
    """Which trees (directory names) have which corrupt files."""
    trees: dict[str, list[str]] = {}
    for path in bad_files:
        trees.setdefault(path.split("/", 1)[0], []).append(path)
    return {tree: "corrupt images: " + ", ".join(files) for tree, files in trees.items()}


class PageCheck:
    """A generation's page images verified in the background while its trees are
    restored, a tree at a time in restore order: nearly all of a generation's bytes, so
    the blackout no longer waits for all of them before the first restore. CRIU reads
    them only into processes that do not run yet, and :func:`restore_all` asks this
    gate before each tree runs: a tree with a corrupt page image is killed unrun. The
    rest of the images (what CRIU acts on) is verified before the restore begins."""

    def __init__(self, gen: Generation, trees: list[str]) -> None:
        files: dict[str, set[str]] = {t: set() for t in trees}
        size = dict.fromkeys(trees, 0)
        self._manifest = gen.manifest()  # read once: a tree's check reads its own files
        for entry in self._manifest.files:
            tree = entry.path.split("/", 1)[0]
            if tree in files and is_page_image(entry.path):
                files[tree].add(entry.path)
                size[tree] += entry.size
        self._files = files
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seamless-verify")
        self._checks = {t: self._pool.submit(self._verify, gen, t, size[t])
                        for t in trees if files[t]}

    def _verify(self, gen: Generation, tree: str, size: int) -> list[str]:
        start = time.monotonic()
        bad = gen.verify(is_page_image, manifest=self._manifest, within=tree)
        log.info("verified the page images of tree %s (%d MiB) in %.2f s", tree, size >> 20,
                 time.monotonic() - start)
        return bad

    def _bad(self, tree: str) -> list[str]:
        check = self._checks.get(tree)
        if check is None:
            return []
        try:
            return check.result()
        except Exception as e:  # a tree whose pages cannot be checked must not run
            log.warning("could not verify the page images of tree %s: %s", tree, e)
            return sorted(self._files[tree])

    def __call__(self, tree: str) -> str | None:
        """Why ``tree`` must not run (its corrupt page images), once they are checked."""
        return corrupt_trees(self._bad(tree)).get(tree)

    def bad(self) -> list[str]:
        """Every corrupt page image, once all are checked."""
        return sorted(path for tree in self._checks for path in self._bad(tree))

    def stop(self) -> None:
        """Drop the checks not begun, and wait for the one running."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def write_report(report: handoff.Report, store: Store | None, in_run: bool = True) -> None:
    """Write the report into /run (unless ``in_run`` is false), /var/lib and the store."""
    text = json.dumps(report.to_json(), indent=2)
    targets = [REPORT_RUN, REPORT_VAR] if in_run else [REPORT_VAR]
    if store is not None and report.generation is not None:
        targets.append(store.report_path(report.generation))
    for path in targets:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as e:  # a read-only real root: /run still has it
            log.warning("could not write the report to %s: %s", path, e)
    try:
        metrics.write(report, blackout, store.free() if store is not None else None)
    except OSError as e:
        log.warning("could not write the metrics for node-exporter: %s", e)


def blackout(report: handoff.Report) -> float | None:
    """From the freeze to every tree running again, when the report has both."""
    return dict(phases(report)).get("total blackout (freeze to restored)")


def boot_times(now: float, proc: Path = Path("/proc")) -> dict[str, float]:
    """When, on the wall clock, this kernel started and this restorer was started
    (from the uptime and this process's start time): to tell the old kernel's way
    out, the new kernel's boot and the restorer's own start apart. The new kernel's
    clock comes from the RTC at this point of the boot: to about a second."""
    try:
        uptime = float((proc / "uptime").read_text().split()[0])
        started_ticks = int(procfs.stat_field("self", procfs.STARTTIME, proc) or "")
    except (OSError, ValueError):
        return {}
    kernel = now - uptime
    return {"kernel_started": kernel,
            "restorer_exec": kernel + started_ticks / os.sysconf("SC_CLK_TCK")}


def still_running(previous: handoff.Report | None, number: int,
                  alive: Callable[[int], bool] | None = None) -> dict[int, int]:
    """The trees of generation ``number`` an earlier restore brought back and that still
    run (tree root -> PID): a retry must not restore them a second time."""
    if not previous or previous.generation != number:
        return {}
    if alive is None:
        import psutil  # only here: its import is a tenth of the restorer's start

        alive = psutil.pid_exists
    return {int(t["root"]): int(t["pid"]) for t in previous.restored_trees
            if t.get("restored") and t.get("pid") and alive(int(t["pid"]))}


def trees_after_init(gen: Generation, root: Path = Path("/")) -> list[str]:
    """The generation's trees that cannot be restored before init, each with why: a
    mount namespace of its own (a sandboxed service), or a socket connected to one the
    running system binds and the boot makes only after init (syslog's
    /run/systemd/journal/dev-log, which an sshd session holds), or files on a
    filesystem the boot mounts only after init (/home, /var or /srv of its own in
    fstab: before init only the root is mounted)."""
    found = []
    for _, info in trees_in(gen.final, gen.manifest().trees):
        why = handoff.after_init_reason(
            info.name, mount_namespace=info.mount_namespace,
            unmounted=[m for m in info.mounts if not bootfs.is_mount(root / m.lstrip("/"))],
            missing=[p for p in info.peer_paths if not (root / p.lstrip("/")).exists()])
        if why is not None:
            found.append(why)
    return found


def deferred_text(reasons: list[str]) -> str:
    """The report's word on trees left to seamless-restore.service, and why."""
    return (f"{count(len(reasons), 'tree')} not restorable before init "
            f"({'; '.join(reasons[:3])}): restored after switch-root")


def restore_stage(root: Path = Path("/")) -> str:
    """Where a boot-time restore runs: under systemd (seamless-restore.service) or in
    an initramfs without it (initramfs-tools), before init."""
    return "systemd" if (root / "run/systemd/system").is_dir() else "initramfs"


def boot_restore(number: int | None, *, keep: bool = False,
                 criu: Restorer | None = None, root: Path = Path("/"),
                 previous: handoff.Report | None = None,
                 lazy: bool | None = None, at_boot: bool = False) -> handoff.Report:
    """Restore a generation of the store (at boot, or by hand to retry); returns the report
    (also written). ``previous``: the report of an earlier restore of the generation,
    whose trees that still run are left alone and kept in the new report. ``lazy``: the
    trees run before their memory is back (default: as the upgrade asked); a process
    left behind then waits for the memory, wipes the generation and completes the report.
    ``at_boot``: the boot-time restore, which restores only the generation whose upgrade
    record the one-time token on this boot's command line matches (see
    :mod:`seamless.memstore.handoff`), and marks the record used; a restore by hand is
    the operator's own choice.
    """
    return BootRestore(number, keep=keep, criu=criu, root=root, previous=previous,
                       lazy=lazy, at_boot=at_boot).run()


class BootRestore:
    """One restore of a generation (see :func:`boot_restore`), as named steps over its
    state: each step reads and fills ``report``, which is written whatever happens."""

    def __init__(self, number: int | None, *, keep: bool, criu: Restorer | None, root: Path,
                 previous: handoff.Report | None, lazy: bool | None, at_boot: bool) -> None:
        self.number, self.keep, self.criu, self.root = number, keep, criu, root
        self.previous, self.lazy, self.at_boot = previous, lazy, at_boot
        self.started = time.time()
        self.report = handoff.Report(
            generation=number, to=os.uname().release, ok=False, boot_id=handoff.boot_id(),
            times={**boot_times(self.started), "python_started": seamless.STARTED,
                   "restorer_started": self.started})
        self.store: Store | None = None
        self.gen: Generation | None = None
        self.n = -1  # the generation's number, once the store has it
        self.trees: list[TreeRecord] = []  # its manifest's
        self.source_boot_id = ""
        #: The upgrade record in the store (any generation's), and the earlier report
        #: when this is a retry of the same generation.
        self.record: handoff.UpgradeRecord | None = None
        self.retry: handoff.Report | None = None
        #: Trees an earlier attempt restored that still run (root -> PID).
        self.running: dict[int, int] = {}
        #: The record to go back with, when this boot can refuse all the trees.
        self.back: handoff.UpgradeRecord | None = None
        self.restored = RestoreReport()
        self.pagers: dict[int, Pager] = {}

    @property
    def upgrade(self) -> handoff.UpgradeRecord | None:
        """The upgrade record, when it is this generation's."""
        return self.record if self.record is not None and self.record.generation == self.n \
            else None

    def run(self) -> handoff.Report:
        try:
            self.open_generation()
            if self.retry is None:
                self.check_record()
                if self.defer_after_init():
                    return self.report
                self.claim()
            self.restore_trees()
            self.finish()
        except SeamlessError as e:
            self.report.error = e.format_message()
            if self.restored.trees and self.report.trees is None:
                # which trees came back before it ended: a retry leaves them alone
                self.report.trees = self.restored.to_json()["trees"]
            raise
        finally:
            self.close()
        return self.report

    def open_generation(self) -> None:
        """Open the store and the generation; a retry takes over the earlier report's
        phases and leaves alone the trees it restored that still run."""
        report = self.report
        with complete_step("opening the store"):
            self.store = open_store()
        self.n, self.gen = self.store.generation(self.number)
        manifest = self.gen.manifest()
        self.trees, self.source_boot_id = manifest.trees, manifest.source_boot_id
        report.generation, report.source = self.n, manifest.source_release
        self.running = still_running(self.previous, self.n)
        if self.previous is not None and self.previous.generation == self.n:
            self.retry = self.previous
        if self.retry is None:
            report.stage = restore_stage(self.root)
            self.record = handoff.read(self.store.root)
            return
        if self.retry.memory == "arriving" and lazy_daemons_run():
            raise SeamlessError(
                f"the memory of generation {self.n}'s lazily restored trees is still "
                "arriving from it: a retry now would wipe it under them",
                hint="wait until seamless status says the memory is back, then retry")
        # a retry: the upgrade's phases are those of the boot; this one is the retry
        report.times = {**self.retry.times, "retry_started": self.started}
        report.stage = self.retry.stage

    def check_record(self) -> None:
        """At boot, refuse a generation that this boot was not started for (its upgrade
        record and this command line's token say); take over the upgrade's record."""
        n = self.n
        if self.at_boot:
            why = handoff.refusal(self.record, n, handoff.token_from_cmdline(read_cmdline()),
                                  self.source_boot_id, handoff.boot_id(),
                                  handoff.machine_id(self.root / "etc/machine-id"))
            if why is not None:
                raise SeamlessError(
                    f"not restoring generation {n}: {why}",
                    hint=f"the processes run on where they ran; if generation {n} is "
                    f"still wanted here, seamless restore --generation {n} restores it "
                    "by hand")
        record = self.upgrade
        if record is not None:
            self.report.boot_id_before = record.source_boot_id
            self.report.upgrade = record.result
            if record.refused is not None:  # back from the kernel that refused them
                self.report.refused = record.refused
            self.report.times = {**record.times, **self.report.times}
            self.lazy = record.lazy_pages if self.lazy is None else self.lazy

    def defer_after_init(self) -> bool:
        """Before init, leave every tree to seamless-restore.service when one of them
        cannot be restored before init; True when it does so."""
        if self.report.stage == "initramfs":
            deferred = trees_after_init(self.gen_, self.root)
            if deferred:
                # CRIU makes a tree's mount namespace again from the real root as its
                # root, which a chroot from the initramfs is not, and connects a socket
                # again by its peer's path: every tree is restored after switch-root, as
                # with dracut (the PIDs stay reserved until then). All of them, so no
                # connection between two trees waits for its peer.
                why = deferred_text(deferred)
                log.info("generation %d: %s, by seamless-restore.service", self.n, why)
                DEFERRED.parent.mkdir(parents=True, exist_ok=True)
                DEFERRED.write_text(why + "\n")
                self.report.deferred = why
                return True
        if DEFERRED.is_file():
            said = DEFERRED.read_text().strip()
            if said == PLANNED:  # the initramfs left them at the upgrade's word
                planned = self.upgrade.after_init if self.upgrade is not None else []
                said = deferred_text(planned) if planned else said
            self.report.deferred = said
        return False

    def claim(self) -> None:
        """Mark the upgrade record used (at boot), choose the way back, and run the
        commands the upgrade requires of this kernel: one that fails refuses the trees."""
        record = self.record
        if self.at_boot and record is not None:
            # used once: no later boot replays it, whatever its command line says
            record.used_by_boot = handoff.boot_id()
            handoff.write(self.store_.root, record)
        # All or nothing, when this boot can go back to the kernel the upgrade came from.
        back = self.upgrade if self.at_boot else None
        if back is not None and (why := wayback.unusable(back, self.root)) is not None:
            if back.way_back is not None and back.refused is None:
                log.warning("no way back from here (%s): the trees that can be restored "
                            "run here, the others are kept", why)
                self.report.no_way_back = why
            back = None
        self.back = back
        upgrade = self.upgrade
        if upgrade is not None and upgrade.requires and upgrade.refused is None:
            failed = wayback.failed_gate(upgrade.requires, self.root)
            if failed is not None:
                refuse(self.report, self.store_.root, back, failed, self.root)

    def restore_trees(self) -> None:
        """Verify the generation and restore its trees (all or none when there is a way
        back); the page images are checked while the trees are made."""
        report, gen, n = self.report, self.gen_, self.n
        with complete_step(f"verifying generation {n} (its page images: while the trees "
                           "are restored)"):
            bad = gen.verify(lambda path: not is_page_image(path))
        report.corrupt = bad
        load_criu_modules()
        if report.stage == "initramfs" and self.retry is None:
            report.mounted = bootfs.mount_boot_tmpfs(self.root)
        criu = self.criu or Criu(timeout=RESTORE_TIMEOUT)
        lazy = bool(self.lazy) and lazy_pages_work(criu)
        skip = corrupt_trees(bad)
        pages = PageCheck(gen, [d.name for d, info in trees_in(gen.final, self.trees)
                                if info.root not in self.running and d.name not in skip])

        def restore(**kwargs: Any) -> None:
            restore_all(gen.final, criu, skip=skip, running=self.running,
                        pager=Pager.start if lazy else None, gate=pages, listed=self.trees,
                        deadline=time.monotonic() + RESTORE_BUDGET, report=self.restored,
                        **kwargs)
        faults.point("restoring")
        try:
            hold = Hold() if self.back is not None else None
            with complete_step(f"restoring {count(len(self.trees) - len(self.running), 'tree')}"
                               + (" (their memory follows while they run)" if lazy else "")
                               + (", all or none" if hold is not None else "")):
                try:
                    restore(hold=hold)
                except SeamlessError:
                    if hold is None or hold.reason is None:
                        raise
            if hold is not None and hold.reason is not None:
                try:
                    refuse(report, self.store_.root, self.back, hold.reason, self.root)
                except SeamlessError as e:  # the way back did not load: what can, runs here
                    report.no_way_back = e.message
                    self.restored = RestoreReport()
                    with complete_step("restoring here the trees that can be"):
                        restore()
            self.pagers = self.restored.pagers
            faults.point("restored")
            report.times["retry_restored" if self.retry is not None else "restored"] = \
                time.time()
            report.corrupt = sorted(bad + pages.bad())
        finally:
            pages.stop()

    def finish(self) -> None:
        """Say the trees run, hand the services to systemd, start the services the
        upgrade left out, and overwrite the generation once nothing needs it."""
        report, restored = self.report, self.restored
        report.ok, report.trees = restored.ok, restored.to_json()["trees"]
        report.adopted = adopt_services(restored, self.root)
        if any(t.restored for t in restored.trees):
            bootfs.keep_tmp(self.root, before_init=report.stage == "initramfs")
        if self.at_boot and any(t.addresses for t in restored.trees):
            report.networkd_keeps = [str(p) for p in keep_leases_through_networkd(
                self.root, [f for t in restored.trees for f in t.network_files])]
        # The trees run: say so at once. Handing the services to systemd and overwriting
        # the generation take seconds, and the boot's services start meanwhile.
        write_report(dataclasses.replace(report, finishing=True), self.store)
        if report.adopted:
            hand_over(report.adopted)
        upgrade = self.upgrade
        if self.retry is None and upgrade is not None and upgrade.stopped_units:
            report.started_again = start_left_out(upgrade.stopped_units, self.root)
        if self.pagers:
            report.memory = "arriving"
        elif restored.ok and not self.keep:
            with complete_step(f"overwriting generation {self.n} (it held process memory)"):
                self.gen_.wipe()
            report.wiped = True

    def close(self) -> None:
        """Write the report (a generation not overwritten is kept for a retry, for a
        while) and close the store, or leave it to the lazy restore's finisher."""
        report, gen, store = self.report, self.gen, self.store
        report.times["finished"] = time.time()
        left_to_the_unit = report.deferred is not None and report.stage == "initramfs"
        if gen is not None and not report.wiped and not self.keep and not left_to_the_unit:
            # kept for a retry, and no longer: it holds the processes' memory (a lazy
            # restore's finisher wipes it sooner; this bounds it should the finisher die)
            report.kept_until = report.times["finished"] + KEEP_FAILED_SECONDS
        if not left_to_the_unit:
            write_report(report, store)
        if store is not None:
            if self.pagers and gen is not None:  # even after an error: the daemons read it
                finish_in_background(report, store, gen, self.pagers, self.keep)
            else:
                close_store(store)

    @property
    def gen_(self) -> Generation:
        assert self.gen is not None, "the generation is opened first"
        return self.gen

    @property
    def store_(self) -> Store:
        assert self.store is not None, "the store is opened first"
        return self.store


def refuse(report: handoff.Report, store_root: Path, back: handoff.UpgradeRecord | None,
           reason: str, root: Path) -> None:
    """This kernel runs none of the trees: go back to the kernel the upgrade came from
    (does not return), or, with no way back, end the restore with the generation kept
    for a retry by hand. Raises :class:`SeamlessError` when the way back does not load
    (nothing was entered)."""
    report.refused = refused = wayback.refusal(reason)
    if back is None:
        n = report.generation
        raise SeamlessError(
            f"not running the trees in this kernel: {reason}",
            hint=f"generation {n} is kept: once this kernel is fit, seamless restore "
            f"--generation {n} restores it; or reboot into the old kernel and restore it there")
    try:
        wayback.go_back(store_root, back, refused, root)
    except OSError as e:
        raise SeamlessError(f"the way back did not load: {e}") from e


def lazy_daemons_run() -> bool:
    """Whether a `criu lazy-pages` daemon still serves a lazy restore's memory."""
    import psutil  # only here: its import is a tenth of the restorer's start

    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info.get("cmdline") or []
        if "lazy-pages" in cmdline and any(c.endswith("criu") for c in cmdline[:1]):
            return True
    return False


def close_store(store: Store) -> None:
    try:
        unmount(store.root)
    except SeamlessError as e:
        log.warning("%s", e)


def lazy_pages_work(criu: Restorer) -> bool:
    """Whether this kernel and CRIU can restore lazily (userfaultfd); says so if not."""
    try:
        works = bool(criu.features("lazy_pages").get("lazy_pages"))
    except SeamlessError as e:
        works = False
        log.debug("lazy-pages feature check: %s", e)
    if not works:
        log.warning("this kernel cannot restore lazily (userfaultfd): restoring every "
                    "page before the trees run")
    return works


def finish_in_background(report: handoff.Report, store: Store, gen: Generation,
                         pagers: dict[int, Pager], keep: bool) -> None:
    """Leave a process behind that finishes the lazy restore (:func:`finish_lazy`): the
    boot goes on meanwhile."""
    if os.fork() != 0:
        return
    code = 0
    try:
        os.setsid()
        try:
            # Until it exits: no upgrade or checkpoint while the memory arrives. (Before
            # init, /run is the initramfs's, which the boot moves into the real root.)
            lock.hold("the lazy restore's finisher, until the memory is back")
        except SeamlessError as e:
            log.warning("the lazy restore's finisher runs without the lock: %s", e)
        finish_lazy(report, store, gen, pagers, keep)
    except BaseException:
        log.exception("finishing the lazy restore failed")
        code = 1
    finally:
        os._exit(code)


def finish_lazy(report: handoff.Report, store: Store, gen: Generation,
                pagers: dict[int, Pager], keep: bool) -> None:
    """Wait until the lazily restored trees have all their memory (stopping a tree whose
    memory did not all arrive), then wipe the generation, complete the report and
    unmount the store."""
    faults.point("finishing")
    failed = lazy.finish(pagers)
    report.times["memory_back"] = time.time()
    for tree in report.restored_trees:
        if tree["root"] in failed:
            tree.update(restored=False, error=failed[tree["root"]])
    report.ok = report.ok and not failed
    report.memory = "back" if not failed else "incomplete"
    # In an initramfs without systemd /run, with the store, leaves the real root after
    # the restore and comes back once the boot moves it there before init. The memory
    # can be back before /run leaves: wait for the mark the boot script leaves in /run
    # once it has left (seamless-lib.sh); a restore by hand has none to wait for.
    handed_over = os.environ.get(HANDED_OVER_ENV)
    if not _visible(Path(handed_over) if handed_over else REPORT_RUN):
        # Not in place: nothing of it is touched (a wipe would miss it, a report would
        # land on the root's disk under the mount point). The report on disk says so.
        report.error = ("/run did not come back into the real root: the generation "
                        "was not wiped")
        log.error("%s", report.error)
        write_report(report, None, in_run=False)
        return
    try:
        if report.ok and not keep:
            gen.wipe()
            report.wiped = True
    except OSError as e:
        report.error = f"the generation was not wiped: {e}"
        log.error("%s", report.error)
    finally:
        report.times["finished"] = time.time()
        if not report.wiped and not keep:
            report.kept_until = report.times["finished"] + KEEP_FAILED_SECONDS
        write_report(report, store)
        close_store(store)
    log.info("the memory of %d lazily restored trees is back%s", len(pagers),
             "" if not failed else f"; {count(len(failed), 'tree')} stopped: it did not all arrive")


def _visible(path: Path, within: float = 300) -> bool:
    deadline = time.monotonic() + within
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return path.exists()


def systemd_runs() -> bool:
    """Whether systemd is PID 1 already (not the initramfs's init, before it). Not
    /run/systemd/system: the adoption has just made it, for the systemd to come."""
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def hand_over(units: list[str]) -> None:
    """When systemd runs already (the restore unit), make it read the runtime units and
    start the adopted ones (their start is /bin/true: it only records the main PID)."""
    if not systemd_runs():
        return  # before init: systemd reads them when it starts
    run(["systemctl", "daemon-reload"], check=False)
    finish = [adopt.FINISH_UNIT] if (Path("/") / adopt.RUNTIME_UNITS / adopt.FINISH_UNIT).exists() \
        else []
    run(["systemctl", "start", "--no-block", *units, *finish], check=False)


def start_left_out(units: list[str], root: Path) -> list[str]:
    """Start again the services the upgrade left out and stopped before the kexec (see
    ``collect.plan.left_out_services``): they ran in the old boot, enabled or not. When
    systemd runs, at once; before init, systemd starts them as the boot goes on (each
    wanted by multi-user.target in /run, for this boot only)."""
    if systemd_runs():
        run(["systemctl", "start", "--no-block", "--", *units], check=False)
        return units
    wants = root / adopt.RUNTIME_UNITS / "multi-user.target.wants"
    started = []
    for unit in units:
        found = next((root / d / unit for d in adopt.UNIT_DIRS
                      if (root / d / unit).exists()), None)
        if found is None:
            log.warning("%s was stopped before the kexec and has no unit file here", unit)
            continue
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(Path("/") / found.relative_to(root))
        started.append(unit)
    return started


def read_cmdline() -> str:
    return Path("/proc/cmdline").read_text()


def generation_from_cmdline(cmdline: str | None = None) -> int | None:
    """N of ``seamless.restore=N`` on the kernel command line."""
    text = cmdline if cmdline is not None else read_cmdline()
    for arg in text.split():
        if arg.startswith("seamless.restore="):
            value = arg.removeprefix("seamless.restore=")
            return int(value) if value.isdigit() else None
    return None


def adopt_services(report: RestoreReport, root: Path) -> list[str]:
    adopted = []
    dropins = []
    for tree in report.trees:
        new = tree.restored and not tree.earlier
        # only a tree of the system unit's own cgroup: not a user's unit of the same name
        system = adopt.system_unit(tree.cgroup) == tree.unit or not tree.cgroup
        if new and tree.pid and tree.unit and tree.unit.endswith(".service") and system:
            path = adopt.adopt(tree.unit, tree.pid, root)
            adopted.append(tree.unit)
            if path.name == adopt.DROPIN:
                dropins.append(path)
    adopt.finish_unit(dropins, root)
    return adopted


def unrestored_upgrade() -> dict[str, Any] | None:
    """An upgrade that entered its new kernel and was never restored: this boot is not
    the one it started (the new kernel panicked and the firmware reset the machine, or
    it was reset or powered off), so its processes are lost and its generation is not
    replayed. None when there is none, or no store to tell (not root, no region)."""
    if os.geteuid() != 0 or DEFERRED.exists():
        return None
    try:
        store = open_store()
    except SeamlessError:
        return None
    record = handoff.read(store.root)
    if record is None or record.used_by_boot is not None \
            or record.source_boot_id == handoff.boot_id():
        return None
    return {"generation": record.generation, "from": record.source_release,
            "to": record.target_release, "entering": record.times.get("entering"),
            "kept_until": store.kept_until(record.generation),
            "running": os.uname().release, "upgrade": record.result}


def last_report() -> handoff.Report | None:
    """The newest report of a restore at boot, if any."""
    found = []
    for path in (REPORT_RUN, REPORT_VAR):
        try:
            found.append(handoff.Report.from_json(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    if not found:
        return None
    # the latest time each recorded: a report written before the restore finished has
    # no "finished" yet, and is still newer than the last upgrade's
    return max(found, key=lambda r: max(r.times.values(), default=0))


def phases(report: handoff.Report) -> list[tuple[str, float]]:
    """The durations of an upgrade's phases, from the times it recorded. An upgrade the
    new kernel refused came back to this one: its kexec is the way back."""
    t = report.times
    entering = "entering_back" if "entering_back" in t else "entering"
    spans = [
        ("pre-dump and hash (running)", "pre_dumping", "frozen"),
        ("freeze and dump", "frozen", "dumped"),
        ("seal (checksums, manifest)", "dumped", "sealed"),
        ("into the new kernel, to its refusal", "entering", "refused"),
        ("kexec to the restorer" + (" (the way back)" if "entering_back" in t else ""),
         entering, "restorer_started"),
        ("  leaving the old kernel", entering, "kernel_started"),
        ("  new kernel's boot to the restorer", "kernel_started", "restorer_exec"),
        ("  the restorer's start (python)", "restorer_exec", "restorer_started"),
        ("    the interpreter's start", "restorer_exec", "python_started"),
        ("    importing the restorer", "python_started", "restorer_started"),
        ("restore", "restorer_started", "restored"),
        ("total blackout (freeze to restored)", "frozen", "restored"),
        ("memory back (lazy restore, trees running)", "restored", "memory_back"),
        ("retry by hand (seamless restore)", "retry_started", "retry_restored"),
    ]
    return [(name, t[b] - t[a]) for name, a, b in spans if a in t and b in t]


def boot_command(number: int | None, *, keep: bool = False, as_json: bool = False) -> None:
    """``seamless restore --boot``: the boot's restore of generation ``number`` (default:
    the command line's ``seamless.restore=``), its report as JSON on stdout if asked;
    a :class:`SeamlessError` (exit code 3) when a tree was not restored."""
    report = boot_restore(number if number is not None else generation_from_cmdline(),
                          keep=keep, at_boot=True)
    if as_json:
        print(json.dumps(report.to_json(), indent=2), flush=True)
    if report.deferred and report.stage == "initramfs":
        return  # seamless-restore.service restores them after switch-root
    if not report.ok:
        raise SeamlessError("some trees were not restored (seamless status says which)",
                            exit_code=ExitCode.CHANGED)
