"""Commands of the store: ``seamless setup`` and ``seamless store ...``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from seamless.errors import ExitCode, SeamlessError, need_root
from seamless.lock import exclusive, held
from seamless.log import complete_step, count
from seamless.memstore import setup
from seamless.memstore.region import Region, find_region, memformat, memparse, parse_iomem
from seamless.memstore.store import (
    LABEL,
    MOUNTPOINT,
    format_store,
    is_dax,
    no_region_error,
    open_store,
    signature,
    wipe,
)
from seamless.run import run


def the_region() -> Region:
    region = find_region()
    if region is None:
        raise no_region_error()
    return region


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


@click.command("setup")
@click.option("--region", "size_text", metavar="SIZE",
              help="Size of the RAM region to reserve, e.g. 1G or 512M.")
@click.option("--undo", is_flag=True,
              help="Give the region back: remove the drop-in and run update-grub.")
@click.option("--dry-run", is_flag=True, help="Print what would be written; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def setup_command(size_text: str | None, undo: bool, dry_run: bool, as_json: bool) -> None:
    """Reserve a region of RAM for the store, from the next boot on.

    Chooses a free range of System RAM (aligned, above low memory, clear of the
    kernel) and adds memmap=SIZE!START to grub's kernel command line through a
    drop-in in /etc/default/grub.d/, then runs update-grub. With --undo, gives the
    region back from the next boot on (what purging the package does too).
    """
    if undo:
        _undo_setup(dry_run, as_json)
        return
    if size_text is None:
        raise click.UsageError("give the region's size with --region SIZE (or --undo)")
    size = memparse(size_text)
    if not dry_run:
        need_root("reserving a region")
    cmdline = Path("/proc/cmdline").read_text()
    existing = setup.existing_regions(cmdline)
    if existing:
        raise SeamlessError("a region is already reserved or configured: " + "; ".join(existing),
                            hint="seamless keeps one region; remove the old one first")
    arg = setup.choose_range(size, parse_iomem(Path("/proc/iomem").read_text()))
    config = setup.boot_config(arg)
    result = {"memmap": arg.text, "start": arg.start, "size": arg.size,
              "file": str(config.path), "then": config.then, "written": not dry_run}
    if dry_run:
        if as_json:
            echo_json({**result, "text": config.text})
        else:
            click.echo(f"would write {config.path}:\n{config.text}")
            click.echo(f"then run: {' '.join(config.then)}")
        return
    with complete_step(f"reserving {memformat(size)} at {arg.start:#x}"):
        config.path.parent.mkdir(parents=True, exist_ok=True)
        config.path.write_text(config.text)
        try:
            run(config.then)
        except SeamlessError:
            config.path.unlink()
            raise
    if as_json:
        echo_json(result)
    else:
        click.echo(f"{arg.text} added to the kernel command line ({config.path}).")
        click.echo("It takes effect at the next boot; then run `seamless store format`.")


def _undo_setup(dry_run: bool, as_json: bool) -> None:
    dropin = setup.GRUB_DROPIN
    if not dropin.exists():
        raise SeamlessError(f"no region to give back: {dropin} does not exist",
                            hint="a memmap= written elsewhere (/etc/default/grub) is the "
                            "operator's own: edit it there")
    then = [str(setup.UPDATE_GRUB)] if setup.UPDATE_GRUB.exists() else []
    if not dry_run:
        need_root("giving the region back")
        dropin.unlink()
        if then:
            run(then)
    if as_json:
        echo_json({"removed": str(dropin), "then": then, "written": not dry_run})
    else:
        click.echo(("would remove " if dry_run else "removed ") + f"{dropin}"
                   + (f" and run {' '.join(then)}" if then else "")
                   + ": the region is RAM again from the next boot on")


@click.group("store")
def store_group() -> None:
    """The store in the preserved region: format, status, verify, wipe."""


@store_group.command("format")
@click.option("--force", is_flag=True, help="Overwrite a device that holds other data.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@exclusive("seamless store format")
def format_command(force: bool, as_json: bool) -> None:
    """Make an empty store on the preserved region (its contents are lost)."""
    need_root("formatting the store")
    region = the_region()
    if region.device is None:
        open_store(region)  # raises the error that says why there is no device
        return
    with complete_step(f"formatting {region.device} as a store"):
        store = format_store(region.device, region, force=force)
    header = store.header()
    if as_json:
        echo_json({"device": str(region.device), "mountpoint": str(store.root),
                   "dax": header.dax, "uuid": header.uuid, "size": region.size})
    else:
        click.echo(f"store on {region.device} ({memformat(region.size)}) mounted at "
                   f"{store.root}, " + ("with DAX" if header.dax else "without DAX"))


@store_group.command("arm")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@exclusive("seamless store arm")
def arm_command(as_json: bool) -> None:
    """Make the store ready at boot (seamless-arm.service runs this).

    After a cold boot the region's RAM holds garbage: it is formatted. A store that
    opens is left as it is, with every generation in it; a region that carries the
    store's label but does not open, or another filesystem, is left for the operator
    (exit 4). Without a region there is nothing to do.
    """
    need_root("arming the store")
    region = find_region()
    done: dict[str, Any]
    if region is None or region.device is None:
        done = {"armed": False, "why": "no preserved region with a pmem device"}
    else:
        try:
            store = open_store(region)
            done = {"armed": True, "formatted": False,
                    "generations": [n for n, _ in store.generations()]}
        except SeamlessError as e:
            fstype, label = signature(region.device)
            if label == LABEL or fstype:
                raise SeamlessError(
                    f"{region.device} holds " + ("a store that does not open" if label == LABEL
                                                  else f"{fstype}") + f": {e.message}",
                    hint="nothing was changed; see seamless store verify, or format it by "
                    "hand (seamless store format) if nothing in it is wanted",
                    exit_code=ExitCode.CHECK_FAILED) from e
            with complete_step(f"formatting {region.device}: it holds no store (a cold boot)"):
                format_store(region.device, region)
            done = {"armed": True, "formatted": True, "generations": []}
    if as_json:
        echo_json(done)
    elif not done["armed"]:
        click.echo(f"nothing to arm: {done['why']}")
    else:
        click.echo("store ready" + (" (formatted: the region held no store)"
                                    if done["formatted"] else
                                    f", {count(len(done['generations']), 'generation')}"
                                    " kept"))


@store_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_command(as_json: bool) -> None:
    """The region, the store's space, and its generations."""
    need_root("reading the store")
    region = the_region()
    store = open_store(region)
    status: dict[str, Any] = {"region": region.to_json(), "dax": is_dax(store.root),
                              **store.status()}
    if as_json:
        echo_json(status)
        return
    click.echo(f"region    {region.memmap}  device {region.device}  "
               + ("reserved by the running kernel" if region.reserved_now else "NOT reserved"))
    click.echo(f"store     {store.root}  {'DAX' if status['dax'] else 'no DAX'}  "
               f"{status['used'] >> 20} MiB used, {status['free'] >> 20} MiB free "
               f"of {status['size'] >> 20} MiB")
    for g in status["generations"]:
        if "error" in g:
            click.echo(f"gen {g['number']:<5} DAMAGED: {g['error']}")
            continue
        trees = count(len(g["trees"]), "tree")
        click.echo(f"gen {g['number']:<5} {trees}, {g['bytes'] >> 20} MiB, "
                   f"from {g['source_release']} to {g['target_release'] or '?'}"
                   + (f"; kept for a retry until {when(g['kept_until'])}"
                      if g.get("kept_until") else ""))
    if not status["generations"]:
        click.echo("no generations")
    for p in status["partial"]:
        click.echo(f"incomplete: {p} (a checkpoint that did not finish)")


