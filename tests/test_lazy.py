"""Lazy restore on the host: the `criu lazy-pages` daemon's start, wait and failure, with a
stand-in for criu (a shell script): nothing here runs CRIU."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from seamless.errors import SeamlessError
from seamless.restore import lazy
from seamless.restore.lazy import Pager

#: Behaves like `criu lazy-pages -D . --status-fd N -o LOG -v2` as $MODE says.
FAKE_CRIU = """#!/bin/sh
[ "$1 $2 $3 $4" = "lazy-pages -D . --status-fd" ] || { echo "bad args: $*" >&2; exit 9; }
fd=$5; log=$7
case $(cat mode) in
ok) printf r > /proc/self/fd/"$fd"; sleep 0.3; exit 0 ;;
no-uffd) echo "Error (criu/uffd.c:1413): no userfaultfd" > "$log"; exit 1 ;;
fails) printf r > /proc/self/fd/"$fd"
       echo "Error (criu/uffd.c:900): uffd_copy: Bad address" > "$log"; exit 2 ;;
hangs) printf r > /proc/self/fd/"$fd"; exec sleep 100 ;;
esac
"""


def fake_criu(tmp_path: Path, mode: str) -> tuple[Path, Path]:
    binary = tmp_path / "criu"
    binary.write_text(FAKE_CRIU)
    binary.chmod(0o755)
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / "mode").write_text(mode)
    return binary, images


def test_the_daemon_serves_until_done_and_its_exit_status_is_kept(tmp_path: Path) -> None:
    binary, images = fake_criu(tmp_path, "ok")
    started = time.monotonic()
    pager = Pager.start(images, str(binary))
    assert time.monotonic() - started < 5
    assert pager.status() is None  # still serving the memory
    assert pager.wait(timeout=30) == 0
    assert (images / lazy.STATUS).read_text().strip() == "0"


def test_a_daemon_that_cannot_listen_is_an_error_with_its_log(tmp_path: Path) -> None:
    binary, images = fake_criu(tmp_path, "no-uffd")
    with pytest.raises(SeamlessError, match="no userfaultfd"):
        Pager.start(images, str(binary))


def test_a_tree_whose_memory_did_not_all_arrive_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    killed: list[int] = []
    monkeypatch.setattr(lazy, "kill_tree", killed.append)
    binary, images = fake_criu(tmp_path, "fails")
    failing = Pager.start(images, str(binary))
    (tmp_path / "ok").mkdir()
    good_binary, good_images = fake_criu(tmp_path / "ok", "ok")
    good = Pager.start(good_images, str(good_binary))

    failed = lazy.finish({101: failing, 202: good}, timeout=30)

    assert list(failed) == [101]
    assert "exited with 2" in failed[101] and "Bad address" in failed[101]
    assert killed == [101]


def test_a_stopped_daemon_ends_at_once_without_a_status(tmp_path: Path) -> None:
    binary, images = fake_criu(tmp_path, "hangs")
    pager = Pager.start(images, str(binary))
    with pytest.raises(TimeoutError):
        pager.wait(timeout=0.5)
    pager.stop()
    started = time.monotonic()
    assert pager.wait(timeout=10) == 255
    assert time.monotonic() - started < 5


def test_the_status_is_read_where_the_images_went(tmp_path: Path) -> None:
    """In an initramfs without systemd the store's mount leaves the real root for a
    moment (moved back to the initramfs) while the daemons serve: a daemon that ends
    then is read through the open directory, not taken for killed."""
    binary, images = fake_criu(tmp_path, "fails")
    pager = Pager.start(images, str(binary))
    images.rename(tmp_path / "moved")
    assert pager.wait(timeout=30) == 2  # not 255: "killed before writing it"
    assert "Bad address" in pager.log_tail()
