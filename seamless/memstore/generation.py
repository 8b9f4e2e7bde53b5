"""A generation: one checkpoint's images, visible only once complete.

The trees are dumped into ``DIR.partial``; once every tree is dumped the files
are synced, listed with their sizes and checksums in ``manifest`` (a
``store.proto`` Manifest), and only then is the directory renamed to ``DIR``.
A crash leaves no ``DIR`` behind, and a failure removes ``DIR.partial``.
The same holds for a generation in the store and for a plain images directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from seamless.errors import ExitCode, SeamlessError
from seamless.log import log
from seamless.memstore.records import FileEntry, Manifest

try:
    import xxhash
    HAVE_XXHASH = True
except ImportError:  # a machine without it seals with MD5 (and restores what it sealed)
    HAVE_XXHASH = False

MANIFEST = "manifest"
PARTIAL = ".partial"
#: The checksums find corruption (RAM trampled across the kexec, a bad write), not
#: tampering: whoever can write the root-only store can rewrite its manifest too. So
#: they need no cryptographic hash, only one that no accident matches and that costs
#: little: XXH64 (the xxhash library), 64 bits, ten times MD5's rate and more (`vm-tests/vm
#: bench` prints each algorithm's rate in the guest). The seal hashes
#: a dump's page images while the trees are frozen, and the restore verifies them
#: before the trees run: the hash's speed is blackout. Without xxhash, MD5.
#: "xxh64/64MiB": each 64 MiB piece of a file is hashed on its own (every CPU hashes a
#: piece of one big page image at once) and the file's digest is the hash of the
#: pieces' digests. Generations sealed with another algorithm name it in their
#: manifest ("md5/64MiB", or "md5" or "blake2b": one digest over the whole file).
DIGEST = "xxh64/64MiB" if HAVE_XXHASH else "md5/64MiB"


def is_page_image(path: str) -> bool:
    """A file of CRIU's that holds process memory (``pages-N.img``): nearly all of a
    generation's bytes, read only into processes that have not run yet."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith("pages-") and name.endswith(".img")


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


def _new(name: str, data: bytes | memoryview = b"") -> _Hash:
    """A new hash object: "xxh64", or hashlib's ``name``."""
    if name == "xxh64":
        if not HAVE_XXHASH:
            raise SeamlessError("this generation was sealed with XXH64, and the xxhash "
                                "module is missing", hint="install python3-xxhash")
        return xxhash.xxh64(data)
    return hashlib.new(name, data, usedforsecurity=False)


def _algorithm(name: str) -> tuple[str, int | None]:
    """The hash's name and the piece size of an algorithm name ("xxh64/64MiB", "md5")."""
    base, _, piece = name.partition("/")
    if not piece:
        return base, None
    if not piece.endswith("MiB") or not piece.removesuffix("MiB").isdigit() \
            or int(piece.removesuffix("MiB")) == 0:
        raise SeamlessError(f"unknown checksum algorithm {name!r}")
    return base, int(piece.removesuffix("MiB")) << 20


