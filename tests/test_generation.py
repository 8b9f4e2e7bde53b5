"""A generation appears only when complete, and its checksums catch damage."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from seamless.collect.cli import space_for
from seamless.errors import SeamlessError
from seamless.memstore import generation
from seamless.memstore.generation import MANIFEST, Generation
from seamless.memstore.records import Manifest, RecordError, TreeRecord


def test_sealed_only_when_complete_and_verified(tmp_path: Path) -> None:
    gen = Generation(tmp_path / "ckpt")
    root = gen.create()
    assert root == tmp_path / "ckpt.partial" and not gen.final.exists()
    (root / "100").mkdir()
    (root / "100" / "pages-1.img").write_bytes(b"p" * 5000)
    (root / "100" / "dump.log").write_text("CRIU goes on writing this\n")
    gen.seal(Manifest(generation=7, source_release="6.1.0-47", trees=[TreeRecord(root=100)]))
    assert gen.final.is_dir() and not gen.partial.exists()
    manifest = gen.manifest()
    assert manifest.generation == 7 and manifest.source_release == "6.1.0-47"
    assert [t.root for t in manifest.trees] == [100]
    assert [(f.path, f.size) for f in manifest.files] == [("100/pages-1.img", 5000)]
    assert (gen.final / "100" / "pages-1.img").stat().st_mode & 0o777 == 0o600
    assert (gen.final / MANIFEST).stat().st_mode & 0o777 == 0o600
    with open(gen.final / "100" / "dump.log", "a") as log:
        log.write("(00.5) Unfreezing tasks\n")
    assert gen.verify() == []

    with open(gen.final / "100" / "pages-1.img", "r+b") as f:
        f.seek(1234)
        f.write(b"q")
    assert gen.verify() == ["100/pages-1.img"]
    assert gen.verify(lambda path: not generation.is_page_image(path)) == []
    assert gen.verify(generation.is_page_image) == ["100/pages-1.img"]
    (gen.final / "100" / "pages-1.img").unlink()
    assert gen.verify() == ["100/pages-1.img"]


def test_a_damaged_manifest_is_an_error_not_a_crash(tmp_path: Path) -> None:
    gen = Generation(tmp_path / "g")
    gen.create()
    gen.seal(Manifest())
    (gen.final / MANIFEST).write_bytes(b"\xff\xff garbage")
    with pytest.raises(RecordError, match="damaged"):
        gen.verify()


def test_refuses_an_existing_checkpoint_and_cleans_a_crashed_one(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    with pytest.raises(SeamlessError, match="exists already"):
        Generation(tmp_path / "old").create()
    crashed = tmp_path / "new.partial"
    crashed.mkdir()
    (crashed / "junk").write_text("x")
    gen = Generation(tmp_path / "new")
    gen.create()
    assert list(gen.partial.iterdir()) == []
    gen.discard()
    assert not gen.partial.exists() and not gen.final.exists()


def test_space_is_the_free_space_of_the_filesystem_to_come(tmp_path: Path) -> None:
    space = space_for(tmp_path / "not" / "yet")
    assert space.free is not None and space.free > 0
    assert space.device == str(tmp_path)


def test_a_generation_sealed_with_another_algorithm_still_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "DIGEST", "blake2b")  # as generations once were
    gen = Generation(tmp_path / "ckpt")
    root = gen.create()
    for name in ("pages-1.img", "pages-2.img", "core-100.img"):
        (root / name).write_bytes(name.encode() * 1000)
    gen.seal(Manifest(generation=1))
    monkeypatch.undo()
    assert gen.manifest().digest_algorithm == "blake2b"
    assert len(gen.manifest().files[0].digest) == 64  # blake2b's, not the new default's
    assert gen.verify() == []
    (gen.final / "pages-2.img").write_bytes(b"x" * 11000)  # same size, new contents
    assert gen.verify() == ["pages-2.img"]


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_a_big_file_is_hashed_in_pieces_by_every_cpu_and_named_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool) -> None:
    import hashlib
    import mmap
    import os

    import xxhash

    maps: list[tuple[int, int]] = []
    real_mmap = mmap.mmap

    def spy(fd: int, length: int, **kwargs: int) -> mmap.mmap:
        if not mapped:  # a file that cannot be mapped is read: the same digests
            raise OSError(19, "No such device")
        maps.append((length, kwargs["offset"]))
        return real_mmap(fd, length, **kwargs)

    monkeypatch.setattr(mmap, "mmap", spy)

    data = os.urandom(3 << 20) + b"tail"
    path = tmp_path / "pages-1.img"
    path.write_bytes(data)
    pieces = [hashlib.md5(data[i:i + (1 << 20)]).digest() for i in range(0, len(data), 1 << 20)]
    assert len(pieces) == 4
    assert generation.digest(path, "md5/1MiB") == hashlib.md5(b"".join(pieces)).digest()
    assert generation.digest(path, "md5") == hashlib.md5(data).digest()  # older generations
    xxh = [xxhash.xxh64(data[i:i + (1 << 20)]).digest() for i in range(0, len(data), 1 << 20)]
    assert generation.digest(path, "xxh64/1MiB") == xxhash.xxh64(b"".join(xxh)).digest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert generation.digest(empty, "md5/1MiB") == hashlib.md5(hashlib.md5(b"").digest()).digest()
    both = generation.digests([path, empty, path], "md5/1MiB")
    assert both[0] == both[2] == generation.digest(path, "md5/1MiB")
    # a range that starts inside a page: mapped from the page before
    granule = mmap.ALLOCATIONGRANULARITY
    assert generation._hash_range(path, "md5", granule + 100, 5000) == \
        hashlib.md5(data[granule + 100:granule + 5100]).digest()
    assert generation._hash_range(path, "md5", len(data) + 1, 10) == hashlib.md5().digest()
    assert (granule + 5100 - granule, granule) in maps if mapped else maps == []
    for wrong in ("md5/64KiB", "md5/0MiB"):
        with pytest.raises(SeamlessError, match="unknown checksum algorithm"):
            generation.digest(path, wrong)


@pytest.mark.parametrize(("path", "pages"), [
    ("100/pages-1.img", True), ("100/parent/pages-12.img", True), ("pages-3.img", True),
    ("100/pagemap-100.img", False), ("100/core-100.img", False), ("100/pages.log", False),
])
def test_page_images_are_told_apart_by_name(path: str, pages: bool) -> None:
    assert generation.is_page_image(path) is pages


def test_page_images_hashed_while_written_match_a_hash_of_the_whole(tmp_path: Path) -> None:
    """The follower hashes each piece once the file has grown past it; finish() adds the
    last pieces; the digests are those the seal would compute."""
    algorithm = "md5/1MiB"
    (tmp_path / "100").mkdir()
    growing = tmp_path / "100" / "pages-1.img"
    exact = tmp_path / "100" / "pages-2.img"
    empty = tmp_path / "100" / "pages-3.img"
    ignored = tmp_path / "100" / "core-100.img"
    ignored.write_bytes(b"c" * 100)
    reads: list[tuple[str, int]] = []
    real = generation._hash_range

    def counted(path: Path, name: str, offset: int, length: int | None) -> bytes:
        reads.append((path.name, offset))
        return real(path, name, offset, length)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "_hash_range", counted)
        follower = generation.Follower(tmp_path, interval=0.01, algorithm=algorithm)
        with follower:
            with open(growing, "wb") as f:
                for n in range(14):  # 3.5 MiB in quarters, as a dump appends
                    f.write(bytes([n]) * (1 << 18))
                    f.flush()
                    time.sleep(0.02)
            empty.write_bytes(b"")  # before: the step that hashes `exact` sees it
            exact.write_bytes(b"x" * (2 << 20))
            deadline = time.monotonic() + 10
            while follower.bytes_followed < 5 << 20 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert follower.bytes_followed == 5 << 20  # 3 pieces of one file, 2 of the other
        during = list(reads)
        hashed = follower.finish()
    assert sorted(hashed) == [growing, exact, empty]
    for path in (growing, exact, empty):
        st = path.stat()
        assert hashed[path] == generation.Hashed(
            st.st_size, st.st_mtime_ns, generation.digests([path], algorithm)[0])
    assert sorted(reads[len(during):]) == [("pages-1.img", 3 << 20), ("pages-3.img", 0)]
    assert ("core-100.img", 0) not in reads


def test_only_a_pieced_checksum_can_be_followed(tmp_path: Path) -> None:
    with pytest.raises(SeamlessError, match="not hashed in pieces"):
        generation.Follower(tmp_path, algorithm="md5")


def test_a_followed_file_gone_before_the_end_leaves_the_seal_to_hash(tmp_path: Path) -> None:
    (tmp_path / "100").mkdir()
    pages = tmp_path / "100" / "pages-1.img"
    pages.write_bytes(b"p" * (3 << 20))
    with generation.Follower(tmp_path, interval=0.01, algorithm="md5/1MiB") as follower:
        deadline = time.monotonic() + 10
        while follower.bytes_followed < 3 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    pages.unlink()
    assert follower.finish() == {}


def test_seals_with_xxh64_and_says_what_is_missing_without_xxhash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = Generation(tmp_path / "ckpt")
    (gen.create() / "pages-1.img").write_bytes(b"memory" * 1000)
    manifest = gen.seal(Manifest(generation=1, trees=[]))
    assert manifest.digest_algorithm == generation.DIGEST == "xxh64/64MiB"
    assert gen.verify() == []
    monkeypatch.setattr(generation, "HAVE_XXHASH", False)
    with pytest.raises(SeamlessError, match="xxhash module is missing") as e:
        gen.verify()
    assert e.value.hint == "install python3-xxhash"


def test_what_criu_writes_after_the_seal_is_not_a_stranger(tmp_path: Path) -> None:
    gen = Generation(tmp_path / "ckpt")
    (gen.create() / "100").mkdir()
    (gen.partial / "100" / "pages-1.img").write_bytes(b"p" * 100)
    gen.seal(Manifest(generation=1, trees=[TreeRecord(root=100)]))
    for name in ("stats-dump", "stats-restore", "restore.log", "irmap-cache",
                 "lazy-pages.status"):
        (gen.final / "100" / name).write_bytes(b"CRIU's, after the post-dump notification")
    assert gen.verify() == []
    (gen.final / "100" / "pages-2.img").write_bytes(b"not dumped")
    assert gen.verify() == ["100/pages-2.img"]
    assert gen.verify(lambda path: not generation.is_page_image(path)) == []


def test_a_discarded_or_crashed_partial_generation_is_overwritten(tmp_path: Path) -> None:
    import os

    gen = Generation(tmp_path / "ckpt")
    (gen.create() / "100").mkdir()
    pages = gen.partial / "100" / "pages-1.img"
    pages.write_bytes(b"secret" * 1000)
    other = tmp_path / "other-name"
    os.link(pages, other)  # sees what is written to the inode
    (gen.partial / "100" / "parent").symlink_to(other)  # removed, never followed
    gen.discard()
    assert not gen.partial.exists() and other.read_bytes() == bytes(6000)

    (gen.create() / "pages-1.img").write_bytes(b"secret")
    os.link(gen.partial / "pages-1.img", tmp_path / "crashed")
    gen.create()  # a partial one left by a crash is never complete
    assert (tmp_path / "crashed").read_bytes() == bytes(6)
    assert list(gen.partial.iterdir()) == []


def test_a_tree_s_files_are_verified_alone(tmp_path: Path) -> None:
    """A tree's check (the restore's, while the trees are made) reads that tree's files
    and the manifest it is given, and finds a page image put there after the seal."""
    gen = Generation(tmp_path / "g")
    root = gen.create()
    for tree in ("100", "200"):
        (root / tree).mkdir()
        (root / tree / "pages-1.img").write_bytes(tree.encode() * 100)
    gen.seal(Manifest(trees=[TreeRecord(root=100), TreeRecord(root=200)]))
    manifest = gen.manifest()
    (gen.final / "200" / "pages-1.img").write_bytes(b"changed")
    (gen.final / "100" / "pages-2.img").write_bytes(b"added")
    (gen.final / MANIFEST).write_bytes(b"not read again")
    assert gen.verify(generation.is_page_image, manifest=manifest, within="100") == [
        "100/pages-2.img"]
    assert gen.verify(generation.is_page_image, manifest=manifest, within="200") == [
        "200/pages-1.img"]
