"""seamless(8) and a page per command, generated from the click definitions."""

from __future__ import annotations

import subprocess
from pathlib import Path

from seamless import manpage


def test_a_page_for_every_command_with_every_exit_code(tmp_path: Path) -> None:
    assert manpage.main([str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"seamless.8", "seamless-upgrade.8", "seamless-status.8", "seamless-store.8",
            "seamless-store-expire.8", "seamless-restore.8"} <= set(names)
    for page in tmp_path.iterdir():
        text = page.read_text()
        assert ".SH EXIT STATUS" in text and "\n.B 130\n" in text, page.name
    upgrade = (tmp_path / "seamless-upgrade.8").read_text()
    assert "\\-\\-lazy\\-pages" in upgrade and "\\-\\-force" in upgrade
    assert ".BR seamless (8)" in upgrade
    top = (tmp_path / "seamless.8").read_text()
    assert ".BR seamless\\-upgrade (8)" in top  # the commands, each with its page
    # groff finds nothing wrong in any of them
    done = subprocess.run(["groff", "-man", "-ww", "-z", *map(str, sorted(tmp_path.iterdir()))],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_roff_escapes_what_roff_would_read_as_its_own() -> None:
    assert manpage._roff("a-b \\n") == "a\\-b \\en"
    assert manpage._roff(".not a request\n'nor this") == "\\&.not a request\n\\&'nor this"
