"""``seamless upgrade --kernel``: checkpoint, kexec, and restore in the new kernel.

Preflight checks everything that can be checked before any process is touched
(and loads the new kernel, so that a kernel the running one refuses is found
then).  Then every selected tree is dumped into a new generation of the store
and held frozen; the generation is sealed; the kernel is entered with
``seamless.restore=N`` on its command line, and the boot-time restorer brings the
trees back.  Any failure before the kexec thaws every tree, removes the
generation and unloads the kernel: nothing changed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from seamless import faults, stop
from seamless.collect.checkpoint import HeldTrees, take_checkpoint
from seamless.collect.cli import pre_dump_option, selection_from, selection_options
from seamless.collect.inhibitors import inhibitors
from seamless.collect.plan import CheckpointPlan, StoreSpace, left_out_services, make_plan, render
from seamless.collect.processes import ProcessInfo, read_table
from seamless.collect.resources import after_init_reasons
from seamless.collect.select import Selection
from seamless.criu import Criu, CriuError, kernels
from seamless.criu.modules import load_criu_modules
from seamless.errors import ExitCode, SeamlessError, need_root
from seamless.kexec import cmdline, initrd, loader
from seamless.kexec.cli import check_policy, prepare_initrd
from seamless.kexec.image import KernelImage
from seamless.lock import exclusive
from seamless.log import complete_step, count, log
from seamless.memstore import handoff
from seamless.memstore.generation import Generation
from seamless.memstore.records import Manifest
from seamless.memstore.region import find_region
from seamless.memstore.store import Store, no_region_error, open_store
from seamless.run import run


def _criu_check(target_release: str) -> None:
    """CRIU works on this kernel (``criu check``) and is known to work on the target."""
    with tempfile.TemporaryDirectory(prefix="seamless-check-") as work:
        try:
            criu = Criu()
            criu.check(Path(work))
            version = criu.version()
        except CriuError as e:
            raise SeamlessError(f"criu check fails on this kernel: {e}",
                                hint="CRIU cannot checkpoint here; see criu check's output "
                                "(run `criu check` by hand)") from e
    why = kernels.unsupported(version, target_release)
    if why is not None:
        raise SeamlessError(why, hint="choose an older kernel, or upgrade with a newer CRIU "
                                      "(the distribution's next release has one)")


def _lazy_pages_check() -> None:
    try:
        works = Criu().features("lazy_pages").get("lazy_pages", False)
    except CriuError as e:
        raise SeamlessError(f"cannot ask CRIU about lazy restore: {e}") from e
    if not works:
        raise SeamlessError("this kernel cannot restore lazily (CRIU needs userfaultfd)",
                            hint="upgrade without --lazy-pages")


def required_commands(config_path: Path, given: tuple[str, ...]) -> list[str]:
    """The commands the new kernel must pass before the trees run there: the
    configuration's ``[upgrade] require`` list, then those given with --require."""
    found: list[str] = []
    if config_path.exists():
        try:
            table = tomllib.loads(config_path.read_text()).get("upgrade", {})
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SeamlessError(f"cannot read {config_path}: {e}") from e
        found = table.get("require", [])
        if not isinstance(found, list) or not all(isinstance(c, str) and c.strip()
                                                  for c in found):
            raise SeamlessError(f"{config_path}: [upgrade] require must be a list of "
                                "commands (strings)")
    for command in given:
        if not command.strip():
            raise click.BadParameter("an empty command", param_hint="--require")
    return [*found, *given]


def way_back(args: list[str], boot: Path = Path("/boot")) -> handoff.WayBack:
    """The running kernel, for the new one to go back to with every tree when it cannot
    run them all: its image and initramfs in /boot, the initramfs carrying the restorer
    and the store's modules. A way back that is not there is an error before anything
    is frozen."""
    release = os.uname().release
    without = ("upgrade with --no-way-back (a tree the new kernel cannot restore is then "
               "kept there for a retry by hand)")
    hint = "reinstall this kernel's package, or " + without
    kernel = boot / f"vmlinuz-{release}"
    if not os.access(kernel, os.R_OK):
        raise SeamlessError(f"no way back: the running kernel's {kernel} is not there",
                            hint=hint)
    ramdisk = boot / initrd.default_initrd(release).name
    with complete_step(f"looking for the restorer in {ramdisk} (the way back)"):
        if not initrd.check_restorer(ramdisk, release):
            raise SeamlessError(f"no way back: {ramdisk} lacks the boot-time restorer",
                                hint=f"update-initramfs -u -k {release} (or dracut --force "
                                f"{ramdisk} {release}) adds it; or " + without)
    return handoff.WayBack(release=release, kernel=str(kernel), initrd=str(ramdisk),
                           cmdline=cmdline.join(args))


