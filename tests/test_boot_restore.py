"""The restore at boot on the host: adopting services, the report, the generation's wipe.

Nothing here runs CRIU, mounts, loads modules or talks to systemd: an autouse
fixture makes every subprocess, every ``seamless.run.run`` and every libc call
fail the test, and each test replaces what the restore would start with fakes.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner, Result

import seamless.run
from seamless import stop, syscalls
from seamless.cli import cli
from seamless.criu import (
    CriuError,
    CriuNotifyError,
    CriuOptions,
    CriuResult,
    Notification,
    NotifyHandler,
)
from seamless.errors import ExitCode, SeamlessError
from seamless.memstore import handoff
from seamless.memstore.generation import MANIFEST, Generation
from seamless.memstore.handoff import TREE_INFO, Report
from seamless.memstore.records import FileEntry, Manifest, TreeRecord
from seamless.memstore.store import GENERATIONS, Store
from seamless.restore import adopt, boot, bootfs, lazy

SOURCE = "6.1.0-55-cloud-amd64"

#: The real one, for the one test that runs a harmless shell script (the fixture
#: below forbids every command).
REAL_POPEN = subprocess.Popen


class ForbiddenLibc:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a test reached the real libc.{name}")


@pytest.fixture(autouse=True)
def no_lost_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    """`seamless status` looks in the store for an upgrade that never came back: none
    here (the tests that want one say so)."""
    from seamless.restore import cli as restore_cli

    monkeypatch.setattr(restore_cli, "unrestored_upgrade", lambda: None)


@pytest.fixture(autouse=True)
def no_real_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any command, CRIU, mount or syscall left unpatched fails the test instead of running."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a test reached a real command: {args!r}")

    real_run = seamless.run.run
    for name, module in list(sys.modules.items()):
        if name.startswith("seamless.") and getattr(module, "run", None) is real_run:
            monkeypatch.setattr(module, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(os, "system", forbidden)
    monkeypatch.setattr(os, "posix_spawn", forbidden)
    monkeypatch.setattr(os, "posix_spawnp", forbidden)
    monkeypatch.setattr(syscalls, "_libc", ForbiddenLibc())
    monkeypatch.setattr(boot, "load_criu_modules", forbidden)
    monkeypatch.setattr(boot, "open_store", forbidden)
    monkeypatch.setattr(boot, "unmount", forbidden)
    monkeypatch.setattr(boot, "hand_over", forbidden)


@pytest.fixture(autouse=True)
def reports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """The reports go under tmp_path, never to /run or /var."""
    run_report = tmp_path / "report-run" / "last-upgrade.json"
    var_report = tmp_path / "report-var" / "last-upgrade.json"
    monkeypatch.setattr(boot, "REPORT_RUN", run_report)
    monkeypatch.setattr(boot, "REPORT_VAR", var_report)
    monkeypatch.setattr(boot, "DEFERRED", tmp_path / "report-run" / "deferred")
    return run_report, var_report


# --- adopting services ------------------------------------------------------------------------


def test_service_with_a_unit_file_gets_a_drop_in(tmp_path: Path) -> None:
    unit_dir = tmp_path / "lib/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "app.service").write_text("[Service]\nExecStart=/usr/bin/app\n")

    written = adopt.adopt("app.service", 4242, root=tmp_path)

    dropin = tmp_path / "run/systemd/system/app.service.d/50-seamless-adopt.conf"
    assert written == dropin and dropin.is_file()
    lines = dropin.read_text().splitlines()
    assert "Type=forking" in lines
    assert "PIDFile=/run/seamless/adopt/app.service.pid" in lines
    exec_start = [line for line in lines if line.startswith("ExecStart=")]
    # reset, then /bin/true outside the unit's sandbox (the restored process has its own)
    assert exec_start == ["ExecStart=", "ExecStart=+/bin/true"]
    for reset in ("ExecCondition=", "ExecStartPre=", "ExecStartPost="):
        assert reset in lines
    assert "SendSIGKILL=yes" in lines  # systemd refuses SendSIGKILL=no units with processes
    pid_file = tmp_path / "run/seamless/adopt/app.service.pid"
    assert pid_file.read_text() == "4242\n"
    assert pid_file.parent.stat().st_mode & 0o077 == 0
    # The unit keeps its own file: no whole runtime unit. It is wanted by this boot, so
    # that systemd adopts it even if nothing else wants it (started by hand, never
    # enabled: the boot would leave its restored process unknown to systemd).
    assert not (tmp_path / "run/systemd/system/app.service").exists()
    link = tmp_path / "run/systemd/system/multi-user.target.wants/app.service"
    assert os.readlink(link) == "/lib/systemd/system/app.service"


def test_the_drop_ins_serve_one_start_then_the_units_are_their_own(tmp_path: Path) -> None:
    """Once systemd started the adopted units, seamless-adopted.service removes their
    drop-ins and reloads: restart, reload and stop use the units' own definitions."""
    (tmp_path / "lib/systemd/system").mkdir(parents=True)
    for name in ("web.service", "db@main.service"):
        (tmp_path / "lib/systemd/system" / name.replace("@main", "@")).write_text("[Service]\n")
    dropins = [adopt.adopt("web.service", 7, root=tmp_path),
               adopt.adopt("db@main.service", 8, root=tmp_path)]
    assert adopt.finish_unit([], root=tmp_path) is None
    unit = adopt.finish_unit(dropins, root=tmp_path)
    assert unit == tmp_path / "run/systemd/system" / adopt.FINISH_UNIT
    text = unit.read_text()
    assert "After=db@main.service web.service" in text.splitlines()
    # not part of the boot (Type=exec), it waits until the boot has finished, then
    # removes the drop-ins and reloads; $ doubled for systemd, continued lines joined
    assert "Type=exec" in text.splitlines()
    command = text.split("ExecStart=", 1)[1].replace("\\\n", " ").replace("$$", "$")
    script = shlex.split(command)[2]
    assert shlex.split(command)[:2] == ["/bin/sh", "-c"]
    assert 'case "$(systemctl is-system-running)" in initializing|starting) sleep 1' in script
    # the drop-ins and the links that made the boot start the units: their own
    # enablement is back too
    assert script.index("rm -f /run/systemd/system/web.service.d/50-seamless-adopt.conf "
                        "/run/systemd/system/db@main.service.d/50-seamless-adopt.conf "
                        "/run/systemd/system/multi-user.target.wants/db@main.service "
                        "/run/systemd/system/multi-user.target.wants/web.service") \
        < script.index("exec /bin/systemctl daemon-reload")
    wants = tmp_path / "run/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "db@main.service") == "/lib/systemd/system/db@.service"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text("#!/bin/sh\necho \"$@\" >> \"$LOG\"\n"
                                    "[ \"$1\" != is-system-running ] || echo running\n")
    (fake / "systemctl").chmod(0o755)
    log = tmp_path / "calls"
    script = script.replace("/bin/systemctl", str(fake / "systemctl")).replace(
        "/run/systemd/system", str(tmp_path / "run/systemd/system"))
    with REAL_POPEN(["sh", "-c", script], env={**os.environ, "LOG": str(log),
                                              "PATH": f"{fake}:{os.environ['PATH']}"}) as sh:
        assert sh.wait(timeout=30) == 0
    assert log.read_text().splitlines() == ["is-system-running", "daemon-reload"]
    assert not any((tmp_path / "run/systemd/system").glob("*.d/50-seamless-adopt.conf"))
    assert sorted(p.name for p in wants.iterdir()) == [adopt.FINISH_UNIT]
    assert os.readlink(wants / adopt.FINISH_UNIT) == f"../{adopt.FINISH_UNIT}"


def test_unit_file_found_in_etc(tmp_path: Path) -> None:
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    (tmp_path / "etc/systemd/system/web.service").write_text("[Service]\n")
    written = adopt.adopt("web.service", 7, root=tmp_path)
    assert written.name == adopt.DROPIN and written.parent.name == "web.service.d"


