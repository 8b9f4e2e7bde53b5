"""The kernel modules seamless loads, read from the one list that the boot hooks read
too (``resources/kernel-modules``: a name per line, then what needs it)."""

from __future__ import annotations

from pathlib import Path

#: The list; ``seamless install-restorer`` and the Debian package put a copy beside the
#: boot hooks' shell library.
LIST = Path(__file__).parent / "resources" / "kernel-modules"


def named(use: str | None = None, path: Path = LIST) -> tuple[str, ...]:
    """The modules of the list, in its order; with ``use`` (store, initrd, criu), only
    those that it needs."""
    names = []
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words and (use is None or use in words[1:]):
            names.append(words[0])
    return tuple(names)