def _hash_range(path: Path, name: str, offset: int, length: int | None) -> bytes:
    """The digest of ``length`` bytes of a file from ``offset`` (to its end: None),
    read through a mapping of the file: the hash reads the page cache, or the store's
    memory itself with DAX, where read() would first copy every byte (in the TCG guest
    MD5 went from 182 to 250 MiB/s). Only files that do not shrink are hashed (a
    mapped page past the end would be SIGBUS); a file that cannot be mapped is read."""
    h = _new(name)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        end = size if length is None else min(size, offset + length)
        if end <= offset:
            return h.digest()
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(f.fileno(), end - start, offset=start, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            mapped = None
        if mapped is None:
            f.seek(offset)
            left = end - offset
            while left > 0 and (chunk := f.read(min(1 << 20, left))):
                h.update(chunk)
                left -= len(chunk)
            return h.digest()
        with mapped, memoryview(mapped) as view:
            with contextlib.suppress(OSError, AttributeError):  # a hint only
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            h.update(view[offset - start:])
    return h.digest()


def digest(path: Path, algorithm: str | None = None) -> bytes:
    return digests([path], algorithm)[0]


def digests(paths: list[Path], algorithm: str | None = None) -> list[bytes]:
    """The digests of ``paths``, several files and pieces of files at a time (hashlib
    lets go of the GIL, so every CPU hashes)."""
    name, piece = _algorithm(algorithm or DIGEST)
    # (which path, path, offset, length): a path given twice is hashed twice, not mixed
    tasks: list[tuple[int, Path, int, int | None]]
    if piece is None:
        tasks = [(n, p, 0, None) for n, p in enumerate(paths)]
    else:
        tasks = [(n, p, offset, piece) for n, p in enumerate(paths)
                 for offset in range(0, max(p.stat().st_size, 1), piece)]
    sums = _hash_ranges(name, [(p, o, size) for _, p, o, size in tasks])
    if piece is None:
        return sums
    pieces: list[list[bytes]] = [[] for _ in paths]
    for (n, _, _, _), d in zip(tasks, sums, strict=True):
        pieces[n].append(d)
    return [_combined(name, ds) for ds in pieces]


def _hash_ranges(name: str, ranges: list[tuple[Path, int, int | None]]) -> list[bytes]:
    """The digest of each (path, offset, length), several at a time (hashlib lets go of
    the GIL, so every CPU hashes)."""
    if len(ranges) < 2:
        return [_hash_range(p, name, o, size) for p, o, size in ranges]
    with ThreadPoolExecutor(max_workers=min(len(ranges), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda r: _hash_range(r[0], name, r[1], r[2]), ranges))


def _combined(name: str, pieces: list[bytes]) -> bytes:
    """A file's digest from its pieces' ("xxh64/64MiB": the XXH64 of their digests)."""
    return _new(name, b"".join(pieces)).digest()


@dataclass(frozen=True)
class Hashed:
    """A file hashed ahead of the seal (images that no longer change)."""

    size: int
    mtime_ns: int
    digest: bytes


class Follower:
    """Hashes the page images of a dump while CRIU still writes them, a piece at a time
    as each piece is complete, so that the seal reads only their last pieces: the dump
    and the hashing use two CPUs at once, and the frozen trees wait less.

    It relies on CRIU writing a page image only by appending to it, once, before its
    post-dump notification (CRIU 3.17: opened O_TRUNC, spliced at the file's end, no
    pwrite or lseek; only auto-dedup, which seamless does not ask for, punches holes,
    and in parent images). A piece read once the file has grown past it is then
    final. Were that ever not so, the manifest would hold a digest of what was read,
    and the restore's verify would refuse the tree: a false "corrupt", never a
    silently wrong process. A file that changes after :meth:`finish` looked at it
    (size or modification time) is hashed again whole by the seal.
    """

    def __init__(self, root: Path, pattern: str = "*/pages-*.img", interval: float = 0.05,
                 algorithm: str = DIGEST):
        self._root, self._pattern, self._interval = root, pattern, interval
        self._name, piece = _algorithm(algorithm)
        if piece is None:
            raise SeamlessError(f"{algorithm} is not hashed in pieces")
        self._piece = piece
        self._pieces: dict[Path, list[bytes]] = {}
        self._lock = threading.Lock()  # _pieces gains files while bytes_followed reads it
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="seamless-hash", daemon=True)

    def __enter__(self) -> Follower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def bytes_followed(self) -> int:
        """How much was hashed while the files were written."""
        with self._lock:
            return sum(len(done) for done in self._pieces.values()) * self._piece

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._step():
                    self._stop.wait(self._interval)
        except BaseException as e:  # the seal hashes everything then
            self._error = e

    def _step(self) -> bool:
        """Hash the pieces complete now; whether there was any."""
        hashed = False
        for path in sorted(self._root.glob(self._pattern)):
            with self._lock:
                done = self._pieces.setdefault(path, [])
            size = path.stat().st_size
            while (len(done) + 1) * self._piece <= size and not self._stop.is_set():
                done.append(_hash_range(path, self._name, len(done) * self._piece,
                                        self._piece))
                hashed = True
        return hashed

    def finish(self) -> dict[Path, Hashed]:
        """Stop following; the files' digests, their last pieces hashed now (every CPU).
        Call it once the dump wrote everything."""
        self.__exit__()
        if self._error is not None:
            log.warning("hashing the page images during the dump failed (%s): the seal "
                        "hashes them", self._error)
            return {}
        try:
            return self._finish()
        except OSError as e:
            log.warning("hashing the page images' last pieces failed (%s): the seal "
                        "hashes them whole", e)
            return {}

    def _finish(self) -> dict[Path, Hashed]:
        stats = {p: p.stat() for p in self._pieces}
        # a file shorter than what was hashed of it (never from CRIU) is hashed whole
        followed = {p: done for p, done in self._pieces.items()
                    if len(done) * self._piece <= stats[p].st_size}
        tasks = [(p, offset) for p, done in followed.items()
                 for offset in range(len(done) * self._piece, max(stats[p].st_size, 1),
                                     self._piece)]
        sums = _hash_ranges(self._name, [(p, offset, self._piece) for p, offset in tasks])
        pieces = {p: list(done) for p, done in followed.items()}
        for (p, _), d in zip(tasks, sums, strict=True):
            pieces[p].append(d)
        return {p: Hashed(stats[p].st_size, stats[p].st_mtime_ns, _combined(self._name, ds))
                for p, ds in pieces.items()}


