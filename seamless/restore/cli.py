"""Commands of the restore stage."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import click

from seamless import __version__
from seamless.criu import Criu
from seamless.errors import ExitCode, SeamlessError, need_root
from seamless.kexec import boothooks
from seamless.lock import held
from seamless.log import complete_step, count
from seamless.memstore import handoff
from seamless.memstore.handoff import TREE_INFO
from seamless.restore.boot import (
    boot_command,
    boot_restore,
    last_report,
    phases,
    unrestored_upgrade,
)
from seamless.restore.restorer import RESTORE_TIMEOUT, TreeRestore, restore_all


@click.command("install-restorer")
@click.option("--rebuild", "releases", multiple=True, metavar="RELEASE",
              help="Also rebuild /boot/initrd.img-RELEASE with the restorer (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def install_restorer_command(releases: tuple[str, ...], as_json: bool) -> None:
    """Install the boot-time restorer into dracut and/or initramfs-tools.

    Every initramfs built afterwards carries it, including the one a kernel
    package builds on upgrade.
    """
    need_root("installing the restorer")
    with complete_step("installing the boot-time restorer"):
        done = boothooks.install()
    rebuilt = []
    for release in releases:
        with complete_step(f"rebuilding the initramfs of {release}"):
            rebuilt.append(str(boothooks.rebuild(release)))
    result = {
        "dracut": str(done.dracut) if done.dracut else None,
        "unit": str(done.unit) if done.unit else None,
        "initramfs_tools": [str(p) for p in done.initramfs_tools],
        "rebuilt": rebuilt,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        if done.dracut:
            click.echo(f"dracut module: {done.dracut}")
        for p in done.initramfs_tools:
            click.echo(f"initramfs-tools: {p}")
        for r in rebuilt:
            click.echo(f"rebuilt: {r}")


@click.command("restore")
@click.option("--images", "images_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="A checkpoint's directory (default: a generation of the store).")
@click.option("--generation", "number", type=int, default=None,
              help="The store's generation to restore (default: the newest).")
@click.option("--boot", is_flag=True, hidden=True,
              help="Run as the boot-time restorer (from the initramfs).")
@click.option("--keep", is_flag=True,
              help="Keep the generation after a successful restore (it is overwritten otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def restore_command(images_dir: Path | None, number: int | None, boot: bool, keep: bool,
                    as_json: bool) -> None:
    """Restore every process tree of a checkpoint, with the same PIDs.

    Trees come back in the order they were dumped; one that fails does not stop
    the others. Exits 3 when any tree failed (the others run again).
    """
    need_root("restoring processes")
    if boot:  # the hooks' own call takes seamless.entry's way, without click
        boot_command(number, keep=keep, as_json=as_json)
        return
    if images_dir is not None and not any(images_dir.glob(f"*/{TREE_INFO}")):
        raise SeamlessError(f"{images_dir} holds no checkpointed tree",
                            hint="give the directory a checkpoint wrote its trees into")
    with held("seamless restore"):
        _restore_by_hand(images_dir, number, keep, as_json)


def _restore_by_hand(images_dir: Path | None, number: int | None, keep: bool,
                     as_json: bool) -> None:
    if images_dir is None:
        # A generation of the store: a retry after a failed or missing boot-time restore.
        # Trees an earlier restore brought back and that still run are left alone.
        retried = boot_restore(number, keep=keep, previous=last_report())
        trees = [TreeRestore(**t) for t in retried.restored_trees]
        hint = (f"the others run; seamless status says why; the generation is kept: "
                f"seamless restore --generation {retried.generation} tries again")
        if as_json:
            click.echo(json.dumps(retried.to_json(), indent=2))
    else:
        with complete_step(f"restoring the trees of {images_dir}"):
            report = restore_all(images_dir, Criu(timeout=RESTORE_TIMEOUT))
        trees = report.trees
        hint = "the others run again; see each tree's restore.log beside its images"
        if as_json:
            click.echo(json.dumps(report.to_json(), indent=2))
    if not as_json:
        for t in trees:
            state = (f"runs already as {t.pid}" if t.earlier else
                     f"restored as {t.pid}" if t.restored else f"FAILED: {t.error}")
            click.echo(f"{t.root:>7}  {t.command[:50]:<50}  {state}")
    failed = [t for t in trees if not t.restored]
    if failed:
        raise SeamlessError(
            f"{len(failed)} of {count(len(trees), 'tree')} were not restored", hint=hint,
            exit_code=ExitCode.CHANGED,
        )


#: The version of ``seamless status --json``'s schema (new keys may appear within one).
STATUS_SCHEMA = 1


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def status_command(ctx: click.Context, as_json: bool) -> None:
    """What the last upgrade did: kernels, each tree's result, the time of each phase.

    Exits 0 when it restored every tree, 4 when it did not, never came back, or the
    new kernel refused the trees and went back to the old one (a fleet's rollout stops
    there), 1 when no upgrade was restored here yet.
    """
    report = last_report()
    lost = unrestored_upgrade()
    if report is None and lost is None:
        raise SeamlessError("no upgrade has been restored on this machine yet",
                            hint="seamless upgrade --kernel PATH does one")
    if as_json:
        out = {**report.to_json(), "phases": dict(phases(report))} if report is not None \
            else {}
        if lost is not None:
            out["unrestored_upgrade"] = lost
        out.update(schema_version=STATUS_SCHEMA, host=socket.gethostname(),
                   seamless_version=__version__, this_boot=handoff.boot_id())
        click.echo(json.dumps(out, indent=2))
    else:
        _print_status(report, lost)
    if lost is not None or (report is not None and (not report.ok or report.refused)):
        ctx.exit(ExitCode.CHECK_FAILED)


def _print_status(report: handoff.Report | None, lost: dict[str, Any] | None) -> None:
    if lost is not None:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lost["entering"] or 0))
        click.echo(f"upgrade to {lost['to']} NEVER CAME BACK: it entered the new kernel at "
                   f"{at}, and this boot ({lost['running']}) did not come from it (the new "
                   "kernel panicked and the machine was reset, or it was reset by hand). "
                   f"The processes of that upgrade are lost; generation {lost['generation']} "
                   "is not replayed"
                   + (" and is kept until " + time.strftime(
                       "%Y-%m-%d %H:%M", time.localtime(lost["kept_until"]))
                      if lost.get("kept_until") else "")
                   + f" (seamless restore --generation {lost['generation']} restores it by "
                   "hand, over what runs now)")
        if report is None:
            return
        click.echo("the upgrade before it:")
    assert report is not None  # one of the two is there
    when = time.strftime("%Y-%m-%d %H:%M:%S",
                         time.localtime(report.times.get("restorer_started", 0)))
    to = report.to
    if report.refused:  # A -> B -> A
        to = f"{report.refused.get('release', '?')}, which refused it, -> back to {to}"
    click.echo(f"last upgrade: {report.source or '?'} -> {to} at {when}, "
               f"generation {report.generation}: "
               + ("all trees restored" if report.ok else "NOT all trees restored"))
    where = {"initramfs": "in the initramfs, before init",
             "systemd": "by seamless-restore.service, before the services"}.get(
        report.stage or "")
    if where:
        click.echo(f"restored {where}"
                   + (f" (not before init: {report.deferred})" if report.deferred else ""))
    if report.finishing:
        click.echo("the restore is still finishing: the trees run; it hands their services "
                   "to systemd and overwrites the generation")
    refused = report.refused
    if refused:
        click.echo(f"the upgrade to {refused.get('release')} was REFUSED there: "
                   f"{refused.get('reason')}. No tree ran in it; it went back to "
                   f"{report.to}, and the trees were restored here. Mend the cause (or "
                   "leave that tree out), then upgrade again")
    if report.no_way_back:
        click.echo(f"no way back to the old kernel: {report.no_way_back}")
    if report.error:
        click.echo(f"error: {report.error}")
    if report.expired:
        click.echo(f"generation {report.generation} was kept for a retry, then "
                   "overwritten at " + time.strftime("%Y-%m-%d %H:%M",
                                                      time.localtime(report.expired)))
    elif report.kept_until and not report.wiped and report.memory != "arriving":
        click.echo(f"generation {report.generation} is kept for a retry (seamless "
                   f"restore --generation {report.generation}) until "
                   + time.strftime("%Y-%m-%d %H:%M", time.localtime(report.kept_until))
                   + ", then overwritten: it holds the processes' memory")
    memory = {"arriving": "still arriving (lazy restore: the trees run meanwhile)",
              "back": "all back (lazy restore)",
              "incomplete": "did NOT all arrive: those trees were stopped"}.get(
        report.memory or "")
    if memory:
        click.echo(f"the trees' memory: {memory}")
    for t in report.restored_trees:
        state = f"restored as {t['pid']}" if t["restored"] else f"FAILED: {t['error']}"
        click.echo(f"  {t['root']:>7}  {(t['unit'] or '-')[:30]:<30} {t['command'][:30]:<30} "
                   f"{state}")
    for name, seconds in phases(report):
        click.echo(f"  {name:<40} {seconds:8.2f} s")
