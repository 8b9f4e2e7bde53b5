"""A generation: one checkpoint's images, visible only once complete.

The trees are dumped into ``DIR.partial``; once every tree is dumped the files
are synced, listed with their sizes and checksums in ``manifest`` (a
``store.proto`` Manifest), and only then is the directory renamed to ``DIR``.
A crash leaves no ``DIR`` behind, and a failure removes ``DIR.partial``.
The same holds for a generation in the store and for a plain images directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from seamless.errors import ExitCode, SeamlessError
from seamless.memstore.records import FileEntry, Manifest

MANIFEST = "manifest"
PARTIAL = ".partial"
#: The checksums find corruption (RAM trampled across the kexec, a bad write), not
#: tampering: whoever can write the root-only store can rewrite its manifest too.
#: MD5's 128 bits make an accidental match out of the question, and it is the
#: fastest hashlib has: in the TCG guest 330 MiB/s against blake2b's 96 and
#: SHA-256's 20, and the restore verifies every byte before anything runs.
#: Generations sealed with another algorithm name it in their manifest.
DIGEST = "md5"


def digest(path: Path, algorithm: str | None = None) -> bytes:
    h = hashlib.new(algorithm or DIGEST, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def digests(paths: list[Path], algorithm: str | None = None) -> list[bytes]:
    """The digests of ``paths``, several files at a time (hashlib lets go of the GIL,
    so every CPU hashes)."""
    if len(paths) < 2:
        return [digest(p, algorithm) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: digest(p, algorithm), paths))


@dataclass(frozen=True)
class Hashed:
    """A file hashed ahead of the seal (images that no longer change)."""

    size: int
    mtime_ns: int
    digest: bytes


def covered(root: Path) -> list[Path]:
    """What the manifest covers: everything but itself and CRIU's logs (CRIU goes on
    writing a dump's log after the images are done: while it thaws the tree)."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and p.suffix != ".log")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Generation:
    """A generation directory, by its final name."""

    final: Path

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.final.name + PARTIAL)

    @property
    def sealed(self) -> bool:
        return (self.final / MANIFEST).is_file()

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

    def hash_ahead(self) -> dict[Path, Hashed]:
        """Hash what the partial generation holds now, for :meth:`seal` to reuse for
        the files that have not changed by then (a pre-dump's images, hashed while
        the processes still run)."""
        paths = covered(self.partial)
        stats = [p.stat() for p in paths]
        return {p: Hashed(st.st_size, st.st_mtime_ns, d)
                for p, st, d in zip(paths, stats, digests(paths), strict=True)}

    def seal(self, manifest: Manifest, ahead: dict[Path, Hashed] | None = None) -> Manifest:
        """Sync and checksum every file, write the manifest, and make the directory
        visible under its final name. Files in ``ahead`` (see :meth:`hash_ahead`) whose
        size and modification time are unchanged are not read again."""
        ahead = ahead or {}
        paths = covered(self.partial)
        known: dict[Path, bytes] = {}
        sizes: dict[Path, int] = {}
        for path in paths:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(path, 0o600)
            st = path.stat()
            sizes[path] = st.st_size
            hashed = ahead.get(path)
            if hashed is not None and (hashed.size, hashed.mtime_ns) == (st.st_size,
                                                                         st.st_mtime_ns):
                known[path] = hashed.digest
        fresh = [p for p in paths if p not in known]
        known.update(zip(fresh, digests(fresh), strict=True))
        manifest.files = [FileEntry(str(p.relative_to(self.partial)), sizes[p], known[p])
                          for p in paths]
        manifest.digest_algorithm = DIGEST
        manifest.sealed = time.time()
        fd = os.open(self.partial / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(manifest.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.partial)
        self.partial.rename(self.final)
        fsync_dir(self.final.parent)
        return manifest

    def manifest(self) -> Manifest:
        path = self.final / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise SeamlessError(f"{self.final} is not a sealed checkpoint (no {MANIFEST})",
                                exit_code=ExitCode.CHECK_FAILED) from e
        return Manifest.from_bytes(data)

    def verify(self) -> list[str]:
        """The files whose size or checksum differ from the manifest's, or are missing."""
        manifest = self.manifest()
        bad = []
        present = []
        for entry in manifest.files:
            path = self.final / entry.path
            if not path.is_file() or path.stat().st_size != entry.size:
                bad.append(entry.path)
            else:
                present.append(entry)
        sums = digests([self.final / e.path for e in present], manifest.digest_algorithm)
        bad += [e.path for e, d in zip(present, sums, strict=True) if d != e.digest]
        return sorted(bad)
