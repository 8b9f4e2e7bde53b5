"""All or nothing in the new kernel, and the way back to the old one (seamless.restore.wayback,
restorer.Hold, boot.boot_restore at boot): every collaborator faked, no kexec."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from seamless import faults
from seamless.criu import CriuOptions, CriuResult, Notification, NotifyHandler
from seamless.errors import SeamlessError
from seamless.kexec import cmdline
from seamless.memstore import handoff
from seamless.memstore.handoff import Report
from seamless.restore import boot, metrics, wayback
from seamless.restore.restorer import Hold, restore_all
from tests.test_boot_restore import (
    TOKEN,
    BootEnv,
    FakeRestorer,
    booted_with,  # noqa: F401 - a fixture
    env,  # noqa: F401 - a fixture
    reports,  # noqa: F401 - a fixture
    upgrade_record,
)

OLD = "6.1.0-old"
BACK = handoff.WayBack(OLD, f"/boot/vmlinuz-{OLD}", f"/boot/initrd.img-{OLD}",
                       "root=/dev/vda1 ro memmap=256M!1G")


class Entered(BaseException):
    """The fake kexec: the real one does not return."""


class FakeLoader:
    def __init__(self, fail: Exception | None = None) -> None:
        self.loaded: list[tuple[Path, Path | None, str]] = []
        self.fail = fail

    def load(self, kernel: Path, initrd: Path | None, line: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.loaded.append((kernel, initrd, line))

    def enter(self) -> None:
        raise Entered


@pytest.fixture
def way_back(env: BootEnv, booted_with: list[str],  # noqa: F811 - fixtures
             monkeypatch: pytest.MonkeyPatch) -> FakeLoader:
    """Boot-of-B, started by the upgrade with TOKEN, whose record has a way back to OLD
    (its kernel and initramfs in the new root)."""
    booted_with.append(f"seamless.token={TOKEN}")
    for path in (BACK.kernel, BACK.initrd):
        (env.root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (env.root / path.lstrip("/")).write_bytes(b"old")
    loader = FakeLoader()
    monkeypatch.setattr(wayback, "loader", loader)
    return loader


def back_cmdline(line: str) -> dict[str, str]:
    return dict(a.split("=", 1) for a in cmdline.split(line) if a.startswith("seamless."))


def test_a_tree_that_cannot_be_made_sends_every_tree_back_unrun(
    env: BootEnv, way_back: FakeLoader, reports: tuple[Path, Path],  # noqa: F811
) -> None:
    """202 is made first and held; 101 fails: 202 is killed before it ran, and B loads
    the old kernel with the same generation, the same PIDs kept free and a new token."""
    upgrade_record(env, way_back=BACK, last_pid=9000, times={"entering": 6.0})
    criu = FakeRestorer(fail={"101"})

    with pytest.raises(Entered):
        boot.boot_restore(3, criu=criu, root=env.root, at_boot=True)

    assert criu.calls == ["202", "101"] and criu.killed == ["202"]
    kernel, initrd, line = way_back.loaded[0]
    assert kernel == env.root / BACK.kernel.lstrip("/")
    assert initrd == env.root / BACK.initrd.lstrip("/")
    assert line.startswith("root=/dev/vda1 ro memmap=256M!1G")
    args = back_cmdline(line)
    assert args["seamless.restore"] == "3" and args["seamless.last_pid"] == "9000"
    record = handoff.read(env.store.root)
    assert record is not None and record.refused is not None
    assert record.refused["release"] and "tree 101" in record.refused["reason"]
    assert "CRIU reported failure" in record.refused["reason"]
    # the old kernel's restorer may use it, once, with the new token only
    assert record.used_by_boot is None
    assert record.token_sha256 == handoff.digest(args["seamless.token"]) != handoff.digest(TOKEN)
    assert record.times["entering"] == 6.0 and "entering_back" in record.times
    assert env.gen.sealed  # nothing of the generation was used


def test_in_the_old_kernel_every_tree_is_restored_and_never_sent_back(
    env: BootEnv, way_back: FakeLoader, reports: tuple[Path, Path],  # noqa: F811
) -> None:
    refused = {"release": "6.12-new", "reason": "tree 101 could not be restored", "at": 7.0}
    upgrade_record(env, way_back=BACK, refused=refused)
    criu = FakeRestorer(fail={"101"})

    report = boot.boot_restore(3, criu=criu, root=env.root, at_boot=True).to_json()

    assert way_back.loaded == []  # at most one way back per upgrade
    assert report["refused"] == refused and not report["ok"]
    assert criu.killed == [] and {t["root"]: t["restored"] for t in report["trees"]} == {
        101: False, 202: True}


def test_when_every_tree_is_made_they_all_run(
    env: BootEnv, way_back: FakeLoader, reports: tuple[Path, Path],  # noqa: F811
) -> None:
    upgrade_record(env, way_back=BACK)
    criu = FakeRestorer()
    report = boot.boot_restore(3, criu=criu, root=env.root, at_boot=True, keep=True).to_json()
    assert report["ok"] and criu.killed == [] and way_back.loaded == []
    assert "refused" not in report


def test_a_failed_gate_sends_the_trees_back_before_any_is_made(
    env: BootEnv, way_back: FakeLoader, reports: tuple[Path, Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[list[str]] = []

    def failed_gate(commands: list[str], root: Path) -> str | None:
        asked.append(commands)
        return "the required command `test -e /dev/sdz` exited 1"

    monkeypatch.setattr(wayback, "failed_gate", failed_gate)
    upgrade_record(env, way_back=BACK, requires=["test -e /dev/sdz"])
    criu = FakeRestorer()
    with pytest.raises(Entered):
        boot.boot_restore(3, criu=criu, root=env.root, at_boot=True)
    assert asked == [["test -e /dev/sdz"]] and criu.calls == []
    record = handoff.read(env.store.root)
    assert record is not None and record.refused is not None
    assert "test -e /dev/sdz" in record.refused["reason"]


def test_a_failed_gate_without_a_way_back_keeps_the_generation(
    env: BootEnv, booted_with: list[str], reports: tuple[Path, Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    booted_with.append(f"seamless.token={TOKEN}")
    monkeypatch.setattr(wayback, "failed_gate", lambda commands, root: "it failed")
    upgrade_record(env, requires=["false"])  # --no-way-back was refused with it; hand-made
    criu = FakeRestorer()
    with pytest.raises(SeamlessError, match="not running the trees in this kernel: it failed"):
        boot.boot_restore(3, criu=criu, root=env.root, at_boot=True)
    assert criu.calls == [] and env.gen.sealed


def test_an_unreadable_way_back_restores_what_can_be_here(
    env: BootEnv, way_back: FakeLoader, reports: tuple[Path, Path],  # noqa: F811
) -> None:
    (env.root / BACK.kernel.lstrip("/")).unlink()  # a /boot the initramfs did not mount
    upgrade_record(env, way_back=BACK)
    report = boot.boot_restore(3, criu=FakeRestorer(fail={"101"}), root=env.root,
                               at_boot=True).to_json()
    assert way_back.loaded == [] and "is not readable in this boot" in report["no_way_back"]
    assert {t["root"]: t["restored"] for t in report["trees"]} == {101: False, 202: True}


def test_a_way_back_that_does_not_load_restores_what_can_be_here(
    env: BootEnv, way_back: FakeLoader, reports: tuple[Path, Path],  # noqa: F811
) -> None:
    way_back.fail = SeamlessError("kexec_file_load: Operation not permitted")
    upgrade_record(env, way_back=BACK)
    criu = FakeRestorer(fail={"101"})
    report = boot.boot_restore(3, criu=criu, root=env.root, at_boot=True).to_json()
    assert "Operation not permitted" in report["no_way_back"]
    assert criu.killed == ["202"] and criu.calls == ["202", "101", "202", "101"]
    assert {t["root"]: t["restored"] for t in report["trees"]} == {101: False, 202: True}


def test_a_restorer_failing_after_the_first_tree_is_made_sends_them_all_back(
    env: BootEnv, way_back: FakeLoader, reports: tuple[Path, Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(faults.ENV, "restored-one:fail")
    upgrade_record(env, way_back=BACK)
    criu = FakeRestorer()
    with pytest.raises(Entered):
        boot.boot_restore(3, criu=criu, root=env.root, at_boot=True)
    assert criu.killed == ["202"] and criu.calls == ["202"]  # 101 was not begun
    record = handoff.read(env.store.root)
    assert record is not None and record.refused is not None
    assert "injected fault at restored-one" in record.refused["reason"]


def test_trees_sharing_a_connection_over_loopback_are_held_like_any(
    env: BootEnv, way_back: FakeLoader, reports: tuple[Path, Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An application and its local service, connected over loopback, are held as any
    trees are: the one that cannot be made sends both back, the other killed unrun;
    their connection stays locked until then."""
    import shutil

    from seamless.restore import netlock
    from tests.test_boot_restore import seal_generation, tree

    locks: list[str] = []
    monkeypatch.setattr(netlock, "libnftables", locks.append)
    link = {"family": 4, "local": "127.0.0.1", "lport": 40000, "remote": "127.0.0.1",
            "rport": 8080}
    app, client = tree(101, 1, "app.service", "/usr/bin/app"), tree(202, 0, None, "client")
    app["loopback"] = client["loopback"] = [link]
    shutil.rmtree(env.gen.final)
    env.gen = seal_generation(env.gen.final, [app, client])
    upgrade_record(env, way_back=BACK)
    criu = FakeRestorer(fail={"101"})
    with pytest.raises(Entered):
        boot.boot_restore(3, criu=criu, root=env.root, at_boot=True)
    assert criu.killed == ["202"] and len(way_back.loaded) == 1
    assert any("conns4" in script for script in locks)  # the loopback lock was made


