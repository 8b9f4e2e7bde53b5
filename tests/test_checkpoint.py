"""Holding dumped trees frozen together, and thawing them on any failure (fake CRIU)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from seamless.collect.checkpoint import (
    PRE_DUMP_DIR,
    HeldTrees,
    TreeDump,
    dump_all,
    dump_options,
    room_to_pre_dump,
    take_checkpoint,
)
from seamless.collect.processes import ProcessInfo, ProcessTree
from seamless.criu import (
    CriuError,
    CriuOptions,
    CriuResult,
    NetworkLock,
    Notification,
    NotifyHandler,
)
from seamless.errors import ExitCode, SeamlessError
from seamless.memstore import generation
from seamless.memstore.generation import Generation
from seamless.memstore.handoff import read_tree_info


def tree(pid: int) -> ProcessTree:
    p = ProcessInfo(pid, 1, "app", ("app",), "root", "/system.slice/app.service", 1 << 20)
    return ProcessTree(p, [p])


class FakeCriu:
    """Writes an image, announces post-dump and waits for the answer, like CRIU."""

    def __init__(self, fail_pid: int | None = None) -> None:
        self.fail_pid = fail_pid
        self.returned: list[int] = []
        self.thawed: list[int] = []  # post-dump answered with a failure: CRIU thaws
        self.lock = threading.Lock()

    def dump(self, images_dir: Path, options: CriuOptions,
             on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        assert options.pid is not None and options.leave_running
        if options.pid == self.fail_pid:
            raise CriuError("dump", "CRIU reported failure; errno 3 ESRCH")
        (images_dir / "pages-1.img").write_bytes(b"x" * 8192)
        assert on_notify is not None
        try:
            on_notify["post-dump"](Notification("post-dump", None, 0.01))
        except Exception as e:
            with self.lock:
                self.thawed.append(options.pid)
            raise CriuError("dump", "a notify handler failed") from e
        with self.lock:
            self.returned.append(options.pid)
        return CriuResult("dump", 0.01, images_dir=images_dir)


def test_every_tree_is_held_until_released(tmp_path: Path) -> None:
    criu = FakeCriu()
    held = dump_all([tree(10), tree(20)], tmp_path, criu)
    time.sleep(0.1)
    assert criu.returned == []  # both CRIUs still wait in post-dump: trees frozen
    assert all(d.bytes_written > 8192 for d in held.dumps)  # images and the tree's info
    info = read_tree_info(tmp_path / "10")  # as the new kernel's restore reads it
    assert (info.root, info.order, info.unit, info.pids) == (10, 0, "app.service", [10])
    held.release()
    assert sorted(criu.returned) == [10, 20]
    for d in held.dumps:
        assert d.dump_seconds is not None and d.freeze_seconds is not None
        assert d.freeze_seconds >= d.dump_seconds
    # The first tree was frozen while the second was dumped.
    first, second = held.dumps
    assert first.thawed_at is not None and second.frozen_at is not None
    assert first.thawed_at >= second.frozen_at


def test_a_failing_dump_thaws_the_trees_already_dumped(tmp_path: Path) -> None:
    criu = FakeCriu(fail_pid=20)
    with pytest.raises(CriuError) as exc:
        dump_all([tree(10), tree(20), tree(30)], tmp_path, criu)
    assert exc.value.status == ExitCode.UNCHANGED
    assert criu.thawed == [10] and criu.returned == []  # its dump failed at post-dump: thawed
    assert not (tmp_path / "30").exists()  # never started


def test_abort_thaws_held_trees(tmp_path: Path) -> None:
    criu = FakeCriu()
    held = dump_all([tree(10), tree(20)], tmp_path, criu)
    held.abort()
    assert sorted(criu.thawed) == [10, 20] and criu.returned == []
    assert all(d.error is None for d in held.dumps)  # an abort is not a CRIU failure


def test_dump_options_bring_what_a_real_host_has() -> None:
    opts = dump_options(tree(42))
    assert opts.pid == 42
    assert opts.leave_running and opts.shell_job and opts.tcp_established and opts.file_locks
    assert opts.tcp_skip_in_flight  # a server being connected to at the freeze still dumps
    assert opts.network_lock == NetworkLock.NFTABLES  # no iptables command on Debian 12
    assert opts.ghost_limit is not None and opts.ghost_limit > 1 << 20
    # a syslog datagram socket to /dev/log dumps even with no journal stream beside it
    assert opts.ext_unix_sk and opts.external == ()
    journald = dump_options(tree(42), [1234, 5678])
    assert journald.ext_unix_sk and journald.external == ("unix[1234]", "unix[5678]")


def test_criu_failing_after_post_dump_says_something_changed(tmp_path: Path) -> None:
    class LateFailure(FakeCriu):
        def dump(self, images_dir: Path, options: CriuOptions,
                 on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
            super().dump(images_dir, options, on_notify)
            raise CriuError("dump", "CRIU reported failure while resuming")

    held = dump_all([tree(10)], tmp_path, LateFailure())
    with pytest.raises(SeamlessError) as exc:
        held.release()
    assert exc.value.status == ExitCode.CHANGED
    assert "tree 10" in exc.value.message


class PreDumpingCriu(FakeCriu):
    """A pre-dump writes the whole memory; the dump after it only what changed."""

    def __init__(self, fail_pre_dump: bool = False) -> None:
        super().__init__()
        self.fail_pre_dump = fail_pre_dump
        self.dump_options: list[CriuOptions] = []

    def pre_dump(self, images_dir: Path, options: CriuOptions,
                 on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        assert options.track_mem
        if self.fail_pre_dump:
            (images_dir / "half.img").write_bytes(b"x")
            raise CriuError("pre-dump", "CRIU reported failure")
        (images_dir / "pages-1.img").write_bytes(b"m" * (1 << 20))
        return CriuResult("pre-dump", 0.01, images_dir=images_dir)

    def dump(self, images_dir: Path, options: CriuOptions,
             on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        self.dump_options.append(options)
        return super().dump(images_dir, options, on_notify)


def test_a_pre_dump_makes_the_frozen_dump_a_delta_hashed_ahead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    criu = PreDumpingCriu()
    hashed: list[str] = []
    real = generation._hash_range

    def counting(path: Path, name: str, offset: int, length: int | None) -> bytes:
        if offset == 0:  # a file's first piece: the file is hashed
            hashed.append(path.name)
        return real(path, name, offset, length)

    monkeypatch.setattr(generation, "_hash_range", counting)
    gen = Generation(tmp_path / "gen-1")
    times: dict[str, float] = {}
    held, manifest = take_checkpoint([tree(10)], gen, 1, leave_running=True, times=times,
                                     pre_dump=True, criu=criu)
    held.release()
    opts = criu.dump_options[0]
    assert opts.parent_img == PRE_DUMP_DIR and opts.track_mem
    assert times["pre_dumping"] <= times["frozen"] <= times["dumped"] <= times["sealed"]
    files = {f.path for f in manifest.files}
    assert {"10/pre/pages-1.img", "10/pages-1.img"} <= files
    assert hashed.count("pages-1.img") == 2  # the pre-dump's once, ahead; the delta once
    assert gen.verify() == []


def test_a_failed_pre_dump_falls_back_to_a_whole_dump(tmp_path: Path) -> None:
    criu = PreDumpingCriu(fail_pre_dump=True)
    gen = Generation(tmp_path / "gen-1")
    held, manifest = take_checkpoint([tree(10)], gen, 1, leave_running=True, pre_dump=True,
                                     criu=criu)
    held.release()
    assert criu.dump_options[0].parent_img is None
    assert not (gen.final / "10" / PRE_DUMP_DIR).exists()
    assert gen.verify() == []


def test_no_pre_dump_without_room(tmp_path: Path) -> None:
    huge = ProcessInfo(10, 1, "app", ("app",), "root", "/system.slice/app.service", 1 << 60)
    assert not room_to_pre_dump([ProcessTree(huge, [huge])], tmp_path)
    assert room_to_pre_dump([tree(10)], tmp_path)


def test_held_trees_say_which_their_criu_let_go_of(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    # 200: its CRIU was killed; 102, a child that ended unreaped, is never traced
    for pid, state, tracer in ((100, "S", 700), (101, "t", 700), (102, "Z", 0), (200, "S", 0)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "status").write_text(
            f"Name:\tapp\nState:\t{state} (x)\nTracerPid:\t{tracer}\n")
    app = ProcessInfo(100, 1, "app", ("app",), "root", "", 0)
    child = ProcessInfo(101, 100, "app", ("app",), "root", "", 0)
    zombie = ProcessInfo(102, 100, "app", ("app",), "root", "", 0)
    dumps = [TreeDump(ProcessTree(app, [app, child, zombie]), tmp_path / "100"),
             TreeDump(tree(200), tmp_path / "200"),
             TreeDump(tree(300), tmp_path / "300")]  # 300 ended while held: not loose
    held = HeldTrees(dumps)
    assert held.let_go(proc) == [200]
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    dumps[0]._thread = ended  # its dump call returned: CRIU no longer holds it
    assert held.let_go(proc) == [100, 200]


def test_dpkg_s_lock_holders_are_read_from_proc_locks(tmp_path: Path) -> None:
    import os

    from seamless.collect.inhibitors import dpkg_holders

    lock = tmp_path / "lock-frontend"
    lock.write_text("")
    st = os.stat(lock)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    proc = tmp_path / "proc"
    (proc / "4321").mkdir(parents=True)
    (proc / "4321" / "cmdline").write_bytes(b"apt-get\0install\0foo\0")
    (proc / "locks").write_text(
        f"1: POSIX  ADVISORY  WRITE 4321 {dev} 0 EOF\n"
        f"1: -> POSIX  ADVISORY  WRITE 999 {dev} 0 EOF\n"  # waiting for it, not holding
        "2: FLOCK  ADVISORY  WRITE 77 00:19:12 0 EOF\n")
    found = dpkg_holders((lock, tmp_path / "absent"), proc)
    assert [(h.who, h.pid) for h in found] == [("apt-get install foo", 4321)]
    assert str(found[0]).startswith("apt-get install foo (PID 4321): holds ")
    (proc / "locks").write_text("")
    assert dpkg_holders((lock,), proc) == []


def test_only_logind_s_blocking_shutdown_inhibitors_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from seamless.collect import inhibitors

    answer = {"type": "a(ssssuu)", "data": [[
        ["shutdown:sleep", "Unattended Upgrades Shutdown", "upgrades before shutdown",
         "delay", 0, 629],  # delays, never blocks: unattended-upgrades always has it
        ["shutdown", "backup", "writing the nightly backup", "block", 0, 700],
        ["sleep", "player", "playing", "block", 1000, 800]]]}

    def busctl(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        assert argv[:3] == ["busctl", "--json=short", "call"]
        return subprocess.CompletedProcess(argv, 0, json.dumps(answer).encode(), b"")

    monkeypatch.setattr(inhibitors, "run", busctl)
    assert inhibitors.shutdown_inhibitors() == [
        inhibitors.Inhibitor("backup", "writing the nightly backup", 700)]


@pytest.mark.parametrize("where", ["dumped", "sealed"])
def test_a_checkpoint_failing_after_its_dump_or_its_seal_leaves_no_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Found by the fault injection: a failure after the seal left a sealed generation,
    the processes' memory and something that looks like a checkpoint to restore."""
    from seamless import faults

    monkeypatch.setenv(faults.ENV, f"{where}:fail")
    criu = PreDumpingCriu()
    gen = Generation(tmp_path / "gen-1")
    with pytest.raises(faults.InjectedFault):
        take_checkpoint([tree(10)], gen, 1, leave_running=True, pre_dump=False, criu=criu)
    assert not gen.final.exists() and not gen.partial.exists()
    assert list(tmp_path.iterdir()) == []
