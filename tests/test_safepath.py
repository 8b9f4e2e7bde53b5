"""Root makes and opens files at paths a user may have a say in, never through their links.

The hostile fixture: a user (uid 4242) owns a directory the restore must make something
in, and has put a symbolic link there, towards a directory of root's (the "secret")."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from seamless import runtime, safepath
from seamless.criu import CriuOptions, CriuResult, NotifyHandler
from seamless.memstore.handoff import TREE_INFO
from seamless.restore.restorer import recreate_dirs, recreate_fifos, reopen_foreign, restore_all

USER = 4242


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """(the user's directory, root's secret directory); the user's ``link`` points at
    the secret one, as a user would swap it in after the checkpoint."""
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "shadow").write_text("root only")
    os.chmod(secret / "shadow", 0o600)
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, USER, USER)
    (home / "link").symlink_to(secret)
    os.lchown(home / "link", USER, USER)
    return home, secret


def untouched(secret: Path) -> None:
    assert sorted(p.name for p in secret.iterdir()) == ["shadow"]
    st = (secret / "shadow").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert secret.stat().st_uid == 0


def test_a_user_s_link_on_the_way_is_not_followed(hostile: tuple[Path, Path]) -> None:
    home, secret = hostile
    makers: list[Callable[[str], bool]] = [
        lambda p: safepath.make_dir(p, USER, USER, 0o777),
        lambda p: safepath.make_fifo(p, USER, USER, 0o666),
        lambda p: safepath.make_file(p, b"x", USER, USER, 0o666),
        lambda p: safepath.make_symlink(p, "/etc", USER, USER)]
    for make in makers:
        with pytest.raises(safepath.UnsafePath, match=f"user {USER} owns"):
            make(str(home / "link" / "made"))
    with pytest.raises(safepath.UnsafePath, match=f"user {USER} owns"):
        safepath.open_file(str(home / "link" / "shadow"), os.O_RDONLY)
    untouched(secret)


def test_a_user_s_link_in_place_of_the_file_is_neither_followed_nor_changed(
        hostile: tuple[Path, Path]) -> None:
    home, secret = hostile
    (home / "fifo").symlink_to(secret / "shadow")
    os.lchown(home / "fifo", USER, USER)
    assert not safepath.make_fifo(str(home / "fifo"), USER, USER, 0o666)  # something is there
    assert not safepath.make_dir(str(home / "link"), USER, USER, 0o777)
    assert not safepath.make_file(str(home / "fifo"), b"x", USER, USER, 0o666)
    with pytest.raises(OSError):  # ELOOP: the last name is not followed either
        safepath.open_file(str(home / "fifo"), os.O_RDONLY)
    untouched(secret)


def test_root_s_own_links_are_followed_as_var_run_is(tmp_path: Path) -> None:
    real = tmp_path / "run"
    real.mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to("../run")  # relative, with a ..
    assert safepath.make_fifo(str(tmp_path / "var/run/app/pipe"), USER, USER, 0o620)
    st = os.stat(real / "app" / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (USER, 0o620)
    assert (real / "app").stat().st_uid == 0  # a parent made on the way is root's
    assert safepath.make_symlink(str(real / "l"), "/nowhere", USER, USER)
    assert os.lstat(real / "l").st_uid == USER and os.readlink(real / "l") == "/nowhere"


def test_a_file_swapped_in_while_it_is_made_is_not_changed(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.write_text("")
    os.chown(theirs, USER, USER)
    os.chmod(theirs, 0o600)

    def swap(name: str, parent: int) -> None:  # the user wins the race
        os.rename(theirs, os.path.join(tmp_path, name))

    with pytest.raises(safepath.UnsafePath, match="replaced"):
        safepath._make(str(tmp_path / "fifo"), 0, 0, 0o666, stat.S_IFIFO, swap,
                       os.O_RDONLY, True)
    assert stat.S_IMODE((tmp_path / "fifo").stat().st_mode) == 0o600


def test_the_restore_s_recreations_refuse_a_user_s_link(hostile: tuple[Path, Path]) -> None:
    home, secret = hostile
    via = str(home / "link" / "x")
    with pytest.raises(safepath.UnsafePath):
        recreate_dirs([{"path": via, "uid": USER, "gid": USER, "mode": 0o777}])
    with pytest.raises(safepath.UnsafePath):
        recreate_fifos([{"path": via, "uid": USER, "gid": USER, "mode": 0o666}])
    with pytest.raises(safepath.UnsafePath):
        reopen_foreign({"kind": "file", "path": str(home / "link" / "shadow"),
                        "flags": os.O_RDONLY}, 1, 0)
    assert runtime.recreate([{"path": via, "kind": "file", "data": "eA==", "uid": USER,
                              "gid": USER, "mode": 0o666}]) == []
    untouched(secret)


class RecordingCriu:
    """Records, at each restore, whether the second tree's socket directory is there."""

    def __init__(self, second: Path) -> None:
        self.second = second
        self.seen: list[tuple[str, bool]] = []

    def restore(self, images_dir: Path, options: CriuOptions | None = None,
                on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        self.seen.append((images_dir.name, self.second.is_dir()))
        return CriuResult("restore", 0.1, pid=int(images_dir.name))

    def features(self, *names: str) -> dict[str, bool]:
        return dict.fromkeys(names, True)


def test_every_path_is_made_before_the_first_tree_runs(tmp_path: Path,
                                                       hostile: tuple[Path, Path]) -> None:
    home, secret = hostile
    images = tmp_path / "images"
    images.mkdir()
    made = tmp_path / "made"
    for order, (pid, dirs) in enumerate([
            (100, []), (200, [{"path": str(made / "sockets"), "uid": USER, "gid": USER,
                               "mode": 0o700}]),
            (300, [{"path": str(home / "link" / "x"), "uid": USER, "gid": USER,
                    "mode": 0o777}])]):
        (images / str(pid)).mkdir()
        (images / str(pid) / TREE_INFO).write_text(json.dumps({
            "order": order, "root": pid, "pids": [pid], "command": "app", "external": [],
            "socket_dirs": dirs}))
    criu = RecordingCriu(made / "sockets")

    report = restore_all(images, criu, stream=lambda i, u: os.open(os.devnull, os.O_WRONLY))

    assert criu.seen == [("100", True), ("200", True)]  # made before tree 100 ran
    assert [t.root for t in report.failed] == [300]
    assert f"user {USER} owns" in (report.failed[0].error or "")
    untouched(secret)