class ConcurrentRestorer:
    """Records which trees are held (made, unrun) at once."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.most = 0
        self.lock = threading.Lock()

    def restore(self, images_dir: Path, options: CriuOptions | None = None,
                on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        with self.lock:
            self.held.add(images_dir.name)
            self.most = max(self.most, len(self.held))
        assert on_notify is not None
        on_notify["post-restore"](Notification("post-restore", int(images_dir.name), 0.1))
        with self.lock:
            self.held.discard(images_dir.name)
        return CriuResult("restore", 0.1, images_dir=images_dir, pid=int(images_dir.name))

    def features(self, *names: str) -> dict[str, bool]:
        return dict.fromkeys(names, False)


def test_the_hold_keeps_every_tree_made_until_all_are(env: BootEnv) -> None:  # noqa: F811
    criu = ConcurrentRestorer()
    hold = Hold()
    report = restore_all(env.gen.final, criu, hold=hold, nft=lambda *a: None,
                         stream=lambda identifier, unit: open("/dev/null", "w").fileno())
    assert report.ok and criu.most == 2 and hold.reason is None
    # The tree made first waited for the other; each says how long it was held.
    first, last = report.trees
    assert first.held > 0 and first.held >= last.held


def map_line(proc: Path, pid: int, i: int, file: Path, name: str) -> str:
    """A line of ``pid``'s maps showing ``file`` as ``name``, and its map_files link."""
    area = f"7f{i:02x}000-7f{i:02x}fff"
    link = proc / str(pid) / "map_files" / area
    link.parent.mkdir(exist_ok=True)
    link.unlink(missing_ok=True)  # the tree restored again
    link.symlink_to(file)
    return f"{area} r--p 00000000 fe:01 {file.stat().st_ino} {name}\n"