def test_transient_service_gets_a_whole_runtime_unit(tmp_path: Path) -> None:
    written = adopt.adopt("run-u42.service", 1234, root=tmp_path)

    runtime = tmp_path / "run/systemd/system"
    assert written == runtime / "run-u42.service"
    text = written.read_text()
    assert "Description=run-u42 (restored by seamless)" in text
    lines = text.splitlines()
    assert "Type=forking" in lines and "ExecStart=/bin/true" in lines
    assert "PIDFile=/run/seamless/adopt/run-u42.service.pid" in lines
    assert (tmp_path / "run/seamless/adopt/run-u42.service.pid").read_text() == "1234\n"
    link = runtime / "multi-user.target.wants/run-u42.service"
    assert link.is_symlink()
    assert os.readlink(link) == "../run-u42.service"  # relative: valid in the real root too
    assert link.resolve() == written.resolve()
    assert not (runtime / "run-u42.service.d").exists()


def test_adopting_twice_is_fine(tmp_path: Path) -> None:
    adopt.adopt("run-u42.service", 1234, root=tmp_path)
    written = adopt.adopt("run-u42.service", 5678, root=tmp_path)
    assert (tmp_path / "run/seamless/adopt/run-u42.service.pid").read_text() == "5678\n"
    link = tmp_path / "run/systemd/system/multi-user.target.wants/run-u42.service"
    assert os.readlink(link) == "../run-u42.service"
    assert written.is_file()

    (tmp_path / "lib/systemd/system").mkdir(parents=True)
    (tmp_path / "lib/systemd/system/app.service").write_text("[Service]\n")
    first = adopt.adopt("app.service", 10, root=tmp_path)
    second = adopt.adopt("app.service", 11, root=tmp_path)
    assert first == second and second.read_text().count("ExecStart=+/bin/true") == 1
    assert (tmp_path / "run/seamless/adopt/app.service.pid").read_text() == "11\n"


@pytest.mark.parametrize("unit", ["session-3.scope", "app", "../../etc/evil.service",
                                  "a/b.service", "user.slice"])
def test_only_service_names_are_adopted(tmp_path: Path, unit: str) -> None:
    with pytest.raises(ValueError, match="not a service unit name"):
        adopt.adopt(unit, 1, root=tmp_path)
    assert not (tmp_path / "run").exists()  # nothing written


def test_template_instance_gets_a_drop_in(tmp_path: Path) -> None:
    (tmp_path / "lib/systemd/system").mkdir(parents=True)
    (tmp_path / "lib/systemd/system/worker@.service").write_text("[Service]\n")
    written = adopt.adopt("worker@1.service", 99, root=tmp_path)
    assert written.parent.name == "worker@1.service.d"


# --- the pieces of the boot restore -----------------------------------------------------------


def test_corrupt_trees_groups_files_by_tree() -> None:
    assert boot.corrupt_trees([]) == {}
    assert boot.corrupt_trees(["101/pages-1.img", "202/mm-202.img", "101/core-101.img"]) == {
        "101": "corrupt images: 101/pages-1.img, 101/core-101.img",
        "202": "corrupt images: 202/mm-202.img",
    }


@pytest.mark.parametrize(("cmdline", "expected"), [
    ("BOOT_IMAGE=/vmlinuz ro seamless.restore=3 quiet", 3),
    ("seamless.restore=12 seamless.last_pid=5000", 12),
    ("root=/dev/vda1 ro quiet", None),
    ("seamless.restore=abc", None),
    ("seamless.restore=-1", None),
    ("seamless.restore=", None),
    ("seamless.restored=3", None),
    ("", None),
])
def test_generation_from_cmdline(cmdline: str, expected: int | None) -> None:
    assert boot.generation_from_cmdline(cmdline) == expected


def test_phases_only_spans_with_both_times() -> None:
    report = {"times": {"frozen": 10.0, "dumped": 12.5, "restorer_started": 20.0,
                        "restored": 21.25, "finished": 22.0}}
    assert boot.phases(Report.from_json(report)) == [
        ("freeze and dump", 2.5),
        ("restore", 1.25),
        ("total blackout (freeze to restored)", 11.25),
    ]
    assert boot.phases(Report.from_json({})) == []
    assert boot.phases(Report.from_json({"times": {"frozen": 1.0}})) == []
    full = {"times": {"frozen": 1.0, "dumped": 2.0, "sealed": 2.5, "entering": 3.0,
                      "restorer_started": 7.0, "restored": 9.0}}
    assert [name for name, _ in boot.phases(Report.from_json(full))] == [
        "freeze and dump", "seal (checksums, manifest)", "kexec to the restorer", "restore",
        "total blackout (freeze to restored)"]
    assert dict(boot.phases(Report.from_json(full)))["kexec to the restorer"] == 4.0
    split = {"times": {**full["times"], "kernel_started": 4.0, "restorer_exec": 6.5}}
    assert dict(boot.phases(Report.from_json(split)))["  leaving the old kernel"] == 1.0
    assert dict(boot.phases(Report.from_json(split)))["  new kernel's boot to the restorer"] == 2.5
    assert dict(boot.phases(Report.from_json(split)))["  the restorer's start (python)"] == 0.5
    assert "    importing the restorer" not in dict(boot.phases(Report.from_json(split)))
    split["times"]["python_started"] = 6.75
    assert dict(boot.phases(Report.from_json(split)))["    the interpreter's start"] == 0.25
    assert dict(boot.phases(Report.from_json(split)))["    importing the restorer"] == 0.25


def test_boot_times_from_uptime_and_the_process_start(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "uptime").write_text("30.00 55.00\n")
    fields = ["S"] + ["0"] * 18 + [str(25 * os.sysconf("SC_CLK_TCK"))] + ["0"] * 20
    (tmp_path / "self" / "stat").write_text("1234 (seamless (x)) " + " ".join(fields) + "\n")
    assert boot.boot_times(1000.0, tmp_path) == {"kernel_started": 970.0,
                                                  "restorer_exec": 995.0}
    assert boot.boot_times(1000.0, tmp_path / "missing") == {}


def test_last_report_is_the_newest(reports: tuple[Path, Path]) -> None:
    run_report, var_report = reports
    assert boot.last_report() is None

    var_report.parent.mkdir(parents=True)
    var_report.write_text(json.dumps({"generation": 1, "times": {"finished": 100.0}}))
    report = boot.last_report()
    assert report is not None and report.generation == 1

    run_report.parent.mkdir(parents=True)
    run_report.write_text(json.dumps({"generation": 2, "times": {"finished": 200.0}}))
    report = boot.last_report()
    assert report is not None and report.generation == 2

    var_report.write_text(json.dumps({"generation": 3, "times": {"finished": 300.0}}))
    report = boot.last_report()
    assert report is not None and report.generation == 3

    var_report.write_text("{not json")
    report = boot.last_report()
    assert report is not None and report.generation == 2

    # a restore that has not finished yet (no "finished"): newer than generation 2's
    run_report.write_text(json.dumps({"generation": 4, "finishing": True,
                                      "times": {"restored": 400.0}}))
    report = boot.last_report()
    assert report is not None and report.generation == 4


def seal_generation(final: Path, trees: list[dict[str, Any]], number: int = 3) -> Generation:
    """A sealed generation as `seamless upgrade` leaves it: each tree's images and
    seamless-tree.json (as checkpoint.tree_info writes it) in a directory of its own."""
    gen = Generation(final)
    partial = gen.create()
    for info in trees:
        d = partial / str(info["root"])
        d.mkdir()
        (d / TREE_INFO).write_text(json.dumps(info, indent=2))
        (d / "pages-1.img").write_bytes(bytes([info["root"] % 251]) * 5000)
        (d / f"core-{info['root']}.img").write_bytes(b"core" * 10)
        (d / "dump.log").write_text("(00.000001) dumping\n")
    gen.seal(Manifest(generation=number, source_release=SOURCE, created=1.0, trees=[
        TreeRecord(root=i["root"], unit=i["unit"], command=i["command"], pids=i["pids"])
        for i in trees]))
    return gen