def covered(root: Path) -> list[Path]:
    """What the manifest covers: everything but itself and what CRIU writes after the
    images are done, read by nobody: its logs (it goes on writing a dump's while it
    thaws the tree), its statistics ("stats-dump" comes after the post-dump
    notification the seal runs in; "stats-restore" from each restore), its cache of
    inotify paths, and what a lazy restore's daemon leaves (its exit status)."""
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and p.suffix != ".log"
                  and not p.name.startswith(("stats-", "lazy-pages."))
                  and p.name != "irmap-cache")


def shred(path: Path) -> None:
    """Overwrite every file under ``path`` (a directory or a file) with zeros, then
    remove it: a generation holds process memory, which must not outlive it in the
    store's RAM. Nothing there is nothing to do; symbolic links and sockets are
    removed, never followed."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        for sub in sorted(path.rglob("*"), reverse=True):  # what a directory holds first
            _shred_one(sub)
    _shred_one(path)


def _shred_one(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
        return
    if path.is_file() and not path.is_symlink():
        zeros = bytes(1 << 20)
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "wb") as f:
            size = os.fstat(fd).st_size
            for offset in range(0, size, len(zeros)):
                f.write(zeros[: min(len(zeros), size - offset)])
            f.flush()
            os.fsync(fd)
    path.unlink()  # a symbolic link, the socket of a lazy restore's daemon


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refused(gen: Generation, why: str) -> SeamlessError:
    return SeamlessError(f"{gen.final} cannot be trusted: {why}",
                         hint="remove it (seamless store wipe) and checkpoint again",
                         exit_code=ExitCode.CHECK_FAILED)


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
        shred(self.partial)  # left by a crash: never complete
        self.partial.mkdir(mode=0o700, parents=True)
        return self.partial

    def discard(self) -> None:
        """Remove the partial generation (a failed checkpoint), overwritten."""
        try:
            shred(self.partial)
        except OSError as e:
            log.warning("the partial generation %s was not all overwritten: %s",
                        self.partial, e)

    def wipe(self) -> None:
        """Overwrite every file of the sealed generation with zeros, then remove it."""
        shred(self.final)

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
        """The generation's manifest, refused unless every file it lists is a plain path
        inside the generation, its trees' roots are distinct PIDs, and its checksum
        algorithm is one this seamless knows."""
        path = self.final / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise SeamlessError(f"{self.final} is not a sealed checkpoint (no {MANIFEST})",
                                exit_code=ExitCode.CHECK_FAILED) from e
        manifest = Manifest.from_bytes(data)
        for entry in manifest.files:
            parts = entry.path.split("/")
            if entry.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise _refused(self, f"it lists a file outside it ({entry.path!r})")
        roots = [t.root for t in manifest.trees]
        if any(r <= 0 for r in roots) or len(set(roots)) != len(roots):
            raise _refused(self, f"its trees' roots are not distinct PIDs ({roots})")
        try:
            _new(_algorithm(manifest.digest_algorithm)[0])
        except ValueError as e:
            raise _refused(self, f"its checksums are {manifest.digest_algorithm!r}, an "
                           "algorithm this seamless does not know") from e
        return manifest

    def verify(self, select: Callable[[str], bool] | None = None, *,
               manifest: Manifest | None = None, within: str = "") -> list[str]:
        """The files whose size or checksum differ from the manifest's, that are missing,
        or that are there and not in the manifest (CRIU's logs aside); ``select(path)``:
        only the files it is true for (paths relative to the generation). ``manifest``:
        the one :meth:`manifest` returned already; ``within``: only the files under this
        directory of the generation are looked for (a tree's)."""
        manifest = manifest or self.manifest()
        listed = {e.path for e in manifest.files}
        bad = [rel for p in covered(self.final / within)
               if (rel := str(p.relative_to(self.final))) not in listed
               and (select is None or select(rel))]
        present = []
        for entry in manifest.files:
            if select is not None and not select(entry.path) \
                    or within and not entry.path.startswith(f"{within}/"):
                continue
            path = self.final / entry.path
            if not path.is_file() or path.stat().st_size != entry.size:
                bad.append(entry.path)
            else:
                present.append(entry)
        sums = digests([self.final / e.path for e in present], manifest.digest_algorithm)
        bad += [e.path for e, d in zip(present, sums, strict=True) if d != e.digest]
        return sorted(bad)