def fake_proc(tmp_path: Path, maps: dict[int, list[str]], children: dict[int, list[int]]
              ) -> Path:
    """A /proc of these processes, whose root is tmp_path/fs: each maps ``maps[pid]``
    (paths in fs; a "NAME.cr.N.ghost=PATH" maps that ghost as the deleted PATH)."""
    proc, fs = tmp_path / "proc", tmp_path / "fs"
    fs.mkdir(exist_ok=True)
    for pid, paths in maps.items():
        (proc / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "fd").mkdir()
        (proc / str(pid) / "root").symlink_to(fs)
        lines = []
        for i, path in enumerate(paths):
            ghost, _, shown = path.partition("=")
            (fs / ghost).parent.mkdir(parents=True, exist_ok=True)
            (fs / ghost).touch()
            lines.append(map_line(proc, pid, i, fs / ghost, f"/{shown} (deleted)" if shown
                                  else f"/{ghost}"))
        (proc / str(pid) / "maps").write_text(
            "".join(lines) + "7ffd-7ffe rw-p 00000000 00:00 0 [stack]\n")
        (proc / str(pid) / "task" / str(pid) / "children").write_text(
            " ".join(map(str, children.get(pid, []))))
    return proc


def test_a_held_trees_ghosts_are_moved_aside_and_put_back(tmp_path: Path) -> None:
    """The ghosts of a tree's processes (children too), found by the inode of the deleted
    file each maps, are renamed where they are while it is held, and put back; another
    ghost, a file that is not deleted, are left."""
    from seamless.restore import restorer

    proc = fake_proc(tmp_path, {
        101: ["lib/libc.so.6.cr.5.ghost=lib/libc.so.6.cr_link", "lib/libm.so.6"],
        102: ["tmp/data.cr.1a.ghost=tmp/data"]}, {101: [102]})
    fs = tmp_path / "fs"
    (fs / "lib/libz.so.1.cr.5.ghost").touch()  # another tree's
    moved = restorer.move_ghosts(101, proc)
    assert sorted(str(p.relative_to(fs)) for p in fs.rglob("*") if p.is_file()) == [
        "lib/libc.so.6.cr.5.ghost.seamless-101", "lib/libm.so.6", "lib/libz.so.1.cr.5.ghost",
        "tmp/data.cr.1a.ghost.seamless-101"]
    restorer.put_back(moved)
    assert (fs / "lib/libc.so.6.cr.5.ghost").exists() and (fs / "tmp/data.cr.1a.ghost").exists()
    assert len(moved) == 2


