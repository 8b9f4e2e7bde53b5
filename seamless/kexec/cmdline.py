"""The target kernel's command line.

By default it is the running one minus the arguments that only made sense for
this boot, plus what the operator appends.  It must carry the preserved
region's ``memmap=SIZE!OFFSET`` unchanged: the new kernel is not told about the
region any other way, and would otherwise use that RAM as its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from seamless.errors import ExitCode, SeamlessError

#: Arguments for one boot only: the boot loader's, and seamless' own.
ONE_SHOT_PREFIXES = ("BOOT_IMAGE=", "initrd=", "seamless.")
RESTORE_ARG = "seamless.restore="
LAST_PID_ARG = "seamless.last_pid="
TOKEN_ARG = "seamless.token="
#: Some trees cannot be restored before init: the initramfs leaves them all to
#: seamless-restore.service, without starting a restorer to find that out.
AFTER_INIT_ARG = "seamless.after_init"
#: Seconds a panicking new kernel waits before it resets the machine.
PANIC_REBOOT = "panic=10"
#: Room above the highest checkpointed PID for children forked before the freeze.
PID_MARGIN = 4096
PROC_CMDLINE = Path("/proc/cmdline")


def split(cmdline: str) -> list[str]:
    """Split on whitespace outside double quotes, keeping the quotes (as the kernel does)."""
    args: list[str] = []
    current: list[str] = []
    quoted = False
    for c in cmdline:
        if c == '"':
            quoted = not quoted
        if c.isspace() and not quoted:
            if current:
                args.append("".join(current))
                current = []
            continue
        current.append(c)
    if current:
        args.append("".join(current))
    return args


def join(args: Iterable[str]) -> str:
    return " ".join(args)


def _strip_one_shot(args: Sequence[str]) -> list[str]:
    """Drop one-shot arguments; those after ``--`` belong to init and are kept."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        if not arg.startswith(ONE_SHOT_PREFIXES):
            out.append(arg)
    return out


def build(
    running: str, *, append: str | None = None, replace: str | None = None
) -> list[str]:
    """The new kernel's arguments: ``replace`` as given, or ``running`` cleaned plus ``append``."""
    if replace is not None:
        return split(replace)
    return _strip_one_shot(split(running)) + split(append or "")


def running_cmdline(path: Path | None = None) -> str:
    return (path or PROC_CMDLINE).read_text().strip()


def with_restore(args: Sequence[str], generation: int | None,
                 last_pid: int | None = None, token: str | None = None, *,
                 after_init: bool = False) -> list[str]:
    """``args`` with ``seamless.restore=GENERATION`` (or with none, for a plain kexec),
    ``seamless.last_pid=N`` (the initramfs keeps PIDs up to N free for the restore),
    ``seamless.token=`` (the one-time proof that this boot is the upgrade's: see
    :mod:`seamless.memstore.handoff`), ``seamless.after_init`` when ``after_init``
    (the restore waits for seamless-restore.service), and ``panic=10`` unless a panic=
    is there.

    seamless owns these arguments: any given by the operator is replaced.
    """
    kept = [a for a in args if not a.startswith((RESTORE_ARG, LAST_PID_ARG, TOKEN_ARG))
            and a != AFTER_INIT_ARG]
    if generation is None:
        return kept
    if not any(a.startswith("panic=") for a in _kernel_args(kept)):
        # A new kernel that panics resets the machine through the firmware rather than
        # hang: the boot loader's default comes up, without the token, and restores
        # nothing (the operator's own panic= is kept).
        kept = _insert_before_init_args(kept, PANIC_REBOOT)
    kept = _insert_before_init_args(kept, f"{RESTORE_ARG}{generation}")
    if last_pid is not None:
        kept = _insert_before_init_args(kept, f"{LAST_PID_ARG}{last_pid}")
    if token is not None:
        kept = _insert_before_init_args(kept, f"{TOKEN_ARG}{token}")
    if after_init:
        kept = _insert_before_init_args(kept, AFTER_INIT_ARG)
    return kept


def _insert_before_init_args(args: list[str], arg: str) -> list[str]:
    if "--" in args:
        i = args.index("--")
        return args[:i] + [arg] + args[i:]
    return args + [arg]


def _kernel_args(args: Sequence[str]) -> list[str]:
    return list(args[: args.index("--")]) if "--" in args else list(args)


def require_region(args: Sequence[str], memmap: str) -> None:
    """Refuse unless ``memmap`` (e.g. ``memmap=256M!1G``) is there, and no other region is."""
    kernel_args = _kernel_args(args)
    others = [a for a in kernel_args if a.startswith("memmap=") and "!" in a and a != memmap]
    if others:
        raise SeamlessError(
            f"the new command line reserves another region ({' '.join(others)}) than the "
            f"store's ({memmap})",
            hint=f"remove {' '.join(others)}; the new kernel must reserve exactly {memmap}",
            exit_code=ExitCode.UNCHANGED,
        )
    if memmap not in kernel_args:
        raise SeamlessError(
            f"the new command line lacks the preserved region's {memmap}: the new kernel "
            "would use that RAM as its own",
            hint=f"add it: --append '{memmap}' (or put it in --cmdline)",
            exit_code=ExitCode.UNCHANGED,
        )


def check_length(cmdline: str, limit: int) -> None:
    if len(cmdline.encode()) > limit:
        raise SeamlessError(
            f"the new command line is {len(cmdline.encode())} bytes; the kernel takes at "
            f"most {limit}",
            hint="drop arguments with --cmdline",
        )
