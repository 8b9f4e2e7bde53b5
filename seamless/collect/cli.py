"""Commands of the collect stage: ``seamless plan`` and ``seamless checkpoint``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import click

from seamless.collect.checkpoint import take_checkpoint
from seamless.collect.plan import StoreSpace, make_plan, render
from seamless.collect.processes import read_table
from seamless.collect.select import CONFIG_PATH, RULE_KINDS, Selection, load_config
from seamless.criu.modules import load_criu_modules
from seamless.errors import ExitCode, SeamlessError, need_root
from seamless.lock import exclusive
from seamless.log import complete_step, count, log
from seamless.memstore.generation import Generation
from seamless.memstore.store import Store, open_store


def space_for(directory: Path) -> StoreSpace:
    """How much the filesystem that will hold ``directory`` can take."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    return StoreSpace(device=str(probe), free=st.f_bavail * st.f_frsize)


def store_space() -> StoreSpace:
    """How much the store in the preserved region can take (or why it cannot)."""
    try:
        store = open_store()
    except SeamlessError as e:
        return StoreSpace(None, None, e.format_message().replace("\n", "; "))
    return StoreSpace(device=str(store.root), free=store.free())


def selection_options(f: Callable[..., object]) -> Callable[..., object]:
    kinds = "|".join(RULE_KINDS)
    f = click.option("--include", "includes", multiple=True, metavar=f"{kinds}:VALUE",
                     help="Checkpoint only trees whose root matches (repeatable).")(f)
    f = click.option("--exclude", "excludes", multiple=True, metavar=f"{kinds}:VALUE",
                     help="Leave out trees whose root matches (repeatable).")(f)
    f = click.option("--config", "config_path", type=click.Path(path_type=Path),
                     default=CONFIG_PATH, show_default=True,
                     help="Config file with a [select] table of include/exclude rules.")(f)
    return f


#: ``--pre-dump/--no-pre-dump``: default None, decided by the room in the store.
pre_dump_option = click.option(
    "--pre-dump/--no-pre-dump", "pre_dump", default=None,
    help="Copy the memory while the processes run, so the frozen dump writes only what "
    "changed since (default: when the store has room for it).")


def selection_from(includes: tuple[str, ...], excludes: tuple[str, ...],
                   config_path: Path) -> Selection:
    return load_config(config_path).merged(Selection.from_texts(includes, excludes))


IMAGES_HELP = ("Write the checkpoint into this new directory instead of a new generation "
               "of the store.")


@click.command("plan")
@selection_options
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Plan against the free space where these images would go "
              "(default: the store).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
def plan_command(includes: tuple[str, ...], excludes: tuple[str, ...], config_path: Path,
                 images_dir: Path | None, as_json: bool) -> int:
    """Show what a checkpoint would take, and what would block it. Freezes nothing.

    Exits 4 when anything would block the checkpoint.
    """
    selection = selection_from(includes, excludes, config_path)
    space = space_for(images_dir) if images_dir else store_space()
    plan = make_plan(read_table(), selection, space)
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2))
    else:
        click.echo(render(plan))
    return int(ExitCode.OK if plan.ok else ExitCode.CHECK_FAILED)


@click.command("checkpoint")
@selection_options
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help=IMAGES_HELP)
@click.option("--target-release", default=None, hidden=True,
              help="The kernel the checkpoint is for (recorded in the manifest).")
@click.option("--leave-running", is_flag=True,
              help="Thaw the trees after the checkpoint (otherwise they end: the images "
              "are all that is left of them).")
@pre_dump_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@exclusive("seamless checkpoint")
def checkpoint_command(includes: tuple[str, ...], excludes: tuple[str, ...], config_path: Path,
                       images_dir: Path | None, target_release: str | None,
                       leave_running: bool, pre_dump: bool | None, as_json: bool) -> None:
    """Checkpoint every selected process tree into a new generation of the store.

    Every tree is dumped and held frozen until all are dumped and the images are
    checksummed and read back; then the trees are thawed (--leave-running) or
    ended. Any failure before that thaws every tree and leaves no images
    behind (exit 1: nothing changed).
    """
    need_root("checkpointing processes")
    selection = selection_from(includes, excludes, config_path)
    os.umask(0o077)  # images hold process memory: CRIU's files are root-only too
    number = 0
    if images_dir is None:
        store: Store = open_store()
        number, images = store.new_generation()
        space = StoreSpace(device=str(store.root), free=store.free())
    else:
        images = Generation(images_dir.absolute())
        space = space_for(images.final)
    with complete_step("planning"):
        plan = make_plan(read_table(), selection, space)
    if not plan.ok:
        click.echo(render(plan), err=True)
        raise SeamlessError("the checkpoint would not succeed; nothing was frozen",
                            hint="see the problems above (seamless plan shows them too)")
    load_criu_modules()
    start = time.monotonic()
    held, manifest = take_checkpoint(plan.trees, images, number, leave_running=leave_running,
                                     target_release=target_release, pre_dump=pre_dump)
    with complete_step("thawing the trees" if leave_running else "ending the dumped trees"):
        held.release()
    trees = [{
        "root": d.tree.root.pid, "command": d.tree.root.command,
        "processes": len(d.tree.members), "bytes": d.bytes_written,
        "dump_seconds": d.dump_seconds, "freeze_seconds": d.freeze_seconds,
    } for d in held.dumps]
    result = {
        "images": str(images.final),
        "generation": number or None,
        "leave_running": leave_running,
        "trees": trees,
        "bytes": held.total_bytes,
        "files": len(manifest.files),
        "seconds": time.monotonic() - start,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for d in held.dumps:
            click.echo(f"{d.tree.root.pid:>7}  {d.tree.root.command[:40]:<40}  "
                       f"{d.bytes_written / 2**20:8.1f} MiB  dump {d.dump_seconds or 0:.2f} s  "
                       f"frozen {d.freeze_seconds or 0:.2f} s")
        click.echo(f"checkpoint of {count(len(held.dumps), 'tree')} in {images.final}: "
                   f"{held.total_bytes / 2**20:.1f} MiB, {result['seconds']:.1f} s")
    log.debug("checkpoint done: %s", result)