class GhostlyRestorer(ConcurrentRestorer):
    """As CRIU does with a replaced library: each tree's ghost of it has the same name,
    made before post-restore (the name must be free) and removed after it."""

    def __init__(self, ghost: Path, proc: Path) -> None:
        super().__init__()
        self.ghost, self.proc = ghost, proc

    def restore(self, images_dir: Path, options: CriuOptions | None = None,
                on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        try:
            with open(self.ghost, "x") as f:
                f.write(images_dir.name)
        except FileExistsError as e:
            raise SeamlessError(f"Can't create ghost regfile: {e}") from e
        # the tree maps it through a link removed since
        (self.proc / images_dir.name / "maps").write_text(map_line(
            self.proc, int(images_dir.name), 0, self.ghost,
            f"/lib/{self.ghost.name.split('.cr.')[0]}.cr_link (deleted)"))
        result = super().restore(images_dir, options, on_notify)
        assert self.ghost.read_text() == images_dir.name  # its own, put back
        self.ghost.unlink()
        return result


def test_trees_with_ghosts_of_one_name_are_all_held_and_let_go_one_by_one(
    env: BootEnv, tmp_path: Path,  # noqa: F811
) -> None:
    from seamless.restore import restorer

    proc = fake_proc(tmp_path, {101: [], 202: []}, {})
    (tmp_path / "fs" / "lib").mkdir()
    criu = GhostlyRestorer(tmp_path / "fs" / "lib" / "libc.so.6.cr.5.ghost", proc)
    hold = Hold(move=lambda root: restorer.move_ghosts(root, proc))
    report = restore_all(env.gen.final, criu, hold=hold, nft=lambda *a: None,
                         stream=lambda identifier, unit: open("/dev/null", "w").fileno())
    assert report.ok, [t.error for t in report.trees]
    assert criu.most == 2 and list((tmp_path / "fs" / "lib").iterdir()) == []
    # without moving them aside, the second tree finds the name taken
    (tmp_path / "fs" / "lib").rmdir()
    (tmp_path / "fs" / "lib").mkdir()
    report = restore_all(env.gen.final, GhostlyRestorer(criu.ghost, proc),
                         hold=Hold(lambda r: []),
                         nft=lambda *a: None,
                         stream=lambda identifier, unit: open("/dev/null", "w").fileno())
    assert not report.ok and "Can't create ghost" in (report.trees[-1].error or "")


def test_a_gate_runs_in_the_real_root_and_says_how_it_failed() -> None:
    assert wayback.failed_gate(["true", "test 1 = 1"], Path("/")) is None
    why = wayback.failed_gate(["true", "echo no disk >&2; exit 3", "never"], Path("/"))
    assert why == "the required command `echo no disk >&2; exit 3` exited 3: no disk"


def test_a_gate_that_cannot_run_or_does_not_end_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    why = wayback.failed_gate(["true"], tmp_path / "no-root")  # chroot: no such root
    assert why is not None and why.startswith("the required command `true` ")
    monkeypatch.setattr(wayback, "GATE_TIMEOUT", 0.2)
    assert wayback.failed_gate(["sleep 5"], Path("/")) == (
        "the required command `sleep 5` did not end in 0 s")


def test_what_makes_the_way_back_unusable(tmp_path: Path) -> None:
    record = handoff.UpgradeRecord(generation=1, token_sha256="x", source_boot_id="a")
    assert "no way back" in (wayback.unusable(record, tmp_path) or "")
    record.way_back = BACK
    assert f"{BACK.kernel} is not readable" in (wayback.unusable(record, tmp_path) or "")
    for path in (BACK.kernel, BACK.initrd):
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.lstrip("/")).write_bytes(b"")
    assert wayback.unusable(record, tmp_path) is None
    record.refused = {"release": "6.12-new", "reason": "x"}
    assert "the way back already" in (wayback.unusable(record, tmp_path) or "")