@click.command("upgrade")
@click.option("--kernel", type=click.Path(path_type=Path), metavar="PATH", required=True,
              help="The kernel to upgrade to (a bzImage, e.g. /boot/vmlinuz-RELEASE).")
@click.option("--initrd", "initrd_path", type=click.Path(path_type=Path), metavar="PATH",
              help="Its initramfs (default /boot/initrd.img-RELEASE, rebuilt with the "
              "restorer when it lacks it).")
@click.option("--append", metavar="ARGS", help="Arguments to add to the new command line.")
@selection_options
@click.option("--dry-run", is_flag=True,
              help="Do everything up to the kexec, check the generation, thaw, and report.")
@click.option("--yes", is_flag=True, help="Do not ask before freezing the processes.")
@pre_dump_option
@click.option("--lazy-pages", is_flag=True,
              help="In the new kernel, run the trees before all their memory is back: CRIU's "
              "lazy restore (userfaultfd) copies it while they run. The blackout no longer "
              "grows with their memory. A tree whose memory does not all arrive is stopped. "
              "Implies --no-pre-dump unless --pre-dump is given: CRIU restores the pages a "
              "pre-dump copied before the tree runs.")
@click.option("--force", is_flag=True,
              help="Upgrade even while a package manager is at work or logind inhibits "
              "shutdown (which systemctl kexec respects).")
@click.option("--require", "requires", multiple=True, metavar="COMMAND",
              help="A command the new kernel must pass (run with sh in its real root, exit "
              "0) before any tree runs there; otherwise it goes back to this kernel with "
              "every tree. Repeatable; added to the configuration's [upgrade] require.")
@click.option("--no-way-back", is_flag=True,
              help="Do not go back to this kernel when the new one cannot restore every "
              "tree: it runs those it can, and keeps the others for a retry by hand.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON on stdout: after a dry run, or just before the "
              "kexec (state \"entering\"). The new boot's `seamless status --json` reports "
              "it again, under \"upgrade\".")
@exclusive("seamless upgrade")
def upgrade_command(kernel: Path, initrd_path: Path | None, append: str | None,
                    includes: tuple[str, ...], excludes: tuple[str, ...], config_path: Path,
                    dry_run: bool, yes: bool, pre_dump: bool | None, lazy_pages: bool,
                    force: bool, requires: tuple[str, ...], no_way_back: bool,
                    as_json: bool) -> None:
    """Upgrade to another kernel, keeping the running processes.

    Every user process tree is checkpointed into the preserved RAM region, the
    new kernel is entered with kexec, and the trees are restored there, with
    the same PIDs, before the system's services start. `seamless status` shows
    the outcome afterwards.

    The new kernel runs every tree or none: when one cannot be restored there, or a
    required command fails, it goes back to this kernel, which restores them all
    (unless --no-way-back).

    Exits 1 with nothing changed when a check fails or the checkpoint fails
    (every process runs on).
    """
    need_root("upgrading the kernel")
    started = time.time()
    selection = selection_from(includes, excludes, config_path)
    gates = required_commands(config_path, requires)
    if gates and no_way_back:
        raise click.UsageError("--require needs the way back: a kernel that fails it goes "
                               "back to this one (leave out --no-way-back)")
    if lazy_pages and pre_dump is None:
        # CRIU (3.17) restores a pre-dump's pages before the tree runs, lazily or not: only
        # the pages of the final dump can come back lazily.
        pre_dump = False
    with complete_step("preflight"):
        ready = preflight(kernel, initrd_path, append, selection, dry_run=dry_run,
                          lazy_pages=lazy_pages, force=force, no_way_back=no_way_back)
    log.info("%d trees to carry (%d MiB), generation %d", len(ready.plan.trees),
             ready.plan.needed >> 20, ready.number)
    _confirm(ready, yes or dry_run)

    # -- checkpoint: from here every failure thaws the trees and unloads the kernel
    os.umask(0o077)
    times: dict[str, float] = {"started": started}
    try:
        held, manifest = take_checkpoint(ready.plan.trees, ready.gen, ready.number,
                                         leave_running=dry_run,
                                         target_release=ready.image.release, times=times,
                                         pre_dump=pre_dump)
    except BaseException:
        loader.unload()
        raise
    result = ready.result(manifest, dry_run=dry_run, lazy_pages=lazy_pages, requires=gates)
    if not dry_run:
        record = handoff.UpgradeRecord(
            generation=ready.number, token_sha256=handoff.digest(ready.token),
            source_boot_id=manifest.source_boot_id, machine_id=handoff.machine_id(),
            source_release=result["from"], target_release=ready.image.release,
            lazy_pages=lazy_pages, times=times,
            stopped_units=left_out_services(ready.plan, ready.table), result=result,
            last_pid=ready.last_pid, way_back=ready.back, requires=gates,
            after_init=ready.after_init)
        _enter(held, ready.gen, ready.store.root, record, as_json)
        return  # only where loader.enter is faked: the real one does not come back
    _finish_dry_run(held, ready.gen, result)
    result["times"] = times
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        trees = count(len(manifest.trees), "tree")
        click.echo(f"dry run: {trees} ({manifest.total_bytes >> 20} MiB) "
                   f"checkpointed into generation {ready.number} and verified, then thawed; "
                   f"{ready.image.release} loaded and unloaded again. The upgrade would work.")