@store_group.command("verify")
@click.option("--generation", "number", type=int, default=None,
              help="Check only this generation (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(number: int | None, as_json: bool) -> None:
    """Check the geometry against the header and every file's checksum.

    Exits 0 when everything matches, 4 when anything is corrupt (each bad file is
    named).
    """
    need_root("verifying the store")
    store = open_store(the_region())  # checks the geometry
    gens = [store.generation(number)] if number is not None else store.generations()
    results: list[dict[str, Any]] = []
    for n, g in gens:
        with complete_step(f"verifying generation {n}"):
            try:
                bad = g.verify()
            except SeamlessError as e:
                bad = [f"manifest: {e.message}"]
        results.append({"generation": n, "ok": not bad, "bad": bad})
    if as_json:
        echo_json({"ok": all(r["ok"] for r in results), "generations": results})
    else:
        for r in results:
            click.echo(f"gen {r['generation']}: " + ("ok" if r["ok"] else "CORRUPT"))
            for name in r["bad"]:
                click.echo(f"  bad: {name}")
    if not all(r["ok"] for r in results):
        raise SeamlessError("the store is corrupt", exit_code=ExitCode.CHECK_FAILED)


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


@store_group.command("expire")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def expire_command(as_json: bool) -> None:
    """Overwrite the generations kept after a failed restore whose time is up.

    A generation whose restore failed is kept a day for a retry (seamless restore
    --generation N); it holds the processes' memory, and seamless-expire.timer runs
    this every hour. Without a store there is nothing to do.
    """
    need_root("expiring generations")
    region = find_region()
    expired: list[int] = []
    if region is not None and region.device is not None:
        try:
            store = open_store(region)
        except SeamlessError as e:  # no store to keep anything in: the timer is not failed
            click.echo(f"no usable store ({e.message}): nothing to expire", err=True)
        else:
            now = time.time()
            due = [n for n, _ in store.generations()
                   if (until := store.kept_until(n)) is not None and until <= now]
            if due:  # the lock only then: an hourly timer must not get in an upgrade's way
                try:
                    with held("seamless store expire"):
                        expired = store.expire(now)
                except SeamlessError as e:
                    click.echo(f"not now ({e.message}): the next run expires them", err=True)
    if as_json:
        echo_json({"expired": expired})
    elif expired:
        click.echo("overwritten: generation " + ", ".join(map(str, expired)))
    else:
        click.echo("no generation is due")


@store_group.command("wipe")
@click.option("--yes", is_flag=True, help="Do not ask.")
@exclusive("seamless store wipe")
def wipe_command(yes: bool) -> None:
    """Overwrite the whole region with zeros, leaving an empty store."""
    need_root("wiping the store")
    region = the_region()
    store = open_store(region)
    if not yes and store.generations():
        click.confirm(f"Erase {len(store.generations())} generations?", abort=True)
    assert region.device is not None  # open_store checked
    with complete_step(f"overwriting {region.device} ({memformat(region.size)}) with zeros"):
        wipe(store, region.device, region)
    click.echo(f"store on {region.device} wiped and empty")


__all__ = ["MOUNTPOINT", "setup_command", "store_group"]