def tree(root: int, order: int, unit: str | None, command: str) -> dict[str, Any]:
    return {"order": order, "root": root, "pids": [root, root + 1], "unit": unit,
            "cgroup": f"/system.slice/{unit}" if unit else "/", "command": command,
            "user": "root", "external": []}


def test_wipe_generation_overwrites_then_removes(tmp_path: Path) -> None:
    gen = seal_generation(tmp_path / "gen-3", [tree(101, 0, "app.service", "/usr/bin/app")])
    pages = gen.final / "101" / "pages-1.img"
    size = pages.stat().st_size
    kept = tmp_path / "kept-link"
    os.link(pages, kept)  # another name for the same inode sees what the wipe wrote
    # what else a tree's directory may hold: a link to a pre-dump, a lazy daemon's socket
    (gen.final / "101" / "parent").symlink_to("../../gen-3/none")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(gen.final / "101" / "lazy-pages.socket"))

    gen.wipe()

    assert not gen.final.exists() and not gen.partial.exists()
    assert kept.read_bytes() == bytes(size)  # overwritten with zeros before the unlink
    assert tmp_path.is_dir()


# --- boot_restore -----------------------------------------------------------------------------


class FakeRestorer:
    """CRIU's restore, answering for each tree's directory name."""

    def __init__(self, fail: set[str] | None = None, lazy_works: bool = True) -> None:
        self.fail = fail or set()
        self.calls: list[str] = []
        self.killed: list[str] = []  # made, then killed before it ran (post-restore)
        self.lazy: list[bool] = []
        self.lazy_works = lazy_works

    def restore(self, images_dir: Path, options: CriuOptions | None = None,
                on_notify: Mapping[str, NotifyHandler] | None = None) -> CriuResult:
        assert (images_dir / TREE_INFO).is_file()
        self.calls.append(images_dir.name)
        self.lazy.append(bool(options and options.lazy_pages))
        if images_dir.name in self.fail:
            raise CriuError("restore", "CRIU reported failure", cr_errno=17)
        handler = (on_notify or {}).get("post-restore")
        if handler is not None:  # as CRIU: a handler that fails kills the tree unrun
            try:
                handler(Notification("post-restore", int(images_dir.name), 0.2))
            except Exception as e:
                self.killed.append(images_dir.name)
                raise CriuNotifyError("restore", f"the post-restore handler failed ({e}), "
                                      "so CRIU stopped") from e
        return CriuResult("restore", 0.25, images_dir=images_dir, pid=int(images_dir.name))

    def features(self, *names: str) -> dict[str, bool]:
        return dict.fromkeys(names, self.lazy_works)


@dataclass
class BootEnv:
    store: Store
    gen: Generation
    root: Path
    unmounted: list[Path] = field(default_factory=list)
    handed_over: list[list[str]] = field(default_factory=list)
    modules_loaded: int = 0

    def restore(self, criu: FakeRestorer, number: int | None = 3,
                keep: bool = False) -> dict[str, Any]:
        """The restore's report, as it is written (and as status --json prints it)."""
        return boot.boot_restore(number, keep=keep, criu=criu, root=self.root).to_json()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> BootEnv:
    store = Store(tmp_path / "store")
    (store.root / GENERATIONS).mkdir(parents=True)
    # restored second (order 1): a service without a unit file in the new root
    app = tree(101, 1, "app.service", "/usr/bin/app --serve")
    # restored first (order 0): a login session's tree, not a service
    shell = tree(202, 0, "session-3.scope", "sleep 1000")
    gen = seal_generation(store.generations_dir / "gen-3", [app, shell])
    root = tmp_path / "root"
    root.mkdir()
    e = BootEnv(store, gen, root)

    def load_criu_modules() -> None:
        e.modules_loaded += 1

    monkeypatch.setattr(boot, "open_store", lambda: store)
    monkeypatch.setattr(boot, "unmount", e.unmounted.append)
    monkeypatch.setattr(boot, "hand_over", e.handed_over.append)
    monkeypatch.setattr(boot, "load_criu_modules", load_criu_modules)
    return e


TOKEN = "0123456789abcdef0123456789abcdef"


def upgrade_record(env: BootEnv, **fields: Any) -> handoff.UpgradeRecord:
    """The record `seamless upgrade` leaves for generation 3, for a kexec with TOKEN."""
    record = handoff.UpgradeRecord(generation=3, token_sha256=handoff.digest(TOKEN),
                                   source_boot_id=env.gen.manifest().source_boot_id,
                                   **fields)
    handoff.write(env.store.root, record)
    return record


