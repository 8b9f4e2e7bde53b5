"""Where a checkpoint's images go: a directory that appears only when complete.

The trees are dumped into ``DIR.partial``; once every tree is dumped the
images are listed with their sizes and SHA-256 in ``checkpoint.json``, read
back and checked, and only then renamed to ``DIR``.  A crash or a failure
leaves no ``DIR`` behind, and a failure removes ``DIR.partial``.
(The preserved-RAM store gives the same guarantee for its generations.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seamless.collect.plan import StoreSpace
from seamless.errors import SeamlessError

MANIFEST = "checkpoint.json"
FORMAT = 1


def space_for(directory: Path) -> StoreSpace:
    """How much the filesystem that will hold ``directory`` can take."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    return StoreSpace(device=str(probe), free=st.f_bavail * st.f_frsize)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    """What the manifest covers: everything but itself and CRIU's logs (CRIU goes on
    writing a dump's log after the images are done: while it thaws the tree)."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and p.suffix != ".log")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ImagesDir:
    final: Path

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.final.name + ".partial")

    def create(self) -> Path:
        if self.final.exists():
            raise SeamlessError(f"{self.final} exists already",
                                hint="choose a new directory for this checkpoint")
        if self.partial.exists():
            shutil.rmtree(self.partial)  # left by a crash: never complete
        self.partial.mkdir(mode=0o700, parents=True)
        return self.partial

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def seal(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Sync and checksum every image (reading it back), write the manifest, and make
        the directory visible under its final name."""
        files = []
        for path in _files(self.partial):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files.append({
                "path": str(path.relative_to(self.partial)),
                "size": path.stat().st_size,
                "sha256": _sha256(path),
            })
        manifest = {"format": FORMAT, "sealed": time.time(), **summary, "files": files}
        manifest_path = self.partial / MANIFEST
        manifest_path.write_text(json.dumps(manifest, indent=2))
        with open(manifest_path, "rb") as f:
            os.fsync(f.fileno())
        _fsync_dir(self.partial)
        self.partial.rename(self.final)
        _fsync_dir(self.final.parent)
        return manifest


def verify(directory: Path) -> list[str]:
    """The files of a sealed checkpoint whose size or checksum differ (or are missing)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    bad = []
    for entry in manifest["files"]:
        path = directory / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["size"] or (
            _sha256(path) != entry["sha256"]
        ):
            bad.append(entry["path"])
    return bad
