"""The test bed's host side: apt sources, guest specs, QEMU's command line, and the
agent protocol (the guest agent runs here over a socket pair, running harmless commands)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmtest import config, image, qemu
from vmtest.channel import Channel, GuestRebooted
from vmtest.errors import LostVMError, VMError
from vmtest.guest import agent


@pytest.fixture
def channel() -> Iterator[Channel]:
    ours, theirs = socket.socketpair()
    port = agent.Port(os.dup(theirs.fileno()))
    theirs.close()
    threading.Thread(target=agent.serve, args=(port,), daemon=True).start()
    ch = Channel(ours)
    yield ch
    ch.close()


def test_ping_reports_this_boot(channel: Channel) -> None:
    info = channel.ping()
    assert info is not None
    assert info.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert info.release == os.uname().release


def test_run_returns_output_and_exit_code(channel: Channel) -> None:
    result = channel.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")


def test_stdin_is_passed_through_exactly_many_times(channel: Channel) -> None:
    """Large and small inputs alternate: a descriptor closed twice would lose one."""
    for size in (1 << 20, 5, 100_000, 0, 7):
        data = os.urandom(size)
        result = channel.run(["cat"], input=data)
        assert result.returncode == 0
        assert result.stdout == data


def test_unknown_command_reports_an_error(channel: Channel) -> None:
    result = channel.run(["/nonexistent/command"])
    assert result.returncode == 127
    assert b"No such file" in result.stderr


def test_pty_gives_a_terminal(channel: Channel) -> None:
    proc = channel.start(["sh", "-c", "read x; echo got=$x; test -t 0 && echo tty"],
                         stdin=True, pty=True)
    proc.write(b"abc\n")
    result = proc.wait(timeout=10)
    assert b"got=abc" in result.stdout
    assert b"tty" in result.stdout.split(b"got=abc")[1]


def test_wait_ready_skips_the_old_boot(channel: Channel) -> None:
    info = channel.ping()
    assert info is not None
    with pytest.raises(TimeoutError):
        channel.wait_ready(1.5, not_boot=info.boot_id)


def test_a_command_is_lost_when_the_guest_enters_another_boot() -> None:
    """An agent of a new boot says hello while a command of the old one runs (a kexec,
    the way back): the command is reported lost at once, not waited for until its
    timeout; a command of the same boot is not."""
    ours, theirs = socket.socketpair()
    channel = Channel(ours)
    try:
        theirs.sendall(b'{"type": "pong", "boot_id": "one"}\n')
        first = channel.start(["sleep", "infinity"])
        theirs.sendall(b'{"type": "hello", "boot_id": "one"}\n')
        with pytest.raises(TimeoutError):
            first.wait(timeout=0.5)
        theirs.sendall(b'{"type": "hello", "boot_id": "three"}\n')
        with pytest.raises(GuestRebooted, match=r"lost: .* another boot \(three\)"):
            first.wait(timeout=5)
    finally:
        channel.close()
        theirs.close()


def test_host_apt_sources_moves_the_hosts_debian_mirrors_to_the_guests_release(
    tmp_path: Path,
) -> None:
    """The host runs Debian 12, the guest is 13 (and a kernel comes from 12): each Debian
    source of the host is taken once per release, its suites renamed; others are left."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb http://mirror.example/debian bookworm main contrib\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://other.example/x\nSuites: nodistro\nComponents: main\n"
    )
    (tmp_path / "sources.list.d" / "x.list.disabled").write_text(
        "deb http://disabled.example bookworm main\n"
    )
    text = image.host_apt_sources(tmp_path, ("trixie", "bookworm"))
    stanzas = text.strip().split("\n\n")
    assert stanzas[0] == ("Types: deb\nSuites: trixie\nURIs: http://mirror.example/debian\n"
                          "Components: main contrib")
    assert stanzas[1] == (
        "Types: deb\nSuites: trixie-security\nURIs: http://mirror.example/debian-security\n"
        "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg")
    assert [s.splitlines()[1] for s in stanzas[2:]] == [
        "Suites: bookworm", "Suites: bookworm-security"]
    assert "nodistro" not in text and "disabled" not in text


