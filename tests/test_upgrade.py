"""``seamless upgrade`` on the host, every collaborator faked.

Nothing here freezes a process, loads a kernel or reboots: the loader, the
checkpoint, CRIU's check, the region and the process table are fakes, and an
autouse fixture makes any subprocess, ``seamless.run.run`` or libc call fail the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import seamless.run
from seamless import syscalls, upgrade
from seamless.cli import cli
from seamless.collect.inhibitors import Inhibitor
from seamless.errors import ExitCode, SeamlessError
from seamless.kexec import cmdline
from seamless.kexec import initrd as initrd_module
from seamless.memstore import handoff
from seamless.memstore.generation import Generation
from seamless.memstore.handoff import RECORD as UPGRADE_RECORD
from seamless.memstore.handoff import TREE_INFO
from seamless.memstore.records import Manifest, TreeRecord
from seamless.memstore.region import Region
from seamless.memstore.store import GENERATIONS, Store
from tests.test_kexec import RELEASE, make_bzimage

#: The preflight's CRIU check itself (the fixtures replace it in every other test).
REAL_CRIU_CHECK = upgrade._criu_check

real_lazy_pages_check = upgrade._lazy_pages_check  # the fixture below forbids it
REAL_WAY_BACK = upgrade.way_back
MEMMAP = "memmap=256M!1G"
RUNNING = f"BOOT_IMAGE=/boot/vmlinuz-old root=UUID=1234-abcd ro quiet {MEMMAP} console=ttyS0"


class ForbiddenLibc:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a test reached the real libc.{name}")


def forbidden(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"a test reached a real command or system call: {args!r}")


@pytest.fixture(autouse=True)
def no_real_effects(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any command, CRIU, kexec or syscall left unpatched fails the test instead of running;
    the umask the command sets is put back."""
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
    for name in ("loader", "take_checkpoint", "_criu_check", "_lazy_pages_check",
                 "load_criu_modules",
                 "find_region", "open_store", "read_table", "make_plan", "check_policy",
                 "prepare_initrd", "way_back", "after_init_reasons"):
        monkeypatch.setattr(upgrade, name, forbidden)
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


@dataclass
class FakeLoader:
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    enter_error: BaseException | None = None

    def load(self, kernel: Path, initrd: Path | None, new_cmdline: str) -> None:
        self.calls.append(("load", kernel, initrd, new_cmdline))

    def unload(self) -> None:
        self.calls.append(("unload",))

    def enter(self) -> None:
        self.calls.append(("enter",))
        if self.enter_error is not None:
            raise self.enter_error

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@dataclass
class FakeHeld:
    calls: list[str] = field(default_factory=list)
    loose: list[int] = field(default_factory=list)

    def let_go(self) -> list[int]:
        return self.loose

    def release(self) -> None:
        self.calls.append("release")

    def abort(self) -> None:
        self.calls.append("abort")


@dataclass
class FakeTree:
    root: int
    pids: list[int]


@dataclass
class FakePlan:
    trees: list[FakeTree]
    ok: bool = True
    needed: int = 64 << 20