@dataclass
class Ready:
    """What the preflight leaves: the new kernel loaded, its command line made, the
    trees chosen and a generation to write them into; nothing frozen yet."""

    image: KernelImage
    store: Store
    number: int
    gen: Generation
    initrd: Path
    initrd_rebuilt: bool
    table: list[ProcessInfo]
    plan: CheckpointPlan
    back: handoff.WayBack | None
    #: The new kernel starts its own processes above it.
    last_pid: int
    #: The one-time token on the new command line (the store gets only its digest).
    token: str
    cmdline: str
    #: Why trees wait for seamless-restore.service (the command line says so).
    after_init: list[str]

    def result(self, manifest: Manifest, *, dry_run: bool, lazy_pages: bool,
               requires: list[str]) -> dict[str, Any]:
        """What ``seamless upgrade --json`` prints (and the new boot's status reports)."""
        return {
            "from": os.uname().release, "to": self.image.release,
            "kernel": str(self.image.path), "initrd": str(self.initrd),
            "initrd_rebuilt": self.initrd_rebuilt,
            "cmdline": self.cmdline.replace(self.token, "(one-time token)"),
            "generation": self.number, "dry_run": dry_run, "lazy_pages": lazy_pages,
            "way_back": self.back.release if self.back is not None else None,
            "requires": requires,
            "trees": [{"root": t.root, "unit": t.unit, "command": t.command, "bytes": t.bytes,
                       "dump_seconds": t.dump_seconds} for t in manifest.trees],
            "bytes": manifest.total_bytes,
        }


def preflight(kernel: Path, initrd_path: Path | None, append: str | None,
              selection: Selection, *, dry_run: bool, lazy_pages: bool, force: bool,
              no_way_back: bool) -> Ready:
    """Check everything the upgrade needs, before anything is touched, and load the new
    kernel: the store, the command line, the initramfs, CRIU, the plan, what inhibits a
    shutdown. Raises (nothing loaded) when the upgrade would not succeed."""
    image = KernelImage.read(kernel)
    log.info("target kernel: %s", image.release)
    check_policy()
    region = find_region()
    if region is None:
        raise no_region_error()
    if not region.reserved_now:
        raise SeamlessError(f"the running kernel does not reserve {region.memmap}",
                            hint="reboot once with it on the command line (seamless setup)")
    store = open_store(region)
    number, gen = store.new_generation()
    args = cmdline.with_restore(cmdline.build(cmdline.running_cmdline(), append=append),
                                number)
    cmdline.require_region(args, region.memmap)
    back = None if no_way_back else way_back(cmdline.build(cmdline.running_cmdline()))
    initrd_used, rebuilt = prepare_initrd(image, initrd_path, False, dry_run)
    load_criu_modules()
    _criu_check(image.release)
    if lazy_pages:
        _lazy_pages_check()
    table = read_table()
    plan = make_plan(table, selection, StoreSpace(device=str(store.root), free=store.free()))
    if not plan.ok:
        click.echo(render(plan), err=True)
        raise SeamlessError("the upgrade would not succeed; nothing was frozen",
                            hint="see the problems above (seamless plan shows them too)")
    busy = inhibitors()
    if busy and not force:
        raise SeamlessError(
            "not now: " + "; ".join(map(str, busy)),
            hint="wait until it is done (--force upgrades anyway); nothing was frozen")
    for b in busy:
        log.warning("upgrading anyway (--force): %s", b)
    # The new kernel starts its processes above every PID to restore (with room for
    # children forked before the freeze).
    last_pid = max((p for t in plan.trees for p in t.pids), default=0) + cmdline.PID_MARGIN
    token = handoff.new_token()  # its digest goes into the store just before the kexec
    # The initramfs need not start a restorer only to find that a tree waits for the
    # real root (a sandboxed service): seconds of the blackout on a stock server.
    after_init = after_init_reasons(plan.trees)
    new_cmdline = cmdline.join(cmdline.with_restore(args, number, last_pid, token,
                                                    after_init=bool(after_init)))
    cmdline.check_length(new_cmdline, image.max_cmdline)
    with complete_step(f"loading {image.release} with kexec_file_load"):
        loader.load(image.path, initrd_used, new_cmdline)
    return Ready(image, store, number, gen, initrd_used, rebuilt, table, plan, back,
                 last_pid, token, new_cmdline, after_init)


