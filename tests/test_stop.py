"""SIGTERM and SIGHUP stop a command as Ctrl-C does, never halfway through putting
things back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from seamless import stop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """stop's handlers installed in this process; the terminal is never detached."""
    detached: list[str] = []
    monkeypatch.setattr(stop, "_detach_terminal", lambda: detached.append("detached"))
    saved = {sig: signal.getsignal(sig) for sig in stop.SIGNALS}
    stop.reset()
    stop.install()
    yield detached
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    stop.reset()


def test_sigterm_and_sighup_stop_as_ctrl_c_does(handlers: list[str]) -> None:
    with pytest.raises(stop.Terminated, match="stopped by SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # let the handler run here
    stop.reset()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGHUP)
        signal.sigtimedwait([], 0)
    assert handlers == ["detached"]  # the hung-up terminal is written to no more


def test_a_signal_waits_until_things_are_put_back_and_a_second_is_only_noted(
        handlers: list[str]) -> None:
    put_back = []
    with pytest.raises(stop.Terminated, match="SIGTERM"):
        with stop.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            with stop.critical():  # nested: one block
                os.kill(os.getpid(), signal.SIGINT)
                put_back.append("thawed")
            put_back.append("unloaded")
    assert put_back == ["thawed", "unloaded"]
    # stopping now: another signal does not interrupt what the stop runs
    os.kill(os.getpid(), signal.SIGTERM)
    put_back.append("wiped")
    assert put_back[-1] == "wiped"


def test_a_command_killed_by_sigterm_says_so_and_exits_130(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import os, signal, sys, time
        from seamless import stop
        from seamless.cli import main
        import seamless.cli
        import click

        @click.command("wait")
        def wait() -> None:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                with stop.critical():
                    os.kill(os.getpid(), signal.SIGTERM)  # a second one, while putting back
                    print("put back", flush=True)

        seamless.cli.cli.add_command(wait)
        sys.argv = ["seamless", "wait"]
        main()
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 130, done.stderr
    assert done.stdout == "put back\n"
    assert "Interrupted: stopped by SIGTERM" in done.stderr
