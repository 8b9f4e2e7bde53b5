"""Fault injection acts only where and how a test asks."""

from __future__ import annotations

from pathlib import Path

import pytest

from seamless import faults


def test_nothing_is_asked_without_the_variable_or_the_argument(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/vda1 ro seamless.restore=3\n")
    assert faults._asked(cmdline) is None
    assert faults._asked(tmp_path / "absent") is None


def test_a_failure_where_asked_from_the_environment_or_the_command_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(faults.ENV, "sealed:fail")
    faults.point("dumped")  # another point: nothing
    with pytest.raises(faults.InjectedFault, match="injected fault at sealed"):
        faults.point("sealed")
    monkeypatch.delenv(faults.ENV)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("ro seamless.fault=restoring:fail quiet\n")
    assert faults._asked(cmdline) == "restoring:fail"