def test_status_in_the_old_kernel_says_the_new_one_refused_and_exits_4(
    reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,  # noqa: F811
) -> None:
    from click.testing import CliRunner

    from seamless.cli import cli
    from seamless.restore import cli as restore_cli

    monkeypatch.setattr(restore_cli, "unrestored_upgrade", lambda: None)
    report = {"generation": 3, "from": OLD, "to": OLD, "ok": True, "stage": "initramfs",
              "refused": {"release": "6.12-new", "reason": "the required command `false` "
                          "exited 1", "at": 20.0},
              "trees": [{"root": 101, "unit": "app.service", "command": "app", "restored": True,
                         "pid": 101, "error": None}],
              "times": {"frozen": 1.0, "entering": 5.0, "refused": 20.0, "entering_back": 20.0,
                        "kernel_started": 22.0, "restorer_started": 30.0, "restored": 31.0}}
    metrics_dir = tmp_path / "node-exporter"
    metrics_dir.mkdir()
    monkeypatch.setattr(metrics, "TEXTFILE_DIR", metrics_dir)
    boot.write_report(Report.from_json(report), None)
    text = (metrics_dir / "seamless.prom").read_text()
    assert "seamless_last_upgrade_refused 1\n" in text
    assert "seamless_last_upgrade_success 0\n" in text  # its trees are back, on the old one
    out = CliRunner().invoke(cli, ["status"])
    assert out.exit_code == 4, out.output
    assert f"last upgrade: {OLD} -> 6.12-new, which refused it, -> back to {OLD} at" in out.output
    assert ("the upgrade to 6.12-new was REFUSED there: the required command `false` exited "
            "1. No tree ran in it; it went back to 6.1.0-old") in out.output
    phases = dict(boot.phases(Report.from_json(report)))
    assert phases["into the new kernel, to its refusal"] == 15.0
    assert phases["kexec to the restorer (the way back)"] == 10.0
    assert phases["total blackout (freeze to restored)"] == 30.0