@dataclass
class World:
    tmp: Path
    image: Path
    initrd: Path
    store: Store
    region: Region | None
    plan: FakePlan
    loader: FakeLoader = field(default_factory=FakeLoader)
    held: FakeHeld = field(default_factory=FakeHeld)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_error: BaseException | None = None
    criu_checked: int = 0
    criu_target: str = ""
    gen: Generation | None = None
    #: What says "not now" (a package manager at work, a logind inhibitor).
    busy: list[Inhibitor] = field(default_factory=list)
    #: The services the plan leaves out, and the systemctl commands run for them.
    left_out: list[str] = field(default_factory=list)
    #: What the plan's trees show that keeps them from a restore before init.
    after_init: list[str] = field(default_factory=list)
    systemctl: list[list[str]] = field(default_factory=list)
    #: The running command lines the way back was asked for.
    way_backs: list[list[str]] = field(default_factory=list)

    def take_checkpoint(self, trees: Sequence[FakeTree], images: Generation, number: int, *,
                        leave_running: bool, target_release: str | None = None,
                        times: dict[str, float] | None = None,
                        pre_dump: bool | None = None) -> tuple[FakeHeld, Manifest]:
        """Writes and seals a real generation, as the real one does after dumping."""
        self.checkpoints.append({"trees": list(trees), "number": number,
                                 "leave_running": leave_running, "pre_dump": pre_dump,
                                 "target_release": target_release})
        if self.checkpoint_error is not None:
            raise self.checkpoint_error
        assert times is not None
        self.gen = images
        partial = images.create()
        for t in trees:
            d = partial / str(t.root)
            d.mkdir()
            (d / TREE_INFO).write_text(json.dumps({"order": 0, "root": t.root, "pids": t.pids,
                                                   "unit": None, "command": "app",
                                                   "external": []}))
            (d / "pages-1.img").write_bytes(b"\x01" * 4096)
        times.update(frozen=1.0, dumped=2.0)
        manifest = images.seal(Manifest(
            generation=number, source_release="old", target_release=target_release,
            source_boot_id="boot-of-A",
            trees=[TreeRecord(root=t.root, command="app", pids=t.pids) for t in trees]))
        times["sealed"] = 3.0
        return self.held, manifest


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> World:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    image = make_bzimage(tmp_path / f"vmlinuz-{RELEASE}")
    rd = tmp_path / f"initrd.img-{RELEASE}"
    rd.write_bytes(b"cpio")
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(RUNNING + "\n")
    monkeypatch.setattr(cmdline, "PROC_CMDLINE", proc_cmdline)
    store = Store(tmp_path / "store")
    (store.root / GENERATIONS).mkdir(parents=True)
    region = Region(start=1 << 30, size=256 << 20, memmap=MEMMAP, reserved_now=True,
                    device=Path("/dev/pmem0"))
    plan = FakePlan([FakeTree(101, [101, 102]), FakeTree(300, [300, 7000, 350])])
    w = World(tmp_path, image, rd, store, region, plan)

    def criu_check(target: str) -> None:
        w.criu_target = target
        w.criu_checked += 1

    def open_store(r: Region) -> Store:
        assert r is w.region
        return store

    def make_plan(table: list[object], selection: object, space: Any) -> FakePlan:
        assert space.device == str(store.root) and space.free > 0
        return w.plan

    monkeypatch.setattr(upgrade, "loader", w.loader)
    monkeypatch.setattr(upgrade, "take_checkpoint", w.take_checkpoint)
    monkeypatch.setattr(upgrade, "_criu_check", criu_check)
    monkeypatch.setattr(upgrade, "load_criu_modules", lambda: None)
    monkeypatch.setattr(upgrade, "find_region", lambda: w.region)
    monkeypatch.setattr(upgrade, "open_store", open_store)
    monkeypatch.setattr(upgrade, "read_table", lambda: [])
    monkeypatch.setattr(upgrade, "make_plan", make_plan)
    monkeypatch.setattr(upgrade, "render", lambda plan: "PLAN: tree 101 blocks the upgrade")
    monkeypatch.setattr(upgrade, "check_policy", lambda: None)
    monkeypatch.setattr(upgrade, "inhibitors", lambda: w.busy)
    monkeypatch.setattr(upgrade, "left_out_services", lambda plan, table: w.left_out)
    monkeypatch.setattr(upgrade, "after_init_reasons", lambda trees: w.after_init)

    def systemctl(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        assert argv[0] == "systemctl"
        w.systemctl.append(argv)
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    monkeypatch.setattr(upgrade, "run", systemctl)
    monkeypatch.setattr(upgrade, "prepare_initrd",
                        lambda image, given, rebuild, dry_run: (rd, False))
    def way_back(args: list[str]) -> handoff.WayBack:
        w.way_backs.append(args)
        return handoff.WayBack("6.1.0-old", "/boot/vmlinuz-6.1.0-old",
                               "/boot/initrd.img-6.1.0-old", " ".join(args))

    monkeypatch.setattr(upgrade, "way_back", way_back)
    return w


def invoke(w: World, *args: str | Path) -> Result:
    """The command as `seamless` runs it: its errors are raised, not turned into exit 1."""
    return CliRunner().invoke(
        cli, ["upgrade", "--config", str(w.tmp / "no-config.toml"), *map(str, args)],
        standalone_mode=False)


def exit_status(result: Result) -> int:
    """The exit code seamless.cli.main would give (SeamlessError.status, not click's 1)."""
    if result.exception is None:
        return result.exit_code
    if isinstance(result.exception, SeamlessError):
        return int(result.exception.status)
    raise result.exception


def message(result: Result) -> str:
    assert isinstance(result.exception, SeamlessError)
    return result.exception.format_message()


def test_a_bad_kernel_path_touches_nothing(world: World) -> None:
    result = invoke(world, "--kernel", world.tmp / "vmlinuz-missing", "--yes")
    assert exit_status(result) == ExitCode.UNCHANGED
    assert "does not exist" in message(result)
    assert world.loader.calls == [] and world.checkpoints == [] and world.held.calls == []


def test_not_a_kernel_touches_nothing(world: World) -> None:
    world.image.write_bytes(b"\x7fELF" + bytes(4096))
    result = invoke(world, "--kernel", world.image, "--yes")
    assert exit_status(result) == ExitCode.UNCHANGED and "not a bzImage" in message(result)
    assert world.loader.calls == [] and world.checkpoints == []


def test_no_region_loads_nothing(world: World) -> None:
    world.region = None
    result = invoke(world, "--kernel", world.image, "--yes")
    assert exit_status(result) == ExitCode.UNCHANGED
    assert "no preserved region" in message(result)
    assert world.loader.calls == [] and world.checkpoints == [] and world.criu_checked == 0


def test_trees_that_wait_for_the_real_root_are_named_on_the_command_line(
        world: World) -> None:
    """A plan's tree that cannot be restored before init (a sandboxed service) puts
    seamless.after_init on the new command line: the initramfs then starts no restorer
    only to find that out, and the record keeps why for the report."""
    assert "seamless.after_init" not in invoke_args(world)
    world.after_init = ["redis-server.service: a mount namespace of its own"]
    assert "seamless.after_init" in invoke_args(world)
    record = json.loads((world.store.root / UPGRADE_RECORD).read_text())
    assert record["after_init"] == world.after_init


def invoke_args(world: World) -> list[str]:
    world.loader.calls.clear()
    result = invoke(world, "--kernel", world.image, "--yes")
    assert exit_status(result) == 0, result.output
    return list(world.loader.calls[0][3].split())


def test_a_region_not_reserved_now_loads_nothing(world: World) -> None:
    world.region = Region(start=1 << 30, size=256 << 20, memmap=MEMMAP, reserved_now=False)
    result = invoke(world, "--kernel", world.image, "--yes")
    assert exit_status(result) == ExitCode.UNCHANGED
    assert "does not reserve" in message(result)
    assert world.loader.calls == [] and world.checkpoints == []


def test_a_plan_that_fails_freezes_and_loads_nothing(world: World) -> None:
    world.plan.ok = False
    result = invoke(world, "--kernel", world.image, "--yes")
    assert exit_status(result) == ExitCode.UNCHANGED
    assert "nothing was frozen" in message(result)
    assert "PLAN: tree 101 blocks the upgrade" in result.stderr
    assert world.loader.calls == [] and world.checkpoints == [] and world.held.calls == []
    assert list(world.store.generations_dir.iterdir()) == []


def test_the_new_command_line_keeps_the_region_and_the_pids(world: World) -> None:
    result = invoke(world, "--kernel", world.image, "--append", "debug", "--yes", "--json")

    assert exit_status(result) == 0, result.output
    load = world.loader.calls[0]
    assert load[:3] == ("load", world.image, world.initrd)
    args = load[3].split()
    assert MEMMAP in args
    assert "seamless.restore=1" in args  # the store's first generation
    assert f"seamless.last_pid={7000 + cmdline.PID_MARGIN}" in args  # the highest PID + margin
    assert cmdline.PID_MARGIN == 4096
    assert not any(a.startswith(("BOOT_IMAGE=", "initrd=")) for a in args)
    assert args[-2] == "seamless.last_pid=11096" and "debug" in args
    token = args[-1].removeprefix("seamless.token=")  # one-time, unguessable
    assert args[-1].startswith("seamless.token=") and len(token) == 32
    assert world.criu_checked == 1 and world.criu_target == RELEASE  # CRIU can go there
    assert world.checkpoints[0]["leave_running"] is False
    assert world.checkpoints[0]["target_release"] == RELEASE
    assert world.loader.names() == ["load", "enter"]  # the fake enter returns; the real not
    assert world.held.calls == []
    record = json.loads((world.store.root / UPGRADE_RECORD).read_text())
    assert record["generation"] == 1 and record["target_release"] == RELEASE
    assert record["token_sha256"] == handoff.digest(token) and token not in json.dumps(record)
    assert world.gen is not None
    assert record["source_boot_id"] == world.gen.manifest().source_boot_id
    assert record["source_boot_id"] and record["used_by_boot"] is None
    assert record["times"]["frozen"] == 1.0 and "entering" in record["times"]
    assert (world.store.root / UPGRADE_RECORD).stat().st_mode & 0o777 == 0o600
    # printed before the kexec (the real enter never returns), and kept for the new boot
    out = json.loads(result.stdout)
    # the token is proof of this kexec: never printed or kept, only its digest
    assert out["cmdline"] == load[3].replace(token, "(one-time token)")
    assert out["generation"] == 1 and out["dry_run"] is False
    assert out["state"] == "entering" and out["times"]["entering"] == record["times"]["entering"]
    assert [t["root"] for t in out["trees"]] == [101, 300]
    assert record["result"] == out


def test_lazy_pages_are_asked_of_the_restorer_through_the_record(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[bool] = []
    monkeypatch.setattr(upgrade, "_lazy_pages_check", lambda: checked.append(True))
    result = invoke(world, "--kernel", world.image, "--yes", "--lazy-pages")
    assert exit_status(result) == 0, result.output
    assert checked == [True]
    record = json.loads((world.store.root / UPGRADE_RECORD).read_text())
    assert record["lazy_pages"] is True
    # CRIU restores a pre-dump's pages eagerly: no pre-dump unless asked for
    assert world.checkpoints[0]["pre_dump"] is False
    invoke(world, "--kernel", world.image, "--yes", "--lazy-pages", "--pre-dump")
    assert world.checkpoints[1]["pre_dump"] is True


def test_lazy_pages_without_userfaultfd_freeze_and_load_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoLazyCriu:
        def features(self, *names: str) -> dict[str, bool]:
            return dict.fromkeys(names, False)

    monkeypatch.setattr(upgrade, "_lazy_pages_check", real_lazy_pages_check)
    monkeypatch.setattr(upgrade, "Criu", NoLazyCriu)
    result = invoke(world, "--kernel", world.image, "--yes", "--lazy-pages")
    assert exit_status(result) == ExitCode.UNCHANGED
    assert "cannot restore lazily" in message(result)
    assert "without --lazy-pages" in (result.exception.hint or "")  # type: ignore[union-attr]
    assert world.loader.calls == [] and world.checkpoints == []


def test_a_failed_checkpoint_unloads_the_kernel(world: World) -> None:
    world.checkpoint_error = SeamlessError("criu dump failed: tree 101")
    result = invoke(world, "--kernel", world.image, "--yes")
    assert exit_status(result) == ExitCode.UNCHANGED
    assert "criu dump failed" in message(result)
    assert world.loader.names() == ["load", "unload"]
    assert len(world.checkpoints) == 1 and world.held.calls == []


def test_an_interrupted_checkpoint_unloads_the_kernel(world: World) -> None:
    world.checkpoint_error = KeyboardInterrupt()
    result = invoke(world, "--kernel", world.image, "--yes")
    assert isinstance(result.exception, click.exceptions.Abort)  # main() says "Interrupted"
    assert world.loader.names() == ["load", "unload"]


def test_dry_run_thaws_unloads_and_wipes(world: World) -> None:
    result = invoke(world, "--kernel", world.image, "--dry-run", "--json")

    assert exit_status(result) == 0, result.output
    assert world.checkpoints[0]["leave_running"] is True
    assert world.held.calls == ["release"]
    assert world.loader.names() == ["load", "unload"]  # never entered
    assert world.gen is not None and not world.gen.final.exists()  # wiped
    assert not world.gen.partial.exists()
    assert list(world.store.generations_dir.iterdir()) == []
    assert not (world.store.root / UPGRADE_RECORD).exists()
    out = json.loads(result.stdout)
    assert out["dry_run"] is True and out["verified"] is True
    assert [t["root"] for t in out["trees"]] == [101, 300]


def test_dry_run_reports_a_generation_that_does_not_verify(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Generation, "verify", lambda self: ["101/pages-1.img"])
    result = invoke(world, "--kernel", world.image, "--dry-run")
    assert exit_status(result) == ExitCode.UNCHANGED
    assert "did not verify: 101/pages-1.img" in message(result)
    assert world.held.calls == ["release"] and world.loader.names() == ["load", "unload"]
    assert world.gen is not None and not world.gen.final.exists()


def test_a_failed_kexec_thaws_the_trees_and_exits_3(world: World) -> None:
    world.loader.enter_error = SeamlessError("reboot(LINUX_REBOOT_CMD_KEXEC) failed: EINVAL")
    result = invoke(world, "--kernel", world.image, "--yes")

    assert exit_status(result) == ExitCode.CHANGED
    text = message(result)
    assert f"entering {RELEASE} failed" in text and "EINVAL" in text
    assert "thawed and run on" in text
    assert world.held.calls == ["abort"]  # thawed, never released into the old kernel's exit
    assert world.loader.names() == ["load", "enter", "unload"]
    assert result.stdout == ""


def test_a_tree_its_criu_let_go_of_stops_the_upgrade_before_the_kexec(world: World) -> None:
    # its CRIU was killed while it held the tree: the tree ran on after its dump
    world.held.loose = [202]
    result = invoke(world, "--kernel", world.image, "--yes")

    assert exit_status(result) == ExitCode.UNCHANGED
    assert "CRIU let go of tree 202 before the kexec" in message(result)
    assert world.held.calls == ["abort"]
    assert world.loader.names() == ["load", "unload"]  # never entered
    assert world.gen is not None and not world.gen.final.exists()
    assert not (world.store.root / UPGRADE_RECORD).exists()


def test_declining_unloads_and_freezes_nothing(world: World) -> None:
    result = CliRunner().invoke(
        cli, ["upgrade", "--config", str(world.tmp / "none.toml"), "--kernel",
              str(world.image)], input="n\n", standalone_mode=False)
    assert exit_status(result) == ExitCode.UNCHANGED
    assert world.loader.names() == ["load", "unload"] and world.checkpoints == []


def test_needs_root(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = invoke(world, "--kernel", world.image, "--yes")
    assert exit_status(result) == ExitCode.UNCHANGED and "needs root" in message(result)
    assert world.loader.calls == [] and world.checkpoints == []


def test_the_preflight_refuses_a_target_kernel_the_criu_cannot_restore_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from seamless.criu import Version

    class OldCriu:
        def check(self, work: Path) -> None:
            pass

        def version(self) -> Version:
            return Version(3, 17, 1)

    monkeypatch.setattr(upgrade, "Criu", OldCriu)
    REAL_CRIU_CHECK("6.12.118+deb13-cloud-amd64")
    with pytest.raises(SeamlessError, match="CRIU 3.17.1 cannot restore on Linux 7.3.4"):
        REAL_CRIU_CHECK("7.3.4+deb13-cloud-amd64")


def test_a_package_manager_at_work_or_a_shutdown_inhibitor_stops_the_upgrade(
        world: World) -> None:
    world.busy = [Inhibitor("apt-get install foo", "holds /var/lib/dpkg/lock-frontend: a "
                            "package manager is at work", 4321)]
    result = invoke(world, "--kernel", world.image, "--yes")
    assert result.exit_code == ExitCode.UNCHANGED, result.output
    error = result.exception
    assert isinstance(error, SeamlessError)
    assert "not now: apt-get install foo (PID 4321): holds /var/lib/dpkg" in error.message
    assert "--force" in (error.hint or "")
    assert world.loader.names() == [] and world.checkpoints == []
    result = invoke(world, "--kernel", world.image, "--yes", "--force")
    assert result.exit_code == 0, result.output
    assert world.loader.names() == ["load", "enter"]


def test_services_left_out_are_stopped_before_the_kexec_and_started_again_on_a_rollback(
        world: World) -> None:
    world.left_out = ["postgresql@17-main.service", "memcached.service"]
    result = invoke(world, "--kernel", world.image, "--yes")
    assert result.exit_code == 0, result.output
    assert world.systemctl == [["systemctl", "stop", "--", *world.left_out]]
    record = json.loads((world.store.root / UPGRADE_RECORD).read_text())
    assert record["stopped_units"] == world.left_out  # the new boot starts them again
    assert world.loader.names() == ["load", "enter"]

    world.systemctl.clear()
    world.loader.enter_error = SeamlessError("reboot(LINUX_REBOOT_CMD_KEXEC): refused")
    result = invoke(world, "--kernel", world.image, "--yes")
    assert isinstance(result.exception, SeamlessError), result.output
    assert result.exception.status == ExitCode.CHANGED
    assert world.systemctl == [["systemctl", "stop", "--", *world.left_out],
                               ["systemctl", "start", "--no-block", "--", *world.left_out]]

    world.systemctl.clear()
    invoke(world, "--kernel", world.image, "--dry-run")
    assert world.systemctl == []  # a dry run stops nothing


def test_the_record_carries_the_way_back_the_pids_and_the_required_commands(
    world: World,
) -> None:
    """B goes back to A with every tree when it cannot run them all: the record names A's
    kernel, initramfs and command line (without the restore's arguments), the PIDs to
    keep free, and the commands B must pass (the configuration's, then --require's)."""
    config = world.tmp / "seamless.toml"
    config.write_text('[upgrade]\nrequire = ["modprobe -n e1000"]\n')
    result = CliRunner().invoke(
        cli, ["upgrade", "--config", str(config), "--kernel", str(world.image), "--yes",
              "--require", "test -e /dev/sda", "--append", "debug"], standalone_mode=False)
    assert exit_status(result) == 0, result.output
    record = json.loads((world.store.root / UPGRADE_RECORD).read_text())
    assert record["requires"] == ["modprobe -n e1000", "test -e /dev/sda"]
    assert record["last_pid"] == 7000 + cmdline.PID_MARGIN
    back = record["way_back"]
    assert back["release"] == "6.1.0-old" and back["kernel"] == "/boot/vmlinuz-6.1.0-old"
    # A's own command line: not B's --append, no seamless.* of an earlier restore
    assert world.way_backs and "debug" not in world.way_backs[0]
    assert not any(a.startswith("seamless.") for a in world.way_backs[0])
    assert record["refused"] is None
    loaded = handoff.read(world.store.root)
    assert loaded is not None and loaded.way_back == handoff.WayBack(**back)


def test_no_way_back_records_none_and_excludes_require(world: World) -> None:
    result = invoke(world, "--kernel", world.image, "--yes", "--no-way-back")
    assert exit_status(result) == 0, result.output
    assert world.way_backs == []
    assert json.loads((world.store.root / UPGRADE_RECORD).read_text())["way_back"] is None
    result = invoke(world, "--kernel", world.image, "--yes", "--no-way-back",
                    "--require", "true")
    assert isinstance(result.exception, click.UsageError)
    assert "needs the way back" in str(result.exception)
    assert len(world.loader.calls) == 2  # the first upgrade's load and enter, nothing more


def test_a_bad_require_list_in_the_configuration_changes_nothing(world: World) -> None:
    config = world.tmp / "seamless.toml"
    config.write_text('[upgrade]\nrequire = "true"\n')
    result = CliRunner().invoke(
        cli, ["upgrade", "--config", str(config), "--kernel", str(world.image), "--yes"],
        standalone_mode=False)
    assert exit_status(result) == ExitCode.UNCHANGED
    assert "[upgrade] require must be a list" in message(result)
    assert world.loader.calls == [] and world.checkpoints == []


def test_a_way_back_without_the_restorer_is_refused_before_anything_is_frozen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    release = os.uname().release
    boot = tmp_path / "boot"
    boot.mkdir()
    with pytest.raises(SeamlessError, match="no way back: the running kernel's"):
        REAL_WAY_BACK(["ro"], boot)
    (boot / f"vmlinuz-{release}").write_bytes(b"kernel")
    (boot / f"initrd.img-{release}").write_bytes(b"no cpio")
    monkeypatch.setattr(initrd_module, "check_readable", lambda path, r: None)
    monkeypatch.setattr(initrd_module, "list_files", lambda path: ["usr/bin/true"])
    with pytest.raises(SeamlessError, match="lacks the boot-time restorer") as e:
        REAL_WAY_BACK(["ro"], boot)
    assert "--no-way-back" in (e.value.hint or "")
    monkeypatch.setattr(initrd_module, "has_restorer", lambda path, names: True)
    monkeypatch.setattr(initrd_module, "check_store_modules", lambda path, r, names: None)
    back = REAL_WAY_BACK(["ro", "memmap=1G!4G"], boot)
    assert back == handoff.WayBack(release, str(boot / f"vmlinuz-{release}"),
                                   str(boot / f"initrd.img-{release}"), "ro memmap=1G!4G")