def test_host_apt_sources_default_to_the_chosen_release(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://m.example/debian trixie main\n")
    text = image.host_apt_sources(tmp_path)
    assert f"Suites: {config.DISTRIBUTION}\n" in text


def test_host_apt_sources_without_debian_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://x.example nodistro main\n")
    with pytest.raises(VMError, match="no Debian apt source"):
        image.host_apt_sources(tmp_path)


def test_kernels_are_named_once_and_differ() -> None:
    a, b = config.KERNELS["A"], config.KERNELS["B"]
    assert a.release != b.release
    assert a.package == f"linux-image-{a.release}"
    assert b.vmlinuz == f"/boot/vmlinuz-{b.release}"


def test_guest_command_line_reserves_the_region() -> None:
    spec = qemu.GuestSpec(image="/x", region="128M!1G")
    assert "memmap=128M!1G" in spec.cmdline().split()
    assert "panic=-1" in spec.cmdline().split()


@pytest.mark.parametrize(
    ("memory", "region"), [("1G", "256M!1G"), ("2G", "4G!1G")]
)
def test_region_outside_guest_ram_is_refused(memory: str, region: str) -> None:
    with pytest.raises(VMError, match="does not fit"):
        qemu.GuestSpec(image="/x", memory=memory, region=region).validate()


def test_qemu_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEAMLESS_VM_ACCEL", "tcg")
    qemu.kvm_works.cache_clear()
    img = image.Image(tmp_path)
    spec = qemu.GuestSpec(image=str(tmp_path), kernel="B", forwards={22: 2222})
    argv = qemu.qemu_argv(img, spec, tmp_path)
    assert "-no-reboot" in argv
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    assert argv[argv.index("-kernel") + 1] == str(img.vmlinuz(config.KERNELS["B"]))
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in argv[argv.index("-netdev") + 1]
    assert "restrict=on" in argv[argv.index("-netdev") + 1]
    assert f"name={config.AGENT_PORT}" in " ".join(argv)


def test_parse_size() -> None:
    assert qemu.parse_size("2G") == 2 << 30
    assert qemu.parse_size("512M") == 512 << 20
    with pytest.raises(VMError):
        qemu.parse_size("lots")


def test_lost_guest_raises_with_the_console_tail(tmp_path: Path) -> None:
    """When QEMU is gone, every call says so and carries the last console lines."""
    (tmp_path / "console.log").write_text("".join(f"line {i}\r\n" for i in range(80))
                                          + "Kernel panic - not syncing: test\r\n")
    proc = subprocess.Popen(["true"])
    proc.wait()
    guest = qemu.Guest(tmp_path, qemu.GuestSpec(image=str(tmp_path)), proc)
    with pytest.raises(LostVMError) as exc:
        guest.run("uname", "-r")
    assert exc.value.reason.startswith("the guest kernel panicked")
    lines = exc.value.console_tail.splitlines()
    assert len(lines) == 50
    assert lines[0] == "line 31" and lines[-1].startswith("Kernel panic")


def test_missing_kernel_package_names_the_alternatives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the archive dropped kernel A, the build stops naming it and what the archive has."""
    (tmp_path / "apt-get").write_text("#!/bin/sh\nexit 0\n")
    fake = tmp_path / "apt-cache"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *"show --no-all-versions {config.KERNELS["A"].package}") exit 100 ;;\n'
        '  *"show "*) echo "Package: x" ;;\n'
        "  *search*) printf '%s - k\\n' linux-image-6.1.0-60-cloud-amd64 "
        "linux-image-6.1.0-58-cloud-amd64 ;;\n"
        "esac\n"
    )
    for tool in ("apt-get", "apt-cache"):
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(VMError) as exc:
        image.check_kernels_available("Types: deb\n")
    text = str(exc.value)
    assert config.KERNELS["A"].package in text
    assert "linux-image-6.1.0-58-cloud-amd64, linux-image-6.1.0-60-cloud-amd64" in text


def test_release_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEAMLESS_VM_RELEASE", raising=False)
    assert config._release().version == config.DEFAULT_RELEASE == "13"
    monkeypatch.setenv("SEAMLESS_VM_RELEASE", "12")
    assert config._release().codename == "bookworm"
    monkeypatch.setenv("SEAMLESS_VM_RELEASE", "14")
    with pytest.raises(VMError, match="(?s)SEAMLESS_VM_RELEASE='14'.*one of 12, 13"):
        config._release()


def test_every_release_walks_an_upgrade_between_two_of_its_own_kernels() -> None:
    for release in config.RELEASES.values():
        a, b = release.kernels["A"], release.kernels["B"]
        assert a.release != b.release and not a.suite and not b.suite


def test_a_guest_dead_of_tcgs_code_patching_race_says_so(tmp_path: Path) -> None:
    """The int3 oops of QEMU TCG's cross-vCPU code patching is named (the VM tests run
    again once what dies of it), even when the oops is far above the console's tail; and
    a guest whose QEMU is still exiting after the panic is waited for."""
    (tmp_path / "console.log").write_text(
        "[   29.93] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\r\n"
        + "".join(f"[   29.94] trace {i}\r\n" for i in range(60))
        + "[   29.94] Kernel panic - not syncing: Fatal exception in interrupt\r\n")
    proc = subprocess.Popen(["sleep", "1"])
    guest = qemu.Guest(tmp_path, qemu.GuestSpec(image=str(tmp_path)), proc)
    with pytest.raises(LostVMError) as exc:
        guest.check_alive()
    assert exc.value.reason == f"the guest kernel panicked: {qemu.TCG_RACE_REASON}"
    assert proc.poll() == 0  # waited for QEMU to go


def test_the_benchmark_table_says_what_the_way_back_costs() -> None:
    from vmtest import bench

    def variant(seconds: float, restore: float) -> dict[str, object]:
        return {"blackout_seconds": seconds, "state_kept": True, "phases": {"restore": restore}}

    row = {"size_mib": 64, "seamless_upgrade_no_way_back": variant(20.0, 2.0),
           "seamless_upgrade_whole_dump": variant(21.0, 2.4),
           "systemctl_kexec": {"blackout_seconds": 60.0, "state_kept": False},
           "reboot": {"blackout_seconds": 80.0, "state_kept": False}}
    text = bench.table({"sizes": [bench.summary([row])], "copy_bandwidth_mib_s": 900.0})
    assert "64 MiB: all or nothing (the way back) adds +1.0 s to the blackout (+5%" in text
    assert "the one phase it changes: 2.4 s, 2.0 s without (+0.4 s, +2% of the blackout)" in text
    assert "no-back" in text and "whole dump, --no-way-back: phases" in text
    # the ratios are the default's (with its way back): 21 / 60
    assert "   0.35" in text.splitlines()[5]


def test_the_kvm_probe_s_answer_is_kept_for_the_host_s_boot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEAMLESS_VM_ACCEL", raising=False)
    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    probes: list[Path] = []

    def probe(kernel: Path) -> bool:
        probes.append(kernel)
        return False

    monkeypatch.setattr(qemu, "_probe_kvm", probe)
    for kernel in (Path("/a"), Path("/b")):
        qemu.kvm_works.cache_clear()
        assert qemu.kvm_works(kernel) is False
    assert probes == [Path("/a")]  # the second process-wide cache miss read the file
    kept = tmp_path / "kvm-probe.json"
    kept.write_text(kept.read_text().replace('"boot_id": "', '"boot_id": "another-boot-'))
    qemu.kvm_works.cache_clear()
    qemu.kvm_works(Path("/c"))
    assert probes == [Path("/a"), Path("/c")]
    qemu.kvm_works.cache_clear()


def test_the_kvm_probe_ends_at_qemu_s_internal_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU on a broken /dev/kvm prints the emulation failure and waits; the probe does
    not wait out its timeout."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'KVM internal error. Suberror: 1'\necho 'Code=05 83'\n"
                    "exec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(qemu, "KVM_PROBE_TIMEOUT", 20.0)
    start = time.monotonic()
    assert qemu._probe_kvm(Path("/vmlinuz")) is False
    assert time.monotonic() - start < 10
    fake.write_text("#!/bin/sh\necho 'Linux version 6.12'\nexec sleep 60\n")
    assert qemu._probe_kvm(Path("/vmlinuz")) is True


def test_a_booted_snapshot_is_one_per_kind_of_guest(tmp_path: Path) -> None:
    img = image.Image(tmp_path)
    spec = qemu.GuestSpec(image=str(tmp_path))
    here = qemu.snapshot_dir(img, spec)
    assert here.parent == tmp_path / "snapshots"
    assert qemu.snapshot_dir(img, qemu.GuestSpec(image=str(tmp_path), forwards={22: 2222})) == here
    others = [qemu.GuestSpec(image=str(tmp_path), memory="3G"),
              qemu.GuestSpec(image=str(tmp_path), region="512M!1G"),
              qemu.GuestSpec(image=str(tmp_path), kernel="B"),
              qemu.GuestSpec(image=str(tmp_path), append="quiet")]
    assert here not in {qemu.snapshot_dir(img, other) for other in others}
