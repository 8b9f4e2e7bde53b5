from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from seamless import __version__
from seamless.cli import COMMANDS, cli, main
from seamless.errors import ExitCode, SeamlessError


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_exit_codes_and_debug() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "--debug" in result.output
    assert "Exit codes" in result.output


def test_every_command_loads_under_its_name() -> None:
    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
    assert cli.get_command(ctx, "no-such-command") is None


def test_a_command_imports_its_stage_alone() -> None:
    """The boot-time restorer (seamless restore --boot) starts without the checkpoint,
    kexec and upgrade modules, nor importlib.metadata, nor psutil (needed only by a
    retry, a lazy restore's end and a TCP tree's addresses): seconds under TCG."""
    code = ("import sys; from seamless.cli import main; sys.argv = ['seamless', 'restore', "
            "'--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    loaded = set(out.stdout.split())
    assert "seamless.restore.cli" in loaded
    assert not loaded & {"seamless.collect.checkpoint", "seamless.collect.cli",
                         "seamless.kexec.cli", "seamless.upgrade", "importlib.metadata",
                         "psutil"}


def test_installed_command_runs() -> None:
    """`pip install .` put a working entry point on the path (python -m seamless)."""
    out = subprocess.run(
        [sys.executable, "-m", "seamless", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("seamless, version ")


def test_user_error_is_one_line_with_hint_and_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @cli.command("fail-for-test")
    def fail() -> None:
        raise SeamlessError("no region", hint="run seamless setup", exit_code=ExitCode.CHANGED)

    try:
        monkeypatch.setattr(sys, "argv", ["seamless", "fail-for-test"])
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        cli.commands.pop("fail-for-test")
    assert exc.value.code == ExitCode.CHANGED
    err = capsys.readouterr().err
    assert "seamless: error: no region" in err
    assert "hint: run seamless setup" in err
    assert "Traceback" not in err


def test_usage_error_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["seamless", "no-such-command"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == ExitCode.USAGE


def test_a_seamless_error_reaches_click_with_its_message_and_exit_code() -> None:
    @cli.command("fail-in-click-for-test")
    def fail() -> None:
        raise SeamlessError("no region", hint="run seamless setup", exit_code=ExitCode.CHANGED)

    try:
        result = CliRunner().invoke(cli, ["fail-in-click-for-test"])
    finally:
        cli.commands.pop("fail-in-click-for-test")
    assert result.exit_code == ExitCode.CHANGED
    assert "seamless: error: no region\nhint: run seamless setup" in result.output


def test_the_boot_restore_starts_without_click() -> None:
    """The hooks' `seamless restore --boot` is parsed without click and the command
    line's modules: a tenth of the restorer's imports, seconds of the blackout under
    TCG. (A usage error stops it before the restore; then the restore's modules.)"""
    code = ("import sys; from seamless.entry import main; sys.argv = ['seamless', '--debug', "
            "'restore', '--boot', '--bogus']\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print(e.code)\nimport seamless.restore.boot, seamless.log\n"
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    code_line, modules = out.stdout.splitlines()
    assert code_line == str(int(ExitCode.USAGE)), out.stderr
    assert "--bogus" in out.stderr
    loaded = set(modules.split())
    assert {"seamless.entry", "seamless.restore.boot"} <= loaded
    assert not {m for m in loaded if m == "click" or m.startswith("click.")}
    assert "seamless.cli" not in loaded
