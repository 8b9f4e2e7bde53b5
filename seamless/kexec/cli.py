"""The ``seamless kexec`` command: validate, load and enter the target kernel."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from seamless.errors import ExitCode, SeamlessError, need_root
from seamless.kexec import cmdline, initrd, loader
from seamless.kexec.image import KernelImage, KexecPolicy, kexec_policy
from seamless.lock import exclusive
from seamless.log import complete_step, log
from seamless.memstore import handoff

if TYPE_CHECKING:
    from seamless.memstore.region import Region


def find_region() -> Region | None:
    """The store's region (imported when needed: memstore loads its own dependencies)."""
    from seamless.memstore import region

    return region.find_region(load=False)


def store_root(region: Region) -> Path:
    from seamless.memstore.store import open_store

    return open_store(region).root


def record_for(region: Region, number: int) -> handoff.UpgradeRecord:
    """The upgrade record of a kexec that restores generation ``number`` (its token is
    set by the caller)."""
    from seamless.memstore.store import open_store

    manifest = open_store(region).generation(number)[1].manifest()
    return handoff.UpgradeRecord(
        generation=number, token_sha256="", source_boot_id=manifest.source_boot_id,
        machine_id=handoff.machine_id(), source_release=os.uname().release)


def last_pid_of(region: Region, number: int) -> int:
    """The PID the new kernel must start above: the generation's highest, plus room."""
    from seamless.memstore.store import open_store

    manifest = open_store(region).generation(number)[1].manifest()
    pids = [p for t in manifest.trees for p in (t.pids or [t.root])]
    return max(pids, default=0) + cmdline.PID_MARGIN


@click.command("kexec")
@click.option("--kernel", type=click.Path(path_type=Path), metavar="PATH",
              help="The kernel to boot (a bzImage, e.g. /boot/vmlinuz-RELEASE).")
@click.option("--initrd", "initrd_path", type=click.Path(path_type=Path), metavar="PATH",
              help="Its initramfs (default /boot/initrd.img-RELEASE).")
@click.option("--append", metavar="ARGS",
              help="Arguments to add to the running kernel's command line.")
@click.option("--cmdline", "replace", metavar="ARGS",
              help="The whole new command line, instead of the running one.")
@click.option("--rebuild-initrd", is_flag=True,
              help="Rebuild /boot/initrd.img-RELEASE with the restorer even if it has it.")
@click.option("--dry-run", is_flag=True,
              help="Check everything and load the kernel, then unload it again.")
@click.option("--unload", "unload_only", is_flag=True, help="Unload a loaded kernel, and stop.")
@click.option("--restore-generation", type=click.IntRange(min=0), hidden=True,
              help="Restore this store generation in the new kernel (used by upgrade).")
