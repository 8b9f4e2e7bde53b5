"""The ``seamless`` command's entry point, without click.

Every command goes to :mod:`seamless.cli` (click), except the boot's own restore: the
initramfs and seamless-restore.service run ``seamless [--debug] restore --boot
[--generation N] [--keep] [--json]``, and that call is parsed here. The restorer then
starts without click and the command line's modules: about a tenth of its imports,
which under TCG is a share of the blackout (issue 23's restorer start).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from seamless import stop
from seamless.errors import ExitCode, SeamlessError

BOOT = ("restore", "--boot")


def boot_arguments(args: Sequence[str]) -> tuple[int | None, bool, bool]:
    """``--generation N``, ``--keep`` and ``--json`` after ``restore --boot``, in any
    order; a :class:`SeamlessError` (usage) for anything else."""
    number, keep, as_json = None, False, False
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--keep":
            keep = True
        elif arg == "--json":
            as_json = True
        elif arg == "--generation" or arg.startswith("--generation="):
            value = arg.partition("=")[2] if "=" in arg else (rest.pop(0) if rest else "")
            if not value.isdigit():
                raise SeamlessError(f"--generation takes a number, not {value!r}",
                                    exit_code=ExitCode.USAGE)
            number = int(value)
        else:
            raise SeamlessError(f"restore --boot: no such option {arg!r}",
                                hint="the boot's restore takes --generation N, --keep, --json",
                                exit_code=ExitCode.USAGE)
    return number, keep, as_json


def interrupted(text: str) -> None:
    """Ctrl-C or SIGTERM: say so, to the journal as well, and exit 130."""
    from seamless.log import journal_only

    journal_only(logging.WARNING, text)
    print(text, file=sys.stderr, flush=True)
    sys.exit(ExitCode.INTERRUPTED)


def failed(error: SeamlessError, debug: bool) -> None:
    """An error the operator acts on: one line (a traceback with ``--debug``), to the
    journal as well, and its exit code."""
    from seamless.log import journal_only, log

    if debug:
        log.exception("traceback")
    journal_only(logging.ERROR, f"Error: {error.message}")
    error.show()
    sys.exit(error.status)


def guarded(work: Callable[[], object], debug: bool) -> object:
    """Run ``work`` with SIGTERM and SIGHUP stopping it as Ctrl-C does, and turn what
    stops it into its message and exit code."""
    stop.install()  # SIGTERM and SIGHUP stop it as Ctrl-C does: everything put back
    try:
        return work()
    except stop.Terminated as e:
        interrupted(f"Interrupted: {e}")
    except KeyboardInterrupt:
        interrupted("Interrupted")
    except SeamlessError as e:
        failed(e, debug)
    return None


def boot_restore(args: Sequence[str], debug: bool) -> None:
    """``seamless restore --boot ARGS``: what seamless.cli's restore command does with
    ``--boot``, from the hooks, without click."""
    from seamless.errors import need_root
    from seamless.log import log_to_journal, setup_logging
    from seamless.restore.boot import boot_command

    def work() -> None:
        setup_logging(debug)
        number, keep, as_json = boot_arguments(args)
        log_to_journal()
        need_root("restoring processes")
        boot_command(number, keep=keep, as_json=as_json)

    guarded(work, debug)
    sys.exit(ExitCode.OK)


def main() -> None:
    args = sys.argv[1:]
    debug = args[:1] == ["--debug"]
    if tuple(args[debug:debug + 2]) == BOOT:
        boot_restore(args[debug + 2:], debug)
    from seamless.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
