"""The ``seamless`` command line."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from seamless import __version__, stop
from seamless.entry import guarded
from seamless.errors import ExitCode, SeamlessError
from seamless.log import log_to_journal, setup_logging

EXIT_CODES_HELP = """\b
Exit codes:
  0  done
  1  error, nothing was changed
  2  usage error
  3  failed after something was changed (the message says what state the system is in)
  4  a check found a problem (nothing was changed)
  130  interrupted (Ctrl-C, SIGTERM, a hangup): everything was put back first
"""


#: Each command's module and name in it. A stage's command lives in its package.
COMMANDS = {
    "setup": "seamless.memstore.cli:setup_command",
    "store": "seamless.memstore.cli:store_group",
    "plan": "seamless.collect.cli:plan_command",
    "checkpoint": "seamless.collect.cli:checkpoint_command",
    "install-restorer": "seamless.restore.cli:install_restorer_command",
    "restore": "seamless.restore.cli:restore_command",
    "kexec": "seamless.kexec.cli:kexec_command",
    "kernel-check": "seamless.kexec.check:kernel_check_command",
    "status": "seamless.restore.cli:status_command",
    "upgrade": "seamless.upgrade:upgrade_command",
}


#: The commands that change something: what they do reaches the journal of the boot it
#: belongs to too (an upgrade's steps in the old kernel's, a restore in the new one's).
JOURNALED = frozenset({"setup", "store", "checkpoint", "restore", "kexec", "upgrade"})


class Reported(SeamlessError, click.ClickException):  # type: ignore[misc]  # both set message
    """A :class:`SeamlessError` on its way through click, which shows and exits with its
    own exceptions only: the same message, hint and exit code (``error``: the one
    raised)."""

    def __init__(self, error: SeamlessError) -> None:
        super().__init__(error.message, hint=error.hint, exit_code=error.status)
        self.error = error
        # click declares it a class constant, and reads it from the instance
        self.exit_code = error.status  # type: ignore[misc]


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command runs (or help
    lists it): the boot-time restorer then loads the restore stage alone, which saves
    seconds of its start under TCG."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        module, name = COMMANDS[cmd_name].split(":")
        command = getattr(importlib.import_module(module), name)
        if not isinstance(command, click.Command):
            raise TypeError(f"{COMMANDS[cmd_name]} is not a click command")
        self.add_command(command, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SeamlessError as e:
            raise Reported(e) from e


@click.group(cls=LazyGroup, epilog=EXIT_CODES_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="seamless")
@click.option("--debug", is_flag=True, help="Log every step and command; show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Upgrade the running kernel without losing the running programs.

    seamless checkpoints every user process with CRIU into a RAM region that
    survives kexec, boots the new kernel, and restores the processes there with
    the same PIDs and memory.
    """
    setup_logging(debug)
    if ctx.invoked_subcommand in JOURNALED:
        log_to_journal()
    ctx.obj = {"debug": debug}


def main() -> None:
    """Every command but the boot's restore (see :mod:`seamless.entry`)."""
    rv = guarded(_click_main, "--debug" in sys.argv[1:])
    sys.exit(rv if isinstance(rv, int) else ExitCode.OK)


def _click_main() -> object:
    try:
        return cli.main(standalone_mode=False)
    except click.exceptions.Abort as e:  # click's for Ctrl-C (and stop.Terminated)
        if isinstance(e.__cause__, stop.Terminated):
            raise e.__cause__ from None
        raise KeyboardInterrupt from None
    except Reported as e:
        raise e.error from None
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)

if __name__ == "__main__":
    main()