def trees_by_root(report: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {t["root"]: t for t in report["trees"]}


def test_all_restored_in_order_adopted_reported_and_wiped(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_record(env, times={"frozen": 5.0, "entering": 6.0, "restorer_started": 1.0},
                   result={"to": "B", "state": "entering", "bytes": 4096})
    criu = FakeRestorer()
    # what `seamless status` finds while the services are handed over (before the wipe)
    early: list[dict[str, object] | None] = []

    def hand_over(units: list[str]) -> None:
        env.handed_over.append(units)
        last = boot.last_report()
        early.append(last.to_json() if last is not None else None)

    monkeypatch.setattr(boot, "hand_over", hand_over)

    report = env.restore(criu)

    assert criu.calls == ["202", "101"]  # the dump order, not the directory names'
    assert report["ok"] is True and report["generation"] == 3
    assert report["from"] == SOURCE and report["to"] == os.uname().release
    assert report["corrupt"] == []
    # what `seamless upgrade --json` said before the kexec, for `status --json`
    assert report["upgrade"] == {"to": "B", "state": "entering", "bytes": 4096}
    assert report["stage"] == "initramfs"  # no /run/systemd/system under the root
    trees = trees_by_root(report)
    assert trees[101]["restored"] and trees[101]["pid"] == 101
    assert trees[202]["restored"] and trees[202]["pid"] == 202
    assert report["adopted"] == ["app.service"]  # not the scope
    assert env.handed_over == [["app.service"]]
    assert (env.root / "run/systemd/system/app.service").is_file()
    assert (env.root / "run/seamless/adopt/app.service.pid").read_text() == "101\n"
    assert not (env.root / "run/seamless/adopt/session-3.scope.pid").exists()
    # the upgrade's own times are kept, the restorer's start is this boot's
    times = report["times"]
    assert times["frozen"] == 5.0 and times["entering"] == 6.0
    assert times["restorer_started"] > 1.0
    assert times["restorer_started"] <= times["restored"] <= times["finished"]
    # wiped: it held process memory
    assert report["wiped"] is True and not env.gen.final.exists()
    assert env.modules_loaded == 1
    assert env.unmounted == [env.store.root]
    for path in (*reports, env.store.root / "report-3.json"):
        assert json.loads(path.read_text()) == report
    # the trees were reported running before the generation was overwritten
    assert early and early[0] is not None and early[0]["finishing"] is True
    assert early[0]["trees"] == report["trees"] and "wiped" not in early[0]
    assert "finishing" not in report


def test_before_init_a_sandboxed_tree_defers_every_tree_to_the_restore_unit(
    env: BootEnv, reports: tuple[Path, Path], tmp_path: Path
) -> None:
    """CRIU makes a mount namespace again only with the real root as its root, which the
    initramfs's chroot is not: restored before init, a generation with a sandboxed
    service leaves all its trees to seamless-restore.service (no report, so the unit
    runs), which restores them all and says why."""
    sandboxed = tree(303, 2, "redis-server.service", "redis-server")
    sandboxed["mount_namespace"] = True
    others = [json.loads((env.gen.final / d / TREE_INFO).read_text()) for d in ("101", "202")]
    gen = seal_generation(env.store.generations_dir / "gen-4", [*others, sandboxed])
    criu = FakeRestorer()

    report = boot.boot_restore(4, criu=criu, root=env.root)

    assert criu.calls == [] and env.modules_loaded == 0
    assert (report.deferred or "").startswith(
        "1 tree not restorable before init (redis-server.service: a mount namespace of its own)")
    assert not reports[0].exists() and not reports[1].exists()
    assert gen.final.exists() and env.unmounted == [env.store.root]
    # after switch-root: all three, the reason in the report
    (env.root / "run/systemd/system").mkdir(parents=True)
    report = boot.boot_restore(4, criu=criu, root=env.root)
    assert sorted(criu.calls) == ["101", "202", "303"] and report.ok
    assert report.stage == "systemd" and (report.deferred or "").startswith("1 tree")
    assert json.loads(reports[0].read_text())["deferred"] == report.deferred


def test_before_init_a_tree_connected_to_a_socket_the_boot_makes_later_is_deferred(
    env: BootEnv, reports: tuple[Path, Path]
) -> None:
    """An sshd session holds a datagram socket connected to journald's syslog socket,
    which CRIU connects again by its path: before init it is not there, so the trees
    wait for seamless-restore.service. A path that is there defers nothing."""
    session = tree(404, 2, "ssh.service", "sshd: /usr/sbin/sshd -D")
    session["peer_paths"] = ["/run/systemd/journal/dev-log"]
    others = [json.loads((env.gen.final / d / TREE_INFO).read_text()) for d in ("101", "202")]
    gen = seal_generation(env.store.generations_dir / "gen-4", [*others, session])
    assert boot.trees_after_init(gen, env.root) == [
        "ssh.service: connected to /run/systemd/journal/dev-log, made after init"]
    report = boot.boot_restore(4, criu=(criu := FakeRestorer()), root=env.root)
    assert criu.calls == [] and "ssh.service: connected to" in (report.deferred or "")
    sock = env.root / "run/systemd/journal/dev-log"
    sock.parent.mkdir(parents=True)
    sock.touch()
    assert boot.trees_after_init(gen, env.root) == []


def test_before_init_a_tree_on_a_filesystem_mounted_later_is_deferred(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before init only the root is mounted: a tree with files on /srv, which fstab
    mounts, waits with the others for seamless-restore.service (after local-fs.target).
    Once /srv is mounted, nothing is deferred."""
    on_srv = tree(505, 2, "app.service", "app")
    on_srv["mounts"] = ["/srv"]
    others = [json.loads((env.gen.final / d / TREE_INFO).read_text()) for d in ("101", "202")]
    gen = seal_generation(env.store.generations_dir / "gen-4", [*others, on_srv])
    mounted: set[Path] = set()
    monkeypatch.setattr(bootfs, "is_mount", lambda p: p in mounted)
    assert boot.trees_after_init(gen, env.root) == [
        "app.service: its files on /srv, mounted after init"]
    report = boot.boot_restore(4, criu=(criu := FakeRestorer()), root=env.root)
    assert criu.calls == [] and "app.service: its files on /srv" in (report.deferred or "")
    mounted.add(env.root / "srv")
    assert boot.trees_after_init(gen, env.root) == []


def test_a_generation_the_upgrade_left_to_the_unit_is_reported_with_the_upgrade_s_reasons(
    env: BootEnv, reports: tuple[Path, Path]
) -> None:
    """The command line said the trees wait for the real root (seamless.after_init): the
    initramfs left its note and started no restorer; the unit restores every tree and
    reports why, as the upgrade's plan found it."""
    upgrade_record(env, after_init=["redis-server.service: a mount namespace of its own"])
    (env.root / "run/systemd/system").mkdir(parents=True)
    boot.DEFERRED.parent.mkdir(parents=True, exist_ok=True)
    boot.DEFERRED.write_text(boot.PLANNED + "\n")
    report = env.restore(criu := FakeRestorer())
    assert sorted(criu.calls) == ["101", "202"] and report["ok"]
    assert report["stage"] == "systemd" and report["deferred"] == (
        "1 tree not restorable before init (redis-server.service: a mount namespace of its "
        "own): restored after switch-root")


def test_a_page_image_too_short_for_criu_is_reported_as_corrupt(
    env: BootEnv, reports: tuple[Path, Path]
) -> None:
    pages = env.gen.final / "202" / "pages-1.img"
    pages.write_bytes(pages.read_bytes()[:100])  # CRIU fails before its post-restore
    report = env.restore(FakeRestorer(fail={"202"}))
    assert report["corrupt"] == ["202/pages-1.img"]
    assert trees_by_root(report)[202]["error"] == "corrupt images: 202/pages-1.img"
    assert trees_by_root(report)[101]["restored"]


@pytest.mark.parametrize(("image", "made"), [
    ("core-202.img", []),  # what CRIU acts on is verified first: it never sees the tree
    ("pages-1.img", ["202"]),  # verified while restoring: killed before it runs
])
def test_a_corrupt_tree_is_not_restored_and_the_generation_kept(
    env: BootEnv, reports: tuple[Path, Path], image: str, made: list[str]
) -> None:
    pages = env.gen.final / "202" / image
    data = bytearray(pages.read_bytes())
    data[10] ^= 0xFF  # one flipped byte, after the seal
    pages.write_bytes(bytes(data))
    criu = FakeRestorer()

    report = env.restore(criu)

    assert criu.calls == [*made, "101"]
    assert criu.killed == made
    assert report["ok"] is False
    assert report["corrupt"] == [f"202/{image}"]
    trees = trees_by_root(report)
    assert not trees[202]["restored"] and trees[202]["pid"] is None
    assert trees[202]["error"] == f"corrupt images: 202/{image}"
    assert trees[101]["restored"] and trees[101]["pid"] == 101
    assert report["adopted"] == ["app.service"] and env.handed_over == [["app.service"]]
    assert "wiped" not in report
    assert (env.gen.final / MANIFEST).is_file() and pages.is_file()  # kept to look at
    assert json.loads(reports[0].read_text())["ok"] is False
    assert env.unmounted == [env.store.root]


def test_a_criu_failure_stops_no_other_tree_and_keeps_the_generation(env: BootEnv) -> None:
    criu = FakeRestorer(fail={"101"})

    report = env.restore(criu)

    assert criu.calls == ["202", "101"]
    assert report["ok"] is False
    trees = trees_by_root(report)
    assert not trees[101]["restored"] and "criu restore failed" in trees[101]["error"]
    assert "EEXIST" in trees[101]["error"]
    assert trees[202]["restored"] and trees[202]["pid"] == 202
    assert report["adopted"] == [] and env.handed_over == []  # a failed service: nothing
    assert not (env.root / "run").exists()
    assert "wiped" not in report and env.gen.sealed
    stored = json.loads((env.store.root / "report-3.json").read_text())
    assert stored["trees"] == report["trees"]


def test_keep_leaves_a_restored_generation(env: BootEnv) -> None:
    report = env.restore(FakeRestorer(), keep=True)
    assert report["ok"] is True and "wiped" not in report
    assert env.gen.sealed and env.gen.verify() == []


def test_newest_generation_when_none_is_named(env: BootEnv) -> None:
    older = seal_generation(env.store.generations_dir / "gen-2",
                            [tree(303, 0, None, "/bin/old")], number=2)
    criu = FakeRestorer()
    report = env.restore(criu, number=None)
    assert report["generation"] == 3 and sorted(criu.calls) == ["101", "202"]
    assert older.sealed  # another generation is never wiped


def test_a_missing_generation_is_reported_and_the_store_unmounted(
    env: BootEnv, reports: tuple[Path, Path]
) -> None:
    criu = FakeRestorer()
    with pytest.raises(SeamlessError, match="no generation 7"):
        env.restore(criu, number=7)
    assert criu.calls == []
    written = json.loads(reports[0].read_text())
    assert written["ok"] is False and "no generation 7" in written["error"]
    assert "finished" in written["times"]
    assert env.unmounted == [env.store.root] and env.gen.sealed


def test_no_store_is_reported(monkeypatch: pytest.MonkeyPatch,
                              reports: tuple[Path, Path]) -> None:
    def no_store() -> Store:
        raise SeamlessError("no preserved region")

    monkeypatch.setattr(boot, "open_store", no_store)
    with pytest.raises(SeamlessError, match="no preserved region"):
        boot.boot_restore(3, criu=FakeRestorer())
    for path in reports:
        written = json.loads(path.read_text())
        assert written["error"] == "no preserved region" and written["ok"] is False
        assert written["generation"] == 3


# --- handing over to systemd ------------------------------------------------------------------


@pytest.fixture
def systemctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    """hand_over's commands, recorded; its /run/systemd/system is under tmp_path."""
    calls: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> None:
        assert kwargs.get("check") is False
        calls.append(list(argv))

    monkeypatch.setattr(boot, "hand_over", HAND_OVER)
    monkeypatch.setattr(boot, "run", run)
    monkeypatch.setattr(boot, "Path", lambda p: tmp_path / str(p).lstrip("/"))
    return calls


HAND_OVER = boot.hand_over


def pid_1(tmp_path: Path, comm: str) -> None:
    (tmp_path / "proc/1").mkdir(parents=True)
    (tmp_path / "proc/1/comm").write_text(comm + "\n")


def test_hand_over_when_systemd_runs(systemctl: list[list[str]], tmp_path: Path) -> None:
    pid_1(tmp_path, "systemd")
    boot.hand_over(["a.service", "b.service"])
    assert systemctl == [["systemctl", "daemon-reload"],
                         ["systemctl", "start", "--no-block", "a.service", "b.service"]]


def test_no_hand_over_before_init(systemctl: list[list[str]], tmp_path: Path) -> None:
    """Restored before init, the adoption has made /run/systemd/system for the systemd
    to come; the initramfs's init is PID 1: nothing to tell systemd yet."""
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    pid_1(tmp_path, "sh")
    boot.hand_over(["a.service"])
    assert systemctl == []
    (tmp_path / "proc/1/comm").unlink()
    boot.hand_over(["a.service"])
    assert systemctl == []


# --- seamless status --------------------------------------------------------------------------

REPORT = {
    "generation": 3, "from": SOURCE, "to": "6.1.0-56-cloud-amd64", "ok": False,
    "times": {"frozen": 100.0, "dumped": 101.5, "sealed": 102.0, "entering": 102.5,
              "restorer_started": 110.0, "restored": 112.0, "finished": 113.0},
    "trees": [
        {"root": 101, "unit": "app.service", "command": "/usr/bin/app --serve",
         "restored": True, "pid": 101, "seconds": 0.5, "error": None},
        {"root": 202, "unit": None, "command": "sleep 1000", "restored": False, "pid": None,
         "seconds": 0.0, "error": "corrupt images: 202/pages-1.img"},
    ],
    "adopted": ["app.service"],
}


def status(*args: str) -> Result:
    return CliRunner().invoke(cli, ["status", *args], standalone_mode=False)


def test_status_lists_trees_and_phases(reports: tuple[Path, Path]) -> None:
    reports[0].parent.mkdir(parents=True)
    reports[0].write_text(json.dumps(REPORT))

    result = status()

    assert result.return_value == ExitCode.CHECK_FAILED, result.output  # not every tree
    out = result.stdout
    assert f"last upgrade: {SOURCE} -> 6.1.0-56-cloud-amd64" in out
    assert "generation 3" in out and "NOT all trees restored" in out
    lines = out.splitlines()
    app = next(line for line in lines if "app.service" in line)
    assert "101" in app and "/usr/bin/app --serve" in app and "restored as 101" in app
    sleep = next(line for line in lines if "sleep 1000" in line)
    assert " - " in sleep and "FAILED: corrupt images: 202/pages-1.img" in sleep
    phase = {line.split("  ")[1].strip(): line for line in lines if line.endswith(" s")}
    assert "1.50 s" in phase["freeze and dump"]
    assert "7.50 s" in phase["kexec to the restorer"]
    assert "12.00 s" in phase["total blackout (freeze to restored)"]


def test_status_says_a_restore_still_finishing(reports: tuple[Path, Path]) -> None:
    reports[0].parent.mkdir(parents=True)
    reports[0].write_text(json.dumps({**REPORT, "finishing": True}))

    result = status()

    assert result.exception is None, result.output
    assert "still finishing" in result.stdout


def test_status_json_has_phases(reports: tuple[Path, Path]) -> None:
    reports[1].parent.mkdir(parents=True)
    reports[1].write_text(json.dumps({**REPORT, "ok": True}))

    result = status("--json")

    assert result.exception is None and not result.return_value, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is True and out["trees"] == REPORT["trees"]
    assert out["schema_version"] == 1 and out["host"] and out["seamless_version"]
    assert len(out["this_boot"]) == 36
    assert out["phases"] == {
        "freeze and dump": 1.5, "seal (checksums, manifest)": 0.5,
        "kexec to the restorer": 7.5, "restore": 2.0,
        "total blackout (freeze to restored)": 12.0}


def test_status_says_whether_the_memory_of_a_lazy_restore_is_back(
    reports: tuple[Path, Path],
) -> None:
    reports[0].parent.mkdir(parents=True)
    reports[0].write_text(json.dumps({**REPORT, "memory": "arriving"}))
    assert "memory: still arriving" in status().stdout
    times = {"restored": 112.0, "memory_back": 121.0}
    reports[0].write_text(json.dumps({**REPORT, "memory": "back", "times": times}))
    out = status().stdout
    assert "memory: all back" in out
    assert "9.00 s" in next(line for line in out.splitlines() if "memory back" in line)


def test_status_without_a_report() -> None:
    result = status()
    assert isinstance(result.exception, SeamlessError)
    assert result.exception.status == ExitCode.UNCHANGED
    assert "no upgrade has been restored" in result.exception.message
    assert result.stdout == ""
    standalone = CliRunner().invoke(cli, ["status"])
    assert standalone.exit_code == ExitCode.UNCHANGED
    assert "no upgrade has been restored on this machine yet" in standalone.stderr


# --- a retry by hand (seamless restore --generation N) -----------------------------------------


def test_a_retry_restores_only_what_failed_then_wipes(
    env: BootEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_record(env, times={"frozen": 5.0, "entering": 6.0})
    first = env.restore(FakeRestorer(fail={"101"}))
    assert not first["ok"] and env.gen.sealed
    monkeypatch.setattr(psutil, "pid_exists", lambda pid: pid == 202)
    criu = FakeRestorer()

    report = boot.boot_restore(3, criu=criu, root=env.root,
                               previous=Report.from_json(first)).to_json()

    assert criu.calls == ["101"]  # 202 runs since the boot: not restored twice
    assert report["ok"] is True and report["wiped"] is True and not env.gen.final.exists()
    trees = trees_by_root(report)
    assert trees[202]["restored"] and trees[202]["earlier"] and trees[202]["pid"] == 202
    assert trees[101]["restored"] and not trees[101]["earlier"]
    assert report["adopted"] == ["app.service"] and env.handed_over == [["app.service"]]
    times = report["times"]  # the boot's phases stay; the retry has its own
    assert times["restored"] == first["times"]["restored"] and times["frozen"] == 5.0
    assert times["retry_started"] <= times["retry_restored"] <= times["finished"]
    assert dict(boot.phases(Report.from_json(report)))["retry by hand (seamless restore)"] >= 0
    assert report["stage"] == first["stage"] == "initramfs"


def test_a_retry_restores_again_a_tree_that_no_longer_runs(
    env: BootEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = env.restore(FakeRestorer(fail={"101"}))
    monkeypatch.setattr(psutil, "pid_exists", lambda pid: False)
    assert boot.still_running(Report.from_json(first), 3) == {}
    assert boot.still_running(Report.from_json(first), 4) == {}  # another generation's report
    monkeypatch.setattr(psutil, "pid_exists", lambda pid: True)
    assert boot.still_running(Report.from_json(first), 3) == {202: 202}
    criu = FakeRestorer()
    boot.boot_restore(3, criu=criu, root=env.root,
                      previous=Report.from_json({**first, "generation": 2}))
    assert criu.calls == ["202", "101"]  # an older report says nothing of generation 3


# --- lazy restore -----------------------------------------------------------------------------


class FakePager:
    """A `criu lazy-pages` daemon that has finished with ``status``."""

    status = 0

    def __init__(self, images_dir: Path) -> None:
        self.images_dir = images_dir

    @classmethod
    def start(cls, images_dir: Path) -> FakePager:
        return cls(images_dir)

    def wait(self, timeout: float | None = None) -> int:
        return self.status

    def log_tail(self) -> str:
        return "Error (criu/uffd.c:900): uffd_copy: Bad address" if self.status else ""

    def stop(self) -> None:
        raise AssertionError("no restore failed")


@dataclass
class Finisher:
    """What boot_restore leaves to the process it forks."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)


def lazy_upgrade(env: BootEnv, monkeypatch: pytest.MonkeyPatch) -> Finisher:
    upgrade_record(env, times={"frozen": 5.0}, lazy_pages=True)
    monkeypatch.setattr(boot, "Pager", FakePager)
    finisher = Finisher()
    monkeypatch.setattr(boot, "finish_in_background", finisher)
    return finisher


def test_a_lazy_restore_leaves_the_wipe_to_when_the_memory_is_back(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    finisher = lazy_upgrade(env, monkeypatch)
    criu = FakeRestorer()

    report = env.restore(criu)

    assert criu.lazy == [True, True]
    assert report["ok"] and report["memory"] == "arriving"
    assert env.gen.final.exists() and env.unmounted == []  # the daemons read from it
    # bounded should the finisher die: the hourly expiry overwrites it a day later
    assert env.store.kept_until(3) == report["kept_until"] > time.time()
    assert json.loads(reports[0].read_text())["memory"] == "arriving"
    assert env.handed_over == [["app.service"]]
    ((rep, store, gen, pagers, keep),) = finisher.calls
    assert sorted(pagers) == [101, 202] and keep is False

    boot.finish_lazy(rep, store, gen, pagers, keep)

    final = json.loads(reports[0].read_text())
    assert final["ok"] and final["memory"] == "back" and final["wiped"]
    assert final["times"]["restored"] <= final["times"]["memory_back"]
    assert not env.gen.final.exists() and env.unmounted == [env.store.root]
    assert ("memory back (lazy restore, trees running)"
            in dict(boot.phases(Report.from_json(final))))


def restored_in_initramfs(env: BootEnv, monkeypatch: pytest.MonkeyPatch,
                          mark: Path) -> tuple[Any, ...]:
    """A lazy restore as the initramfs-tools script runs it (told of its handed-over
    mark); what it leaves to its finisher."""
    finisher = lazy_upgrade(env, monkeypatch)
    env.restore(FakeRestorer())
    monkeypatch.setenv(boot.HANDED_OVER_ENV, str(mark))
    return finisher.calls[0]


def test_the_finisher_of_a_boot_restore_waits_until_run_is_in_the_real_root_for_good(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # initramfs-tools: the memory can be back while /run is still in the real root from
    # the restore's move, about to leave it until init moves it back: nothing is wiped or
    # written before the boot script's mark shows it has come back.
    import threading

    mark = tmp_path / "boot-handed-over"
    done = threading.Thread(target=boot.finish_lazy,
                            args=restored_in_initramfs(env, monkeypatch, mark), daemon=True)
    done.start()
    time.sleep(0.6)
    assert done.is_alive() and env.gen.final.exists() and env.unmounted == []
    assert json.loads(reports[0].read_text())["memory"] == "arriving"
    mark.touch()
    done.join(timeout=10)
    assert not done.is_alive()
    assert json.loads(reports[0].read_text())["wiped"] and not env.gen.final.exists()


def test_a_finisher_that_never_sees_run_back_touches_nothing_there(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    finish = restored_in_initramfs(env, monkeypatch, tmp_path / "never-made")
    reports[0].unlink()
    monkeypatch.setattr(boot, "_visible", lambda path, within=300: path.exists())

    boot.finish_lazy(*finish)

    # no wipe, no report made under the mount point; the one on disk says why
    assert env.gen.final.exists() and not reports[0].exists()
    assert "did not come back" in json.loads(reports[1].read_text())["error"]


def test_a_tree_whose_memory_did_not_arrive_is_stopped_and_the_generation_kept(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    finisher = lazy_upgrade(env, monkeypatch)
    killed: list[int] = []
    monkeypatch.setattr(lazy, "kill_tree", killed.append)
    env.restore(FakeRestorer())
    ((rep, store, gen, pagers, keep),) = finisher.calls
    pagers[101].status = 2

    boot.finish_lazy(rep, store, gen, pagers, keep)

    final = json.loads(reports[0].read_text())
    assert killed == [101]
    assert not final["ok"] and final["memory"] == "incomplete"
    tree = trees_by_root(final)[101]
    assert not tree["restored"] and "Bad address" in tree["error"]
    assert trees_by_root(final)[202]["restored"]
    assert env.gen.final.exists() and "wiped" not in final


def test_without_userfaultfd_the_restore_copies_every_page_first(
    env: BootEnv, monkeypatch: pytest.MonkeyPatch,
) -> None:
    finisher = lazy_upgrade(env, monkeypatch)
    criu = FakeRestorer(lazy_works=False)

    report = env.restore(criu)

    assert criu.lazy == [False, False] and finisher.calls == []
    assert report["ok"] and report["wiped"] and "memory" not in report


def test_a_failed_wipe_after_a_lazy_restore_is_reported_not_left_arriving(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    finisher = lazy_upgrade(env, monkeypatch)
    env.restore(FakeRestorer())

    def wipe(gen: Generation) -> None:
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(Generation, "wipe", wipe)
    boot.finish_lazy(*finisher.calls[0])

    final = json.loads(reports[0].read_text())
    assert final["memory"] == "back" and "not wiped" in final["error"]
    assert env.unmounted == [env.store.root]


def test_an_error_after_a_lazy_restore_still_leaves_the_memory_to_the_finisher(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    finisher = lazy_upgrade(env, monkeypatch)

    def hand_over(units: list[str]) -> None:
        raise SeamlessError("systemctl daemon-reload failed")

    monkeypatch.setattr(boot, "hand_over", hand_over)
    with pytest.raises(SeamlessError):
        env.restore(FakeRestorer())

    assert len(finisher.calls) == 1 and env.unmounted == []  # the daemons still read
    assert "daemon-reload" in json.loads(reports[0].read_text())["error"]


def test_a_retry_while_a_lazy_restore_s_memory_arrives_is_refused(
    env: BootEnv, monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = {"generation": 3, "memory": "arriving", "times": {"restored": 1.0},
             "trees": [{"root": 202, "pid": 202, "restored": True}]}
    monkeypatch.setattr(boot, "lazy_daemons_run", lambda: True)
    criu = FakeRestorer()
    with pytest.raises(SeamlessError, match="still arriving"):
        boot.boot_restore(3, criu=criu, root=env.root, previous=Report.from_json(first))
    assert criu.calls == [] and env.gen.final.exists()
    monkeypatch.setattr(boot, "lazy_daemons_run", lambda: False)  # the daemons are gone
    report = boot.boot_restore(3, criu=criu, root=env.root,
                               previous=Report.from_json(first)).to_json()
    assert criu.calls and report["generation"] == 3


@pytest.mark.parametrize("where", ["usr/local/lib/systemd/system",
                                   "run/systemd/generator.late"])
def test_a_unit_from_usr_local_or_a_generator_keeps_its_file(tmp_path: Path, where: str) -> None:
    """An operator's unit in /usr/local, or one a generator made (a SysV script's, after
    switch-root), gets a drop-in: a whole runtime unit would shadow it for good."""
    (tmp_path / where).mkdir(parents=True)
    (tmp_path / where / "legacy.service").write_text("[Service]\n")
    written = adopt.adopt("legacy.service", 7, root=tmp_path)
    assert written.name == adopt.DROPIN


def test_a_users_unit_named_like_a_system_unit_is_not_adopted(
    env: BootEnv, reports: tuple[Path, Path]
) -> None:
    """A user's own ssh.service (in their systemd --user manager) is restored, but the
    system's ssh.service is not handed its process."""
    (env.root / "lib/systemd/system").mkdir(parents=True)
    (env.root / "lib/systemd/system/ssh.service").write_text("[Service]\n")
    users = tree(404, 2, "ssh.service", "/home/mallory/fake-sshd")
    users["cgroup"] = "/user.slice/user-1000.slice/user@1000.service/app.slice/ssh.service"
    gen = seal_generation(env.store.generations_dir / "gen-4", [users])
    report = boot.boot_restore(4, criu=FakeRestorer(), root=env.root)
    assert trees_by_root(report.to_json())[404]["restored"] and report.adopted == []
    assert not (env.root / "run/systemd/system/ssh.service.d").exists()
    assert not (env.root / "run/seamless/adopt/ssh.service.pid").exists()
    assert gen.final.exists() is False  # restored and wiped as usual
    assert adopt.system_unit(users["cgroup"]) == "user@1000.service"
    assert adopt.system_unit("/system.slice/ssh.service") == "ssh.service"


@pytest.mark.parametrize(("stage", "code"), [("initramfs", 0), ("systemd", ExitCode.CHANGED)])
def test_a_restore_left_to_the_unit_is_no_failure_of_the_initramfs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stage: str, code: int
) -> None:
    """Before init, a generation left to seamless-restore.service exits 0 (the boot
    script would say the restore failed); the unit's own restore says how it went. The
    hooks' own call, through seamless.entry (without click), and its --json report."""
    from seamless import entry

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(stop, "install", lambda: None)
    asked = []

    def fake(number: int | None, **kw: object) -> Report:
        asked.append((number, kw))
        return Report(4, ok=False, deferred="1 tree with a mount namespace of its own",
                      stage=stage)

    monkeypatch.setattr(boot, "boot_restore", fake)
    monkeypatch.setattr(sys, "argv", ["seamless", "restore", "--boot", "--json",
                                      "--generation", "4"])
    with pytest.raises(SystemExit) as exc:
        entry.main()
    assert exc.value.code == code
    assert asked == [(4, {"keep": False, "at_boot": True})]
    assert json.loads(capsys.readouterr().out)["stage"] == stage


@pytest.mark.parametrize(("argv", "expected"), [
    ([], (None, False, False)),
    (["--generation", "7", "--keep"], (7, True, False)),
    (["--json", "--generation=12"], (12, False, True)),
])
def test_the_boot_restores_arguments(argv: list[str], expected: tuple[object, ...]) -> None:
    from seamless import entry

    assert entry.boot_arguments(argv) == expected


@pytest.mark.parametrize("argv", [["--generation"], ["--generation", "x"], ["--images", "/x"]])
def test_the_boot_restore_refuses_what_it_does_not_take(argv: list[str]) -> None:
    from seamless import entry

    with pytest.raises(SeamlessError) as e:
        entry.boot_arguments(argv)
    assert e.value.status == ExitCode.USAGE


def test_the_manifest_is_the_truth_a_tree_it_lists_and_no_other(
    env: BootEnv, reports: tuple[Path, Path]
) -> None:
    """A tree the manifest lists whose directory is gone is a failure, not silently
    dropped; a tree directory it does not list is neither restored nor trusted."""
    import shutil

    shutil.rmtree(env.gen.final / "202")
    stranger = env.gen.final / "303"
    stranger.mkdir()
    (stranger / TREE_INFO).write_text(json.dumps(tree(303, 0, "evil.service", "/bin/evil")))
    criu = FakeRestorer()

    report = env.restore(criu)

    assert criu.calls == ["101"]
    assert report["ok"] is False
    trees = trees_by_root(report)
    assert sorted(trees) == [101, 202]
    assert trees[202]["error"] == "its images are not in the generation"
    assert trees[101]["restored"]
    assert f"303/{TREE_INFO}" in report["corrupt"]  # there, and not in the manifest
    assert "202/core-202.img" in report["corrupt"]  # listed, and not there
    assert "wiped" not in report


@pytest.mark.parametrize("path", ["../../etc/shadow", "/etc/shadow", "101/../../x", "101//x"])
def test_a_manifest_naming_a_file_outside_its_generation_is_refused(
    env: BootEnv, reports: tuple[Path, Path], path: str
) -> None:
    manifest = env.gen.manifest()
    manifest.files.append(FileEntry(path, 1, b"x"))
    (env.gen.final / MANIFEST).write_bytes(manifest.to_bytes())
    criu = FakeRestorer()

    with pytest.raises(SeamlessError, match="lists a file outside it") as e:
        env.restore(criu)

    assert e.value.status == ExitCode.CHECK_FAILED
    assert criu.calls == [] and env.gen.sealed
    assert "cannot be trusted" in json.loads(reports[0].read_text())["error"]


def test_an_unknown_checksum_algorithm_is_a_refusal_not_a_traceback(env: BootEnv) -> None:
    manifest = env.gen.manifest()
    manifest.digest_algorithm = "sha3000/64MiB"
    (env.gen.final / MANIFEST).write_bytes(manifest.to_bytes())
    with pytest.raises(SeamlessError, match="'sha3000/64MiB', an algorithm this seamless"):
        env.gen.verify()
    manifest.trees.append(TreeRecord(root=101))
    manifest.digest_algorithm = "md5"
    (env.gen.final / MANIFEST).write_bytes(manifest.to_bytes())
    with pytest.raises(SeamlessError, match="not distinct PIDs"):
        env.gen.verify()


def test_a_generation_kept_after_a_failed_restore_expires_overwritten(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept a day for a retry, then overwritten by `seamless store expire`; a generation
    restored with --keep, or one never restored, has no end."""
    kept_by_hand = seal_generation(env.store.generations_dir / "gen-2",
                                   [tree(303, 0, None, "/bin/old")], number=2)
    pages = env.gen.final / "101" / "pages-1.img"
    other = env.gen.final.parent / "pages-link"
    os.link(pages, other)  # another name for the inode: sees what the expiry wrote
    report = env.restore(FakeRestorer(fail={"101"}))
    until = report["kept_until"]
    assert until == pytest.approx(report["times"]["finished"] + 24 * 3600)
    assert env.store.kept_until(3) == until and env.store.kept_until(2) is None
    status = env.store.status()
    assert [g.get("kept_until") for g in status["generations"]] == [None, until]

    assert env.store.expire(now=until - 1) == [] and env.gen.sealed
    assert env.store.expire(now=until + 1) == [3]
    assert not env.gen.final.exists() and kept_by_hand.sealed
    assert other.read_bytes() == bytes(len(other.read_bytes()))  # zeros
    stored = json.loads(env.store.report_path(3).read_text())
    assert stored["expired"] == until + 1 and stored["wiped"] is True
    assert env.store.expire(now=until + 2) == []


def test_an_explicit_keep_or_a_full_restore_sets_no_expiry(env: BootEnv) -> None:
    assert "kept_until" not in env.restore(FakeRestorer(fail={"101"}), keep=True)
    assert "kept_until" not in env.restore(FakeRestorer())  # wiped


@pytest.fixture
def booted_with(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The command line of this (new) boot, boot-of-B: set its arguments in the list."""
    args = ["root=/dev/vda1", "seamless.restore=3"]
    monkeypatch.setattr(boot, "read_cmdline", lambda: " ".join(args))
    monkeypatch.setattr(handoff, "boot_id", lambda path=None: "boot-of-B")
    return args


def test_a_boot_restores_only_with_its_upgrade_s_token_and_only_once(
    env: BootEnv, reports: tuple[Path, Path], booted_with: list[str]
) -> None:
    upgrade_record(env, times={"entering": 6.0})
    booted_with.append(f"seamless.token={TOKEN}")
    criu = FakeRestorer()

    report = boot.boot_restore(3, criu=criu, root=env.root, keep=True, at_boot=True)

    assert report.ok and sorted(criu.calls) == ["101", "202"]
    record = handoff.read(env.store.root)
    assert record is not None and record.used_by_boot == "boot-of-B"
    # the same kernel entered again (systemctl kexec), its command line unchanged
    with pytest.raises(SeamlessError, match="restored already, by boot boot-of-B"):
        boot.boot_restore(3, criu=criu, root=env.root, at_boot=True)
    assert sorted(criu.calls) == ["101", "202"] and env.gen.sealed


@pytest.mark.parametrize("case, why", [
    ("no token", "not started by seamless upgrade"),
    ("another token", "not generation 3's"),
    ("no record", "its upgrade did not reach the kexec"),
    ("another generation's record", "its upgrade did not reach the kexec"),
    ("another boot's generation", "come from different boots"),
])
def test_a_boot_the_upgrade_did_not_start_restores_nothing(
    env: BootEnv, reports: tuple[Path, Path], booted_with: list[str], case: str, why: str
) -> None:
    """A kernel loaded by a coordinator that was killed, seamless.restore= left on a boot
    loader's line, a generation older than the record: refused before anything is
    touched, the generation kept (for a day) for a retry by hand."""
    record = upgrade_record(env)
    booted_with.append(f"seamless.token={TOKEN}")
    if case == "no token":
        booted_with.pop()
    elif case == "another token":
        booted_with[-1] = "seamless.token=" + "f" * 32
    elif case == "no record":
        handoff.remove(env.store.root)
    elif case == "another generation's record":
        record.generation = 2
        handoff.write(env.store.root, record)
    else:
        record.source_boot_id = "boot-before-A"
        handoff.write(env.store.root, record)
    criu = FakeRestorer()

    with pytest.raises(SeamlessError, match=why) as e:
        boot.boot_restore(3, criu=criu, root=env.root, at_boot=True)

    assert "seamless restore --generation 3" in (e.value.hint or "")
    assert criu.calls == [] and env.modules_loaded == 0 and env.gen.sealed
    written = json.loads(reports[0].read_text())
    assert why in written["error"] and written["kept_until"] > time.time()
    assert handoff.read(env.store.root) in (None, record)  # not marked used


def test_a_restore_by_hand_needs_no_token(env: BootEnv, booted_with: list[str]) -> None:
    report = env.restore(FakeRestorer())
    assert report["ok"]


def test_an_upgrade_that_never_came_back_is_told_and_expires(
    env: BootEnv, reports: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path
) -> None:
    """B panicked (panic=10) and the firmware booted the default entry, without the
    token: nothing was restored, status says so, and the generation expires a day after
    the upgrade entered B."""
    from seamless.restore import cli as restore_cli

    record = upgrade_record(env, times={"entering": 1000.0}, source_release="6.12.90",
                            target_release="6.12.118", result={"generation": 3, "bytes": 1})
    monkeypatch.setattr(boot, "DEFERRED", tmp_path / "no-deferred")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(handoff, "boot_id", lambda path=None: record.source_boot_id)
    assert boot.unrestored_upgrade() is None  # still the boot that wrote it (in A)
    monkeypatch.setattr(handoff, "boot_id", lambda path=None: "boot-after-reset")
    lost = boot.unrestored_upgrade()
    assert lost is not None and lost["generation"] == 3 and lost["to"] == "6.12.118"
    assert lost["kept_until"] == 1000.0 + 24 * 3600 == env.store.kept_until(3)
    monkeypatch.setattr(restore_cli, "unrestored_upgrade", boot.unrestored_upgrade)

    text = CliRunner().invoke(cli, ["status"])
    assert text.exit_code == ExitCode.CHECK_FAILED, text.output
    assert "upgrade to 6.12.118 NEVER CAME BACK" in text.stdout
    assert "generation 3 is not replayed and is kept until" in text.stdout
    out = json.loads(CliRunner().invoke(cli, ["status", "--json"]).stdout)
    assert out["unrestored_upgrade"]["generation"] == 3
    assert out["unrestored_upgrade"]["upgrade"] == {"generation": 3, "bytes": 1}
    assert env.store.expire(now=1000.0 + 24 * 3600 + 1) == [3] and not env.gen.final.exists()

    record.used_by_boot = "boot-of-B"  # restored after all: nothing to tell
    handoff.write(env.store.root, record)
    assert boot.unrestored_upgrade() is None


def test_services_stopped_before_the_kexec_start_again_in_the_new_boot(
    env: BootEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before init: wanted by multi-user.target for this boot (enabled or not); when
    systemd runs: started at once."""
    unit_dir = env.root / "usr/lib/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "postgresql@.service").write_text("[Service]\n")
    (unit_dir / "memcached.service").write_text("[Service]\n")
    upgrade_record(env, stopped_units=["memcached.service", "gone.service"])
    monkeypatch.setattr(boot, "systemd_runs", lambda: False)

    report = env.restore(FakeRestorer())

    assert report["started_again"] == ["memcached.service"]  # gone.service has no file
    link = env.root / "run/systemd/system/multi-user.target.wants/memcached.service"
    assert os.readlink(link) == "/usr/lib/systemd/system/memcached.service"
    systemctl: list[list[str]] = []
    monkeypatch.setattr(boot, "run", lambda argv, **kwargs: systemctl.append(list(argv)))
    monkeypatch.setattr(boot, "systemd_runs", lambda: True)
    assert boot.start_left_out(["memcached.service"], env.root) == ["memcached.service"]
    assert systemctl == [["systemctl", "start", "--no-block", "--", "memcached.service"]]


def test_node_exporter_gets_the_last_upgrade_as_metrics(
    env: BootEnv, reports: tuple[Path, Path], metrics_in_tmp: Path
) -> None:
    metrics_in_tmp.mkdir()
    upgrade_record(env, times={"frozen": 1.0, "entering": 2.0})
    env.restore(FakeRestorer(fail={"101"}))
    text = (metrics_in_tmp / "seamless.prom").read_text()
    assert "seamless_last_upgrade_success 0\n" in text
    assert 'seamless_last_upgrade_trees{result="restored"} 1\n' in text
    assert 'seamless_last_upgrade_trees{result="failed"} 1\n' in text
    assert f'seamless_last_upgrade_info{{from="{SOURCE}",to="{os.uname().release}",' \
           'generation="3"} 1\n' in text
    assert "# TYPE seamless_last_upgrade_blackout_seconds gauge" in text
    assert "seamless_store_free_bytes " in text
    assert oct((metrics_in_tmp / "seamless.prom").stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in metrics_in_tmp.iterdir()] == ["seamless.prom"]


def test_leased_addresses_put_back_are_kept_as_networkd_starts(
    env: BootEnv, reports: tuple[Path, Path], booted_with: list[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A boot whose restore put a leased address back tells networkd, for this boot, to
    keep the dynamic addresses it finds (it would remove them until its DHCP client has
    the lease again); a .network file whose KeepConfiguration= someone set is left as
    it is, and a restore that put no address back writes nothing."""
    from seamless.restore import restorer

    network = env.root / "usr/lib/systemd/network"
    network.mkdir(parents=True)
    (network / "10-dhcp.network").write_text("[Match]\nName=en*\n[Network]\nDHCP=yes\n")
    own = env.root / "etc/systemd/network/20-static.network.d"
    own.mkdir(parents=True)
    (own.parent / "20-static.network").write_text("[Network]\nAddress=192.0.2.1/24\n")
    (own / "keep.conf").write_text("[Network]\nKeepConfiguration=static\n")
    upgrade_record(env)
    booted_with.append(f"seamless.token={TOKEN}")
    added: list[str] = []
    monkeypatch.setattr(restorer, "bring_up_addresses", lambda addresses: added)
    keep = env.root / "run/systemd/network/10-dhcp.network.d" / restorer.NETWORKD_KEEP

    report = boot.boot_restore(3, criu=FakeRestorer(), root=env.root, keep=True, at_boot=True)
    assert report.ok and report.networkd_keeps is None and not keep.exists()

    added.append("10.0.2.15/24 on eth0")
    upgrade_record(env)  # the generation was kept (keep=True): its upgrade once more
    report = boot.boot_restore(3, criu=FakeRestorer(), root=env.root, keep=True, at_boot=True)
    assert report.networkd_keeps == [str(keep)]
    assert "KeepConfiguration=dhcp" in keep.read_text().splitlines()
    assert not (env.root / "run/systemd/network/20-static.network.d").exists()
