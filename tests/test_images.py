"""A checkpoint directory appears only when complete, and its checksums catch damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seamless.collect.images import MANIFEST, ImagesDir, space_for, verify
from seamless.errors import SeamlessError


def test_sealed_only_when_complete_and_verified(tmp_path: Path) -> None:
    images = ImagesDir(tmp_path / "ckpt")
    root = images.create()
    assert root == tmp_path / "ckpt.partial" and not images.final.exists()
    (root / "100").mkdir()
    (root / "100" / "pages-1.img").write_bytes(b"p" * 5000)
    (root / "100" / "dump.log").write_text("CRIU goes on writing this\n")
    manifest = images.seal({"order": [100]})
    assert images.final.is_dir() and not images.partial.exists()
    assert manifest["order"] == [100]
    assert [f["path"] for f in manifest["files"]] == ["100/pages-1.img"]
    with open(images.final / "100" / "dump.log", "a") as log:
        log.write("(00.5) Unfreezing tasks\n")
    assert verify(images.final) == []

    with open(images.final / "100" / "pages-1.img", "r+b") as f:
        f.seek(1234)
        f.write(b"q")
    assert verify(images.final) == ["100/pages-1.img"]
    assert json.loads((images.final / MANIFEST).read_text())["format"] == 1


def test_refuses_an_existing_checkpoint_and_cleans_a_crashed_one(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    with pytest.raises(SeamlessError, match="exists already"):
        ImagesDir(tmp_path / "old").create()
    crashed = tmp_path / "new.partial"
    crashed.mkdir()
    (crashed / "junk").write_text("x")
    images = ImagesDir(tmp_path / "new")
    images.create()
    assert list(images.partial.iterdir()) == []
    images.discard()
    assert not images.partial.exists() and not images.final.exists()


def test_space_is_the_free_space_of_the_filesystem_to_come(tmp_path: Path) -> None:
    space = space_for(tmp_path / "not" / "yet")
    assert space.free is not None and space.free > 0
    assert space.device == str(tmp_path)
