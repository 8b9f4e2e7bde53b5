"""Choosing trees: on a made-up process table, and read-only on this host's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from seamless.collect.plan import StoreSpace, make_plan
from seamless.collect.processes import ProcessInfo, read_table
from seamless.collect.select import Rule, Selection, choose, load_config
from seamless.errors import SeamlessError


def proc(pid: int, ppid: int, name: str, cgroup: str = "", user: str = "root",
         rss: int = 1 << 20, kthread: bool = False) -> ProcessInfo:
    return ProcessInfo(pid, ppid, name, (name,), user, cgroup, rss, kthread)


TABLE = [
    proc(1, 0, "systemd", "/init.scope"),
    proc(2, 0, "kthreadd", kthread=True),
    proc(3, 2, "rcu_gp", kthread=True),
    proc(100, 1, "systemd-journal", "/system.slice/systemd-journald.service"),
    proc(110, 1, "dbus-daemon", "/system.slice/dbus.service"),
    proc(200, 1, "redis-server", "/system.slice/redis-server.service", user="redis",
         rss=100 << 20),
    proc(300, 1, "sshd", "/system.slice/ssh.service"),
    proc(301, 300, "sshd", "/user.slice/user-0.slice/session-1.scope"),
    proc(302, 301, "bash", "/user.slice/user-0.slice/session-1.scope"),
    proc(303, 302, "seamless", "/user.slice/user-0.slice/session-1.scope"),
    proc(304, 303, "criu", "/user.slice/user-0.slice/session-1.scope"),
    proc(310, 300, "sshd", "/user.slice/user-1000.slice/session-2.scope", user="alice"),
    proc(311, 310, "tmux", "/user.slice/user-1000.slice/session-2.scope", user="alice"),
    proc(400, 1, "systemd", "/user.slice/user-1000.slice/user@1000.service/init.scope",
         user="alice"),
    proc(401, 400, "pipewire",
         "/user.slice/user-1000.slice/user@1000.service/session.slice/pipewire.service",
         user="alice"),
    proc(500, 1, "python3", "/system.slice/app.service"),
    proc(501, 500, "python3", "/system.slice/app.service"),
]


def roots(selection: Selection | None = None, coordinator: int = 303) -> dict[int, list[int]]:
    choice = choose(TABLE, selection, coordinator=coordinator)
    return {t.root.pid: t.pids for t in choice.trees}


def reasons(selection: Selection | None = None) -> dict[int, str]:
    return {e.pid: e.reason for e in choose(TABLE, selection, coordinator=303).excluded}


def test_default_preserves_user_trees_and_leaves_out_the_rest() -> None:
    assert roots() == {200: [200], 310: [310, 311], 401: [401], 500: [500, 501]}
    why = reasons()
    assert "PID 1" in why[1]
    assert "journal" in why[100] and "dbus" not in why[100]
    assert "system bus" in why[110]
    assert "user service manager" in why[400]
    assert "this seamless command" in why[303]
    # The coordinator's own ancestors can't be dumped while it runs.
    assert {300, 301, 302} <= set(why)
    # Kernel threads are neither preserved nor listed.
    assert 2 not in why and 3 not in why


def test_plumbing_is_marked_restarted() -> None:
    choice = choose(TABLE, coordinator=303)
    restarted = {e.pid for e in choice.excluded if e.restarted}
    assert restarted == {100, 110, 400}


def test_unattended_upgrades_is_started_afresh_not_carried() -> None:
    """Debian's unattended-upgrades.service holds a system bus connection (which cannot
    be carried: the bus is restarted) and no state: it is left to the new boot."""
    table = [*TABLE, proc(600, 1, "unattended-upgr",
                          "/system.slice/unattended-upgrades.service")]
    choice = choose(table, coordinator=303)
    [left] = [e for e in choice.excluded if e.pid == 600]
    assert left.restarted and "system bus" in left.reason
    assert 600 not in {t.root.pid for t in choice.trees}


def test_exclude_rules_win_and_say_which_rule() -> None:
    sel = Selection.from_texts([], ["unit:redis-server.service", "user:alice"])
    assert set(roots(sel)) == {500}
    assert reasons(sel)[200] == "excluded by rule unit:redis-server.service"
    assert reasons(sel)[310] == "excluded by rule user:alice"


def test_include_rules_select_only_matching_trees() -> None:
    sel = Selection.from_texts(["cgroup:/system.slice", "comm:tmux"], [])
    assert set(roots(sel)) == {200, 500}  # tmux is not a tree root: sshd 310 is
    sel = Selection.from_texts(["pid:310"], [])
    assert roots(sel) == {310: [310, 311]}


def test_include_brings_back_plumbing_but_never_pid1_or_kernel_threads() -> None:
    sel = Selection.from_texts(["unit:dbus.service", "pid:1", "pid:2"], [])
    assert set(roots(sel)) == {110}


def test_rules_parse_or_say_what_is_wrong() -> None:
    assert Rule.parse("unit:a.service") == Rule("unit", "a.service")
    for bad in ("a.service", "colour:red", "pid:abc", "unit:"):
        with pytest.raises(SeamlessError):
            Rule.parse(bad)


def test_config_file_rules(tmp_path: Path) -> None:
    config = tmp_path / "seamless.toml"
    config.write_text('[select]\nexclude = ["comm:python3"]\ninclude = []\n')
    assert set(roots(load_config(config))) == {200, 310, 401}
    config.write_text("[select\n")
    with pytest.raises(SeamlessError, match="cannot read"):
        load_config(config)
    assert load_config(tmp_path / "missing.toml") == Selection()


def test_plan_refuses_a_store_too_small_and_a_missing_store() -> None:
    small = make_plan(TABLE, Selection(), StoreSpace("/dev/pmem0", 50 << 20), coordinator=303)
    assert not small.ok
    assert any("store has" in p for p in small.problems)
    missing = make_plan(TABLE, Selection(), StoreSpace(None, None, "no store"), coordinator=303)
    assert missing.problems == ["no store"]
    enough = make_plan(TABLE, Selection(), StoreSpace("/dev/pmem0", 1 << 30), coordinator=303)
    assert enough.needed > sum(t.rss for t in enough.trees)
    assert not enough.problems


def test_reads_this_hosts_table_without_touching_it() -> None:
    table = read_table()
    mine = next(p for p in table if p.pid == os.getpid())
    assert mine.ppid == os.getppid()
    choice = choose(table)
    assert os.getpid() not in {pid for t in choice.trees for pid in t.pids}
    assert all(not p.kthread for t in choice.trees for p in t.members)


def test_plan_command_json_on_this_host() -> None:
    """`seamless plan --json` runs read-only here and exits 4 (no store on this host)."""
    out = subprocess.run([sys.executable, "-m", "seamless", "plan", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 4, out.stderr
    data = json.loads(out.stdout)
    assert data["ok"] is False
    assert any(e["pid"] == 1 for e in data["excluded"]) or os.getpid() != 1


def test_unix_stream_peers_same_tree_other_tree_outside_and_journald() -> None:
    from seamless.collect.resources import Finding, UnixPeer, _unix_finding
    from seamless.memstore.handoff import JOURNALD_STDOUT

    sockets = {
        10: UnixPeer(10, 11, "*", True, (500,)), 11: UnixPeer(11, 10, "*", True, (501,)),
        20: UnixPeer(20, 21, "*", True, (500,)), 21: UnixPeer(21, 20, "*", True, (200,)),
        30: UnixPeer(30, 31, "*", True, (500,)), 31: UnixPeer(31, 30, "*", True, (110,)),
        40: UnixPeer(40, 41, "*", True, (500,)),
        41: UnixPeer(41, 40, JOURNALD_STDOUT, True, (100,)),
        50: UnixPeer(50, 51, "*", False, (500,)), 51: UnixPeer(51, 50, "*", False, (110,)),
    }
    tree_of = {500: 500, 501: 500, 200: 200}
    names = {110: "dbus-daemon", 200: "redis-server"}

    def finding(inode: int) -> Finding | None:
        return _unix_finding(500, "3", inode, sockets, tree_of, names)

    assert finding(10) is None  # both ends in one tree
    other = finding(20)
    assert other is not None and not other.blocking and "another tree" in other.resource
    outside = finding(30)
    assert outside is not None and outside.blocking and "dbus-daemon" in outside.resource
    assert "--exclude pid:500" in outside.hint
    # a service's: the remedy leaves its unit out, for systemd to start afresh
    unit = _unix_finding(500, "3", 30, sockets, tree_of, names, "app.service")
    assert unit is not None and "--exclude unit:app.service" in unit.hint
    assert "pid:" not in unit.hint
    journald = finding(40)
    assert journald is not None and not journald.blocking
    assert finding(50) is None  # datagram sockets are not half connections


def test_files_replaced_on_disk_are_shown_and_carried(tmp_path: Path) -> None:
    """A library an `apt full-upgrade` replaced is mapped deleted: the plan shows it,
    carried as a ghost file (not blocking); one larger than the images carry blocks."""
    import mmap

    from seamless.collect import resources
    from seamless.collect.processes import ProcessInfo, ProcessTree

    lib = tmp_path / "libold.so"
    lib.write_bytes(b"\x7fELF" + bytes(8188))
    held = open(lib, "rb")  # noqa: SIM115
    mapped = mmap.mmap(held.fileno(), 0, prot=mmap.PROT_READ)
    lib.unlink()
    try:
        me = ProcessInfo(os.getpid(), 1, "app", ("app",), "root", "/system.slice/a.service", 1)
        # (pytest holds deleted files of its own: its output captures)
        assert resources.replaced_files([os.getpid()])[str(lib)] == 8192
        [finding] = resources.replaced_files_findings(ProcessTree(me, [me]))
        assert not finding.blocking and "files replaced" in finding.resource
        assert "ghost" in finding.hint
        original = resources.GHOST_LIMIT
        try:
            resources.GHOST_LIMIT = 4096
            [large] = resources.replaced_files_findings(ProcessTree(me, [me]))
            assert large.blocking and large.resource == f"{lib} (deleted)"
        finally:
            resources.GHOST_LIMIT = original
    finally:
        mapped.close()
        held.close()


def test_the_services_left_out_by_the_operator_are_the_ones_stopped_before_the_kexec() -> None:
    """Left out by a rule or by no include rule: stopped (and started again in the new
    boot). Never plumbing, a user's own unit, a carried tree's unit, nor a unit this
    seamless command runs under (ssh.service, excluded, holds the operator's session)."""
    from seamless.collect.plan import left_out_services

    table = [*TABLE, proc(600, 1, "postgres", "/system.slice/postgresql@17-main.service")]
    selection = Selection.from_texts([], ["unit:postgresql@17-main.service",
                                          "unit:ssh.service", "unit:redis-server.service"])
    plan = make_plan(table, selection, StoreSpace("/dev/pmem0", 1 << 30), coordinator=303)
    assert left_out_services(plan, table, coordinator=303) == [
        "redis-server.service", "postgresql@17-main.service"]
    only_app = Selection.from_texts(["unit:app.service"], [])
    plan = make_plan(table, only_app, StoreSpace("/dev/pmem0", 1 << 30), coordinator=303)
    assert left_out_services(plan, table, coordinator=303) == [
        "redis-server.service", "postgresql@17-main.service"]  # sessions are scopes
    assert left_out_services(make_plan(table, Selection(), StoreSpace("/dev/pmem0", 1 << 30),
                                       coordinator=303), table, coordinator=303) == []


def test_open_tmpfs_files_more_than_a_tree_carries_block_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each open file on tmpfs is small enough to carry, but the tree carries only so
    much of them: the restore would miss one, so the plan names them, largest first."""
    from seamless import runtime
    from seamless.collect import resources
    from seamless.collect.processes import ProcessTree

    table = [("/", "ext4"), (str(tmp_path), "tmpfs")]
    # only this test's files: the test runner may itself run from /tmp (CI's clone),
    # and all it maps from there is lost at boot too
    found = resources.volatile_files
    monkeypatch.setattr(resources, "volatile_files", lambda pids, table: [
        p for p in found(pids, table) if p.startswith(str(tmp_path))])
    small, large = tmp_path / "small.lock", tmp_path / "large.state"
    small.write_bytes(bytes(100))
    large.write_bytes(bytes(3000))
    me = ProcessInfo(os.getpid(), 1, "app", ("app",), "root", "/system.slice/a.service", 1)
    with open(small, "rb"), open(large, "rb"):
        assert resources.carried_files_findings(ProcessTree(me, [me]), table) == []
        monkeypatch.setattr(runtime, "TREE_LIMIT", 2048)
        [finding] = resources.carried_files_findings(ProcessTree(me, [me]), table)
    assert finding.blocking and finding.pid == os.getpid()
    assert finding.resource == f"2 open files on tmpfs or in /tmp ({large}, {small})"
    assert "--exclude unit:a.service" in finding.hint


def test_open_files_are_carried_before_runtime_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When a tree's runtime files are more than it carries, what is left out is a file
    of a runtime directory (only missing afterwards), never a file the tree holds open
    (without which CRIU cannot restore it)."""
    from seamless import runtime

    rundir, held = tmp_path / "run" / "app", tmp_path / "crond.pid"
    rundir.mkdir(parents=True)
    (rundir / "a").write_bytes(bytes(1500))
    (rundir / "b").write_bytes(bytes(1500))
    held.write_bytes(bytes(1500))
    monkeypatch.setattr(runtime, "TREE_LIMIT", 4000)
    entries = runtime.collect([str(rundir)], [str(held)])
    files = [e["path"] for e in entries if e.get("kind") == "file"]
    assert files == [str(held), str(rundir / "a")]
    paths = [e["path"] for e in entries]
    assert paths.index(str(rundir)) < paths.index(str(rundir / "a"))  # parents first


def test_io_uring_remedy_is_mariadbs_setting_or_a_syscall_filter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MariaDB is told its own setting; any other program (BIND 9.20: libuv batches
    epoll_ctl in a ring, with no setting to turn it off) a drop-in that makes
    io_uring_setup fail, after which it uses epoll."""
    from seamless.collect import namespaces, resources
    from seamless.collect.processes import ProcessTree

    monkeypatch.setattr(namespaces, "uses_io_uring", lambda pid, proc=None: pid == 999_999_902)

    def hint(name: str, unit: str) -> str:
        root = ProcessInfo(999_999_901, 1, name, (name,), "root", f"/system.slice/{unit}", 1)
        child = ProcessInfo(999_999_902, 999_999_901, name, (name,), "root",
                            f"/system.slice/{unit}", 1)
        [finding] = [f for f in resources.sandbox_findings(ProcessTree(root, [root, child]))
                     if f.resource == "io_uring"]
        assert finding.blocking and finding.pid == 999_999_902
        return finding.hint

    assert "innodb_use_native_aio=0" in hint("mariadbd", "mariadb.service")
    named = hint("named", "named.service")
    assert "SystemCallFilter=~io_uring_setup:ENOSYS" in named
    assert "systemctl edit named.service" in named and "--exclude unit:named.service" in named


PHP_FPM_MAPS = """\
557136c00000-55713ac00000 r-xs 08000000 00:01 1051                       /dev/zero (deleted)
55713ad25000-55713ae08000 r--p 00000000 fe:00 13745                      /usr/sbin/php-fpm8.4
55713ae08000-55713b16a000 r-xp 000e3000 fe:00 13745                      /usr/sbin/php-fpm8.4
7fac26c04000-7fac26c1a000 r-xp 00004000 fe:00 7109                       /usr/lib/x.so
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_a_shared_code_mapping_below_the_programs_code_blocks_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PHP 8.4's opcache keeps a 64 MiB JIT buffer, shared and executable, below
    php-fpm's own code: CRIU writes its parasite's first instructions into the lowest
    executable mapping and cannot write to a shared one (POKEDATA: EIO), so the dump
    fails. The plan says so, with PHP's setting."""
    from seamless.collect import resources
    from seamless.collect.processes import ProcessTree

    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "maps").write_text(PHP_FPM_MAPS)
    assert resources.first_code_mapping(7, tmp_path) == ("r-xs", "/dev/zero (deleted)")
    (tmp_path / "7" / "maps").write_text(PHP_FPM_MAPS.split("\n", 1)[1])
    assert resources.first_code_mapping(7, tmp_path) == ("r-xp", "/usr/sbin/php-fpm8.4")
    (tmp_path / "7" / "maps").write_text(PHP_FPM_MAPS.splitlines()[-1] + "\n")
    assert resources.first_code_mapping(7, tmp_path) is None  # the vsyscall page is not one
    assert resources.first_code_mapping(8, tmp_path) is None  # gone

    shared = {999_999_902: ("r-xs", "/dev/zero (deleted)")}
    monkeypatch.setattr(resources, "first_code_mapping", lambda pid: shared.get(pid))
    unit = "/system.slice/php8.4-fpm.service"
    root = ProcessInfo(999_999_901, 1, "php-fpm8.4", ("php-fpm",), "root", unit, 1)
    child = ProcessInfo(999_999_902, 999_999_901, "php-fpm8.4", ("php-fpm",), "www-data",
                        unit, 1)
    [finding] = [f for f in resources.sandbox_findings(ProcessTree(root, [root, child]))
                 if "executable" in f.resource]
    assert finding.blocking and finding.pid == 999_999_902
    assert "opcache.jit_buffer_size=0" in finding.hint
    assert "--exclude unit:php8.4-fpm.service" in finding.hint
    shared.clear()
    assert not [f for f in resources.sandbox_findings(ProcessTree(root, [root, child]))
                if "executable" in f.resource]