def _confirm(ready: Ready, yes: bool) -> None:
    """Ask the operator (unless ``yes``); the kernel is unloaded when the answer is no."""
    try:
        faults.point("preflight")
        go = yes or click.confirm(f"Freeze {len(ready.plan.trees)} process trees and reboot "
                                  f"into {ready.image.release}?", err=True)
    except BaseException:
        loader.unload()
        raise
    if not go:
        loader.unload()
        raise SeamlessError("not upgrading: nothing was changed")


def _finish_dry_run(held: HeldTrees, gen: Generation, result: dict[str, Any]) -> None:
    try:
        with complete_step("verifying the generation"):
            bad = gen.verify()
    except BaseException:
        held.abort()
        loader.unload()
        gen.wipe()
        raise
    try:
        with complete_step("thawing the trees"):
            held.release()
    finally:
        loader.unload()
        gen.wipe()  # it holds process memory, and no kernel will restore it
    result["verified"] = not bad
    if bad:
        raise SeamlessError("the generation did not verify: " + ", ".join(bad),
                            hint="the store may be damaged: seamless store verify")


#: How long the services left out may take to stop before the kexec goes on anyway.
STOP_TIMEOUT = 90


def _stop_left_out(units: list[str]) -> None:
    """Stop the services left out of the checkpoint (see ``left_out_services``), all in
    one transaction, so in their dependency order; one that does not stop in time is cut
    off by the kexec, as it was before."""
    with complete_step(f"stopping {count(len(units), 'service')} left out, as systemctl "
                       f"kexec would: {', '.join(units)}"):
        result = run(["systemctl", "stop", "--", *units], check=False, timeout=STOP_TIMEOUT)
    if result.returncode != 0:
        log.warning("not every service left out stopped cleanly (%s): the kexec ends them",
                    result.stderr.decode(errors="replace").strip())


def _start_left_out(units: list[str]) -> None:
    if units:
        run(["systemctl", "start", "--no-block", "--", *units], check=False)


def _roll_back(held: HeldTrees, gen: Generation, store_root: Path,
               stopped: list[str] | None = None) -> None:
    """Thaw every tree (they run on in this kernel), unload the kernel, remove the
    generation and the record that asks the new boot to restore it, and start again
    the services left out that were stopped."""
    with stop.critical():
        held.abort()
        _start_left_out(stopped or [])
        loader.unload()
        try:  # best effort: entering may have remounted the store read-only
            handoff.remove(store_root)
            gen.wipe()
        except OSError as w:
            log.warning("generation %s not removed: %s", gen.final, w)


def _enter(held: HeldTrees, gen: Generation, store_root: Path,
           record: handoff.UpgradeRecord, as_json: bool) -> None:
    """Enter the loaded kernel; with `as_json`, print the upgrade's result on stdout
    first (state "entering"): the last thing this kernel says. The record carries the
    same result to the new boot's ``seamless status --json``."""
    loose = held.let_go()
    if loose:  # a CRIU ended while it held its tree: the tree ran on after its dump
        _roll_back(held, gen, store_root)
        raise SeamlessError(
            "CRIU let go of tree " + ", ".join(map(str, loose)) + " before the kexec: it "
            "ran on after its dump, and its images would bring back an older state",
            hint="nothing was changed: every tree runs on in this kernel; see CRIU's "
            "dump.log of that tree (seamless --debug) and try again",
            exit_code=ExitCode.UNCHANGED)
    record.times["entering"] = time.time()
    try:
        if record.stopped_units:
            _stop_left_out(record.stopped_units)
        record.result.update(state="entering", times=record.times,
                             stopped_units=record.stopped_units)
        handoff.write(store_root, record)
        faults.point("entering")
        if as_json:
            click.echo(json.dumps(record.result, indent=2))
        click.echo(f"entering {record.target_release}: the processes come back there "
                   "(seamless status shows how it went)", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        loader.enter()
    except BaseException as e:
        _roll_back(held, gen, store_root, record.stopped_units)
        raise SeamlessError(f"entering {record.target_release} failed: {e}",
                            hint="the processes were thawed and run on",
                            exit_code=ExitCode.CHANGED) from e
