"""The kernel modules seamless loads, read from the one list that the boot hooks read
too (``resources/kernel-modules``: a name per line, then what needs it)."""

from __future__ import annotations

import functools
from pathlib import Path

#: The list; ``seamless install-restorer`` and the Debian package put a copy beside the
#: boot hooks' shell library.
LIST = Path(__file__).parent / "resources" / "kernel-modules"


@functools.cache
def _entries(path: Path) -> tuple[tuple[str, ...], ...]:
    """Each line's words (a module's name, then its uses), comments left out: the list
    is read once, however many modules import a part of it."""
    lines = (line.split("#", 1)[0].split() for line in path.read_text().splitlines())
    return tuple(tuple(words) for words in lines if words)


def named(use: str | None = None, path: Path = LIST) -> tuple[str, ...]:
    """The modules of the list, in its order; with ``use`` (store, initrd, criu), only
    those that it needs."""
    return tuple(words[0] for words in _entries(path) if use is None or use in words[1:])
