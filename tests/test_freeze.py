"""Freezing every tree at once through its cgroup, on a fake cgroup tree (nothing real is
frozen): which trees have a cgroup of their own, freeze and thaw, the timeout, and the
watchdog that thaws when the coordinator dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from seamless.collect import freeze
from seamless.collect.checkpoint import dump_all
from seamless.collect.freeze import Freezer, own_cgroup
from seamless.collect.processes import ProcessInfo, ProcessTree
from seamless.collect.resources import Network
from seamless.criu import CriuError
from seamless.errors import ExitCode, SeamlessError

from .test_checkpoint import FakeCriu


def make_cgroup(root: Path, path: str, pids: list[int], *, frozen: bool = True) -> Path:
    """A cgroup directory; ``frozen`` is what its cgroup.events says once asked to freeze
    (a fake kernel answers at once, or never)."""
    d = root / path.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    (d / "cgroup.threads").write_text("".join(f"{p}\n" for p in pids))
    (d / "cgroup.freeze").write_text("0\n")
    (d / "cgroup.events").write_text(f"populated 1\nfrozen {int(frozen)}\n")
    return d


def make_tree(root_pid: int, cgroup: str, *children: int) -> ProcessTree:
    members = [ProcessInfo(root_pid, 1, "app", ("app",), "root", cgroup, 1 << 20)]
    members += [ProcessInfo(c, root_pid, "app", ("app",), "root", cgroup, 1 << 20)
                for c in children]
    return ProcessTree(members[0], members)


def fake_proc(tmp_path: Path, parents: dict[int, int], *, state: str = "S") -> Path:
    proc = tmp_path / "proc"
    for pid, ppid in parents.items():
        (proc / str(pid)).mkdir(parents=True, exist_ok=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (a b) {state} {ppid} 0 0\n")
    return proc


def test_a_service_cgroup_holding_only_its_tree_is_its_own(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    make_cgroup(cg, "/system.slice/redis.service", [100, 101])
    assert own_cgroup(make_tree(100, "/system.slice/redis.service", 101), root=cg) == \
        "/system.slice/redis.service"


def test_a_cgroup_with_other_processes_is_not(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    make_cgroup(cg, "/user.slice/session-1.scope", [200, 300])  # two trees, one scope
    proc = fake_proc(tmp_path, {200: 1, 300: 1})
    assert own_cgroup(make_tree(200, "/user.slice/session-1.scope"), root=cg,
                      proc=proc) is None


def test_a_child_forked_since_the_plan_still_belongs(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    make_cgroup(cg, "/system.slice/web.service", [100, 150])
    proc = fake_proc(tmp_path, {100: 1, 150: 100})
    assert own_cgroup(make_tree(100, "/system.slice/web.service"), root=cg, proc=proc) == \
        "/system.slice/web.service"


def test_the_root_cgroup_is_never_frozen(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    make_cgroup(cg, "/", [100])
    assert own_cgroup(make_tree(100, "/"), root=cg) is None


def test_freeze_and_thaw_every_cgroup(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    a = make_cgroup(cg, "/system.slice/a.service", [100])
    b = make_cgroup(cg, "/system.slice/b.service", [200])
    trees = [make_tree(100, "/system.slice/a.service"), make_tree(200, "/system.slice/b.service")]
    freezer = Freezer.for_trees(trees, root=cg, watchdog=False)
    assert freezer.path(100) == str(a)
    freezer.freeze()
    assert (a / "cgroup.freeze").read_text() == "1" and (b / "cgroup.freeze").read_text() == "1"
    freezer.thaw()
    assert (a / "cgroup.freeze").read_text() == "0" and (b / "cgroup.freeze").read_text() == "0"


def test_a_cgroup_that_does_not_freeze_is_thawed_and_refused(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    a = make_cgroup(cg, "/system.slice/a.service", [100])
    b = make_cgroup(cg, "/system.slice/b.service", [200], frozen=False)
    freezer = Freezer({100: "/system.slice/a.service", 200: "/system.slice/b.service"},
                      root=cg, watchdog=False)
    with pytest.raises(SeamlessError) as e:
        freezer.freeze(timeout=0.2)
    assert e.value.status == ExitCode.UNCHANGED and "b.service" in str(e.value)
    assert (a / "cgroup.freeze").read_text() == "0" and (b / "cgroup.freeze").read_text() == "0"


def test_a_task_frozen_in_a_vfork_is_let_run_its_exec_then_frozen_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The shell waits in a vfork (D) for a child frozen before its exec: CRIU could never
    # stop it. The fake kernel lets the child exec while the cgroups are thawed.
    cg = tmp_path / "cg"
    a = make_cgroup(cg, "/system.slice/a.service", [100, 101])
    b = make_cgroup(cg, "/system.slice/b.service", [200])
    proc = fake_proc(tmp_path, {100: 1, 200: 1, 101: 100})
    fake_proc(tmp_path, {100: 1}, state="D")
    thawed = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if seconds == freeze.VFORK_PAUSE:
            thawed.append([(d / "cgroup.freeze").read_text() for d in (a, b)])
            fake_proc(tmp_path, {100: 1})  # the child ran its exec: the parent runs on
        real_sleep(0)

    monkeypatch.setattr(time, "sleep", sleep)
    freezer = Freezer({100: "/system.slice/a.service", 200: "/system.slice/b.service"},
                      root=cg, watchdog=False, proc=proc)
    freezer.freeze()
    assert thawed == [["0", "0"]]  # every cgroup thawed once, together
    assert (a / "cgroup.freeze").read_text() == "1" and (b / "cgroup.freeze").read_text() == "1"
    assert freezer.frozen_at is not None


def test_a_task_that_stays_in_a_vfork_is_refused_and_everything_thawed(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    a = make_cgroup(cg, "/system.slice/a.service", [100, 101])
    proc = fake_proc(tmp_path, {101: 100})
    fake_proc(tmp_path, {100: 1}, state="D")
    freezer = Freezer({100: "/system.slice/a.service"}, root=cg, watchdog=False, proc=proc)
    with pytest.raises(SeamlessError) as e:
        freezer.freeze(timeout=0.1)
    assert e.value.status == ExitCode.UNCHANGED and "vfork" in str(e.value)
    # the task in the vfork, not its child (the message's end: the path holds digits)
    assert str(e.value).endswith("a.service: 100)")
    assert (a / "cgroup.freeze").read_text() == "0"


def test_dump_all_hands_each_criu_its_cgroup_and_thaws_at_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cg = tmp_path / "cg"
    a = make_cgroup(cg, "/system.slice/a.service", [100])
    freezer = Freezer({100: "/system.slice/a.service"}, root=cg, watchdog=False)
    seen: list[str | None] = []
    # the sockets and addresses are read once for all trees, once they are frozen
    reads: list[str] = []
    network = Network([], {}, {}, set(), {}, 0.0)

    def read() -> Network:
        reads.append((a / "cgroup.freeze").read_text())
        return network

    monkeypatch.setattr(Network, "read", staticmethod(read))

    class Recording(FakeCriu):
        def dump(self, images_dir, options, on_notify=None):  # type: ignore[no-untyped-def]
            seen.append(options.freeze_cgroup)
            assert (a / "cgroup.freeze").read_text() == "1"  # frozen before the dump
            return super().dump(images_dir, options, on_notify)

    held = dump_all([make_tree(100, "/system.slice/a.service"), make_tree(300, "/x.scope")],
                    tmp_path / "images", Recording(), progress=lambda _: None,
                    freezer=freezer)
    assert seen == [str(a), None]
    # once after the freeze for the frozen cgroup's tree; the other tree (CRIU freezes
    # it) reads its own just before its dump
    assert reads == ["1", "1"]
    # Its freeze window starts when its cgroup froze, before the first dump.
    assert held.dumps[0].cgroup_frozen_at == freezer.frozen_at is not None
    assert held.dumps[1].cgroup_frozen_at is None
    assert (a / "cgroup.freeze").read_text() == "1"  # held
    held.release()
    assert (a / "cgroup.freeze").read_text() == "0"


def test_a_failed_dump_thaws_the_cgroups(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    a = make_cgroup(cg, "/system.slice/a.service", [100])
    freezer = Freezer({100: "/system.slice/a.service"}, root=cg, watchdog=False)
    trees = [make_tree(100, "/system.slice/a.service"), make_tree(200, "/b.scope")]
    with pytest.raises(CriuError):
        dump_all(trees, tmp_path / "images", FakeCriu(fail_pid=200),
                 progress=lambda _: None, freezer=freezer)
    assert (a / "cgroup.freeze").read_text() == "0"


def test_the_watchdog_thaws_when_the_coordinator_is_killed(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    # A real process in the fake cgroup, not traced: the watchdog stops once it thawed.
    a = make_cgroup(cg, "/system.slice/a.service", [os.getpid()])
    coordinator = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from pathlib import Path
        from seamless.collect.freeze import Freezer
        Freezer({{1: "/system.slice/a.service"}}, root=Path({str(cg)!r})).freeze()
        print("frozen", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE)
    assert coordinator.stdout is not None
    assert coordinator.stdout.readline() == b"frozen\n"
    assert (a / "cgroup.freeze").read_text() == "1"
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait()
    deadline = time.monotonic() + 10
    while (a / "cgroup.freeze").read_text() != "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (a / "cgroup.freeze").read_text() == "0"


def traced_proc(tmp_path: Path, tracers: dict[int, tuple[int, str]]) -> Path:
    """A /proc where each PID is traced by (tracer PID, its command name)."""
    proc = tmp_path / "proc"
    for pid, (tracer, comm) in tracers.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "status").write_text(f"Name:\tx\nTracerPid:\t{tracer}\n")
        if tracer:
            (proc / str(tracer)).mkdir(parents=True, exist_ok=True)
            (proc / str(tracer) / "comm").write_text(comm + "\n")
    return proc


def test_the_watchdog_waits_for_criu_only_not_for_a_debugger(tmp_path: Path) -> None:
    from seamless.collect import watchdog

    cg = tmp_path / "cg"
    a = make_cgroup(cg, "/system.slice/a.service", [100, 101])
    assert watchdog.held_by_criu([a], traced_proc(tmp_path / "1", {100: (0, ""),
                                                               101: (7, "criu")}))
    assert not watchdog.held_by_criu([a], traced_proc(tmp_path / "2", {100: (0, ""),
                                                                   101: (8, "gdb")}))
    assert not watchdog.held_by_criu([a], traced_proc(tmp_path / "3", {}))  # gone


def test_the_watchdog_thaws_for_as_long_as_criu_holds_a_task(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No time limit: CRIU freezes the cgroup again as it lets go, however late."""
    from seamless.collect import watchdog

    a = make_cgroup(tmp_path / "cg", "/system.slice/a.service", [100])
    (a / "cgroup.freeze").write_text("1")
    holds = iter([True] * 50 + [False])
    thawed: list[str] = []

    def held(paths: list[Path], proc: Path = Path("/proc")) -> bool:
        thawed.append((a / "cgroup.freeze").read_text())
        (a / "cgroup.freeze").write_text("1")  # CRIU froze it again
        return next(holds)

    monkeypatch.setattr(watchdog, "held_by_criu", held)
    monkeypatch.setattr(watchdog, "INTERVAL", 0)
    r, w = os.pipe()
    os.close(w)  # the coordinator is gone
    watchdog.watch([a], stdin=r)
    os.close(r)
    assert len(thawed) == 51 and set(thawed) == {"0"}
    assert (a / "cgroup.freeze").read_text() == "0"


def test_the_watchdog_outlives_the_terminal_s_signals(tmp_path: Path) -> None:
    a = make_cgroup(tmp_path / "cg", "/system.slice/a.service", [])
    (a / "cgroup.freeze").write_text("1")
    dog = subprocess.Popen([sys.executable, "-m", "seamless.collect.watchdog", str(a)],
                           stdin=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    time.sleep(0.5)  # its handlers are set
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        dog.send_signal(sig)
    time.sleep(0.2)
    assert dog.poll() is None and (a / "cgroup.freeze").read_text() == "1"
    assert dog.stdin is not None
    dog.stdin.close()
    assert dog.wait(10) == 0 and (a / "cgroup.freeze").read_text() == "0"