def test_a_memfd_is_left_to_criu_and_a_deleted_foreign_file_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A memfd ("/memfd:NAME (deleted)", on a mount of the kernel's that no namespace
    shows: php-fpm's opcache lock) is no file of another namespace: CRIU carries it, and
    the restore must not try to open its name. A file opened in another namespace and
    deleted since (HAProxy's startup log buffer, in /dev/shm) cannot be opened again:
    the plan refuses it."""
    from seamless.collect import resources
    from seamless.collect.processes import ProcessTree

    fd = os.memfd_create("opcache_lock")
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:opcache_lock")
        assert str(fd) not in {f for f, *_ in resources._path_files(os.getpid())}
    finally:
        os.close(fd)

    me = ProcessInfo(os.getpid(), 1, "haproxy", ("haproxy",), "root",
                     "/system.slice/haproxy.service", 1)
    shm = "/dev/shm/haproxy_startup_logs_421 (deleted)"
    monkeypatch.setattr(resources, "foreign_files", lambda pids: {
        "file[1d9:4]": {"path": shm, "kind": "file", "flags": 0o500002, "pos": 0}})
    findings = [f for f in resources.inspect([ProcessTree(me, [me])], [me])
                if f.resource == shm]
    assert len(findings) == 1 and findings[0].blocking
    assert "--exclude unit:haproxy.service" in findings[0].hint


def test_processes_left_out_alike_are_one_line_with_their_pids() -> None:
    from seamless.collect.plan import _excluded_lines
    from seamless.collect.select import Excluded

    workers = [Excluded(300 + i, "(udev-worker)", "systemd-udevd.service",
                        "plumbing: systemd starts it afresh", True) for i in range(12)]
    init = Excluded(1, "/sbin/init", None, "PID 1", False)
    lines = _excluded_lines([init, *workers, Excluded(2000, "(udev-worker)", None,
                                                      "another reason", False)])
    assert len(lines) == 4, lines
    assert lines[0].split()[:2] == ["1", "/sbin/init"]
    assert lines[1].split()[:2] == ["300", "(udev-worker)"]
    assert lines[2].split() == ["and", "11", "alike:", "301,", "302,", "303,", "304,",
                                "305,", "306,", "307,", "308", "and", "3", "more"]
    assert lines[3].split()[0] == "2000" and "another reason" in lines[3]


def test_one_look_reads_each_process_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within one look (a checkpoint's questions about a frozen tree), each process's
    descriptors and maps are read once, whatever is asked; outside, every time."""
    from seamless import procfs
    from seamless.collect import resources

    reads = []
    fd_targets = procfs.fd_targets

    def counted(pid: int) -> Iterator[tuple[str, str]]:
        reads.append(pid)
        return fd_targets(pid)

    monkeypatch.setattr(procfs, "fd_targets", counted)
    opened = tmp_path / "held"
    opened.write_text("x")
    pid = os.getpid()
    with open(opened):
        with resources.one_look():
            first = resources.volatile_files([pid], [("/", "ext4"), (str(tmp_path), "tmpfs")])
            resources.disk_mounts([pid])
            resources.socket_dirs([pid], {})
            maps = resources._mapped_files(pid)
            assert resources._mapped_files(pid) == maps
        assert reads == [pid]
        assert str(opened) in first
        resources.disk_mounts([pid])
        resources.disk_mounts([pid])
    assert reads == [pid, pid, pid]
