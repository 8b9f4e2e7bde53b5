"""The ``seamless`` command line."""

from __future__ import annotations

import sys

import click

from seamless import __version__
from seamless.errors import ExitCode, SeamlessError
from seamless.log import log, setup_logging

EXIT_CODES_HELP = """\b
Exit codes:
  0  done
  1  error, nothing was changed
  2  usage error
  3  failed after something was changed (the message says what state the system is in)
  4  a check found a problem (nothing was changed)
"""


@click.group(epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
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
    ctx.obj = {"debug": debug}


# The stages' commands (each stage keeps its own in its package).
from seamless.collect.cli import checkpoint_command, plan_command  # noqa: E402
from seamless.kexec.cli import kexec_command  # noqa: E402
from seamless.memstore.cli import setup_command, store_group  # noqa: E402
from seamless.restore.cli import (  # noqa: E402
    install_restorer_command,
    restore_command,
    status_command,
)

cli.add_command(setup_command)
cli.add_command(store_group)
cli.add_command(plan_command)
cli.add_command(checkpoint_command)
cli.add_command(install_restorer_command)
cli.add_command(restore_command)
cli.add_command(kexec_command)
cli.add_command(status_command)

from seamless.upgrade import upgrade_command  # noqa: E402

cli.add_command(upgrade_command)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        rv = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("Interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except SeamlessError as e:
        if debug:
            log.exception("traceback")
        e.show()
        sys.exit(e.status)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else ExitCode.OK)


if __name__ == "__main__":
    main()
