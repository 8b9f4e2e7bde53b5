"""Commands of the restore stage."""

from __future__ import annotations

import json
import os

import click

from seamless.errors import SeamlessError
from seamless.log import complete_step
from seamless.restore import boothooks


@click.command("install-restorer")
@click.option("--rebuild", "releases", multiple=True, metavar="RELEASE",
              help="Also rebuild /boot/initrd.img-RELEASE with the restorer (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def install_restorer_command(releases: tuple[str, ...], as_json: bool) -> None:
    """Install the boot-time restorer into dracut and/or initramfs-tools.

    Every initramfs built afterwards carries it, including the one a kernel
    package builds on upgrade.
    """
    if os.geteuid() != 0:
        raise SeamlessError("installing the restorer needs root", hint="run it with sudo")
    with complete_step("installing the boot-time restorer"):
        done = boothooks.install()
    rebuilt = []
    for release in releases:
        with complete_step(f"rebuilding the initramfs of {release}"):
            rebuilt.append(str(boothooks.rebuild(release)))
    result = {
        "dracut": str(done.dracut) if done.dracut else None,
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
