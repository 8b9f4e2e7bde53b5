"""``seamless kernel-check RELEASE``: will ``seamless upgrade --kernel`` work with this
installed kernel? Run for each new kernel by the package's /etc/kernel/postinst.d hook;
it changes nothing and says so in one line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from seamless.criu import Criu, kernels
from seamless.errors import ExitCode, SeamlessError
from seamless.kexec import initrd
from seamless.kexec.image import KernelImage, kexec_policy


def problems(release: str, boot: Path = Path("/boot")) -> list[str]:
    """What would stop an upgrade to ``release`` (empty: nothing known)."""
    found: list[str] = []
    kernel = boot / f"vmlinuz-{release}"
    try:
        KernelImage.read(kernel)
    except SeamlessError as e:
        return [f"its kernel image: {e.message}"]
    path = boot / f"initrd.img-{release}"
    if not path.is_file():
        found.append(f"{path} is not built yet (apt builds it at the end: check again then)")
    else:
        try:
            if not initrd.check_restorer(path, release):
                found.append(f"{path} lacks the restorer (the upgrade rebuilds it, or: "
                             f"seamless install-restorer --rebuild {release})")
        except SeamlessError as e:
            found.append(e.message)
    try:
        why = kernels.unsupported(Criu().version(), release)
    except SeamlessError:  # no CRIU to ask: the upgrade's preflight says why
        why = None
    if why is not None:
        found.append(why)
    return found


@click.command("kernel-check")
@click.argument("release")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def kernel_check_command(ctx: click.Context, release: str, as_json: bool) -> None:
    """Say whether `seamless upgrade --kernel /boot/vmlinuz-RELEASE` would work; change
    nothing. Exits 0 when nothing stands in the way, 4 otherwise."""
    found = problems(release)
    policy = kexec_policy()
    note = ("only signed kernels can be loaded here: use the distribution's signed image"
            if policy.signature_enforced else None)
    if as_json:
        click.echo(json.dumps({"release": release, "ok": not found, "problems": found,
                               "signature_enforced": policy.signature_enforced}, indent=2))
    elif found:
        click.echo(f"seamless: {release}: NOT ready for seamless upgrade: {'; '.join(found)}")
    else:
        click.echo(f"seamless: {release}: ready for seamless upgrade"
                   + (f" ({note})" if note else ""))
    if found:
        ctx.exit(ExitCode.CHECK_FAILED)
