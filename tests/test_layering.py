"""The packages import along the flow of an upgrade, never against it: what the old
kernel does (collect) and the new one does (restore) meet only in the records that
cross the kexec (memstore.handoff) and in the shared modules at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SEAMLESS = Path(__file__).parents[1] / "seamless"

#: Which of seamless's packages each package may import (the top-level modules,
#: such as run, procfs, runtime and errors, are open to all).
ALLOWED = {
    "criu": set(),
    "memstore": set(),
    "collect": {"criu", "memstore"},
    "kexec": {"criu", "memstore"},
    "restore": {"criu", "memstore", "kexec"},  # the way back kexecs
}
PACKAGES = {"criu", "memstore", "collect", "kexec", "restore"}


def imported(path: Path) -> set[str]:
    """The seamless packages (of PACKAGES) that a module imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "seamless" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add(parts[1])
    return found


def modules() -> list[tuple[str, Path]]:
    return [(package, path) for package in sorted(ALLOWED)
            for path in sorted((SEAMLESS / package).glob("*.py"))]


@pytest.mark.parametrize(("package", "path"), modules(), ids=lambda v: getattr(v, "name", v))
def test_a_package_imports_only_along_the_flow(package: str, path: Path) -> None:
    against = imported(path) - ALLOWED[package] - {package}
    assert not against, f"{path.relative_to(SEAMLESS)} imports {sorted(against)}"


def test_the_check_sees_an_import_against_the_flow(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from seamless.collect import plan\n"
                      "from seamless import restore\n")
    assert imported(module) == {"collect", "restore"}