@click.option("--yes", is_flag=True, help="Do not ask before rebooting into the kernel.")
@click.option("--json", "as_json", is_flag=True, help="Print what is (or would be) done as JSON.")
@exclusive("seamless kexec")
def kexec_command(
    kernel: Path | None,
    initrd_path: Path | None,
    append: str | None,
    replace: str | None,
    rebuild_initrd: bool,
    dry_run: bool,
    unload_only: bool,
    restore_generation: int | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Boot another kernel with kexec, keeping the preserved region.

    Checks the kernel image, its initramfs (rebuilt when it lacks the restorer)
    and the new command line, which must reserve the store's region exactly as
    the running one does; then loads the kernel with kexec_file_load, syncs,
    remounts the disks read-only and reboots into it. Services are not stopped:
    processes not checkpointed by `seamless upgrade` are lost.
    """
    need_root("kexec")
    if unload_only:
        with complete_step("unloading the kexec kernel"):
            loader.unload()
        _print({"unloaded": True}, as_json, ["kexec kernel unloaded"])
        return
    if kernel is None:
        raise click.UsageError("give the kernel to boot with --kernel PATH (or --unload)")
    if append is not None and replace is not None:
        raise click.UsageError("--append and --cmdline exclude each other")

    with complete_step(f"checking the kernel image {kernel}"):
        image = KernelImage.read(kernel)
    log.info("target kernel: %s (boot protocol %s)", image.release, image.protocol_str)
    policy = check_policy()

    region = find_region()
    if region is None:
        raise SeamlessError("no preserved region is set up: the new kernel would get no store",
                            hint="run `seamless setup --region SIZE` first")
    if restore_generation is not None and not region.reserved_now:
        raise SeamlessError(
            f"the running kernel has not reserved the region {region.memmap}: it holds no "
            "checkpoint to restore", hint="reboot once with it (seamless setup), then upgrade")
    new_cmdline, record = command_line(image, region, append, replace, restore_generation)

    initrd_used, rebuilt = prepare_initrd(image, initrd_path, rebuild_initrd, dry_run)

    was_loaded = loader.loaded()
    with complete_step(f"loading {image.release} with kexec_file_load"):
        loader.load(image.path, initrd_used, new_cmdline)
    result: dict[str, Any] = {
        "kernel": str(image.path),
        "release": image.release,
        "protocol": image.protocol_str,
        "initrd": str(initrd_used),
        "initrd_rebuilt": rebuilt,
        "cmdline": new_cmdline,
        "region": region.memmap,
        "restore_generation": restore_generation,
        "lockdown": policy.lockdown,
        "signature_enforced": policy.signature_enforced,
        "dry_run": dry_run,
    }
    lines = [
        f"kernel:  {image.path} ({image.release}, boot protocol {image.protocol_str})",
        f"initrd:  {initrd_used}" + (" (rebuilt with the restorer)" if rebuilt else ""),
        f"cmdline: {new_cmdline}",
    ]
    if dry_run:
        with complete_step("unloading it again (dry run)"):
            loader.unload()
        if was_loaded:
            log.warning("the kernel loaded before this dry run was unloaded too")
        _print(result, as_json, [*lines, "dry run: the kernel loaded and was unloaded again"])
        return
    if not yes and not click.confirm(
        f"Reboot into {image.release} now? Processes not checkpointed are lost", err=True
    ):
        loader.unload()
        raise SeamlessError("not rebooting: the kernel was unloaded again",
                            exit_code=ExitCode.UNCHANGED)
    _print(result, as_json, [*lines, f"entering {image.release}"])
    sys.stdout.flush()
    enter(image, region, record)


def command_line(image: KernelImage, region: Region, append: str | None, replace: str | None,
                 restore_generation: int | None) -> tuple[str, handoff.UpgradeRecord | None]:
    """The new kernel's command line, checked; with ``restore_generation``, the upgrade
    record that its one-time token proves (written just before the kexec)."""
    args = cmdline.build(cmdline.running_cmdline(), append=append, replace=replace)
    record = None if restore_generation is None else record_for(region, restore_generation)
    token = handoff.new_token() if record is not None else None
    if record is not None and token is not None:
        record.token_sha256 = handoff.digest(token)
        record.target_release = image.release
    args = cmdline.with_restore(args, restore_generation,
                                None if restore_generation is None
                                else last_pid_of(region, restore_generation), token)
    cmdline.require_region(args, region.memmap)
    new_cmdline = cmdline.join(args)
    cmdline.check_length(new_cmdline, image.max_cmdline)
    return new_cmdline, record


def enter(image: KernelImage, region: Region, record: handoff.UpgradeRecord | None) -> None:
    """Enter the loaded kernel; the record, when there is one, is in the store meanwhile."""
    with complete_step(f"entering {image.release}"):
        if record is not None:  # the new boot's proof that it may restore the generation
            record.times["entering"] = time.time()
            handoff.write(store_root(region), record)
        try:
            loader.enter()
        except BaseException:
            if record is not None:
                handoff.remove(store_root(region))
            raise


def check_policy() -> KexecPolicy:
    policy = kexec_policy()
    log.info("lockdown: %s", policy.lockdown or "unknown (securityfs not mounted?)")
    if policy.load_disabled:
        raise SeamlessError(
            "kexec is disabled on this kernel (kernel.kexec_load_disabled = 1)",
            hint="it stays disabled until a normal reboot; reboot normally into the new kernel",
        )
    if policy.signature_enforced:
        log.info("only signed kernels can be loaded (%s): the image must be signed with a "
                 "key the running kernel trusts", ", ".join(policy.reasons))
    return policy


def prepare_initrd(
    image: KernelImage, given: Path | None, rebuild: bool, dry_run: bool
) -> tuple[Path, bool]:
    """The initramfs to load (checked to carry the restorer), and whether it was rebuilt."""
    default = initrd.default_initrd(image.release)
    path = given or default
    if rebuild and path != default:
        raise click.UsageError(f"--rebuild-initrd rebuilds {default}; it excludes --initrd")
    if not rebuild:
        with complete_step(f"looking for the restorer in {path}"):
            rebuild = not initrd.check_restorer(path, image.release)
        if rebuild and path != default:
            raise SeamlessError(
                f"{path} lacks the boot-time restorer",
                hint=f"leave out --initrd to use (and rebuild) {default}, or rebuild this one "
                "after `seamless install-restorer`")
        if rebuild:
            log.info("%s lacks the boot-time restorer", path)
    if rebuild and dry_run:
        initrd.check_readable(path, image.release)
        log.info("dry run: would rebuild %s with the restorer; loading it as it is", path)
        return path, False
    if rebuild:
        with complete_step(f"rebuilding {path} with the restorer"):
            path = initrd.rebuild(image.release)
        initrd.check_store_modules(path, image.release)
    return path, rebuild


def _print(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for line in lines:
            click.echo(line)
