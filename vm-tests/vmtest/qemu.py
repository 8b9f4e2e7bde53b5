"""Boot the guest under QEMU and keep hold of it.

One guest lives in a run directory: its disk overlay (the cached image stays
untouched), its serial console log, the agent's socket and a ``guest.json``
saying how it was started, so another process (``vm run`` after ``vm boot``)
can attach to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmtest import config
from vmtest.channel import Channel, GuestInfo, GuestRebooted
from vmtest.errors import LostVMError, VMError
from vmtest.image import Image, try_lock
from vmtest.log import log, record

#: What a guest kernel dies of, now and then, when QEMU's multi-threaded TCG runs one vCPU
#: on code another vCPU has just patched (a static key's jump, text_poke_bp): an int3 trap
#: at the patch site that the kernel no longer expects. Seen with Debian 13's 6.12 in
#: __schedule, during a restore and a checkpoint alike. The test bed's emulator, not the
#: product: a VM test that dies of it is run again, up to twice (pyproject.toml,
#: --only-rerun).
TCG_RACE = "Oops: int3:"
TCG_RACE_REASON = "an int3 trap at a code-patching site (QEMU TCG's cross-vCPU race)"
#: The guest's CPU under TCG. "max" offers AVX2 and SHA-NI, which TCG emulates slowly and
#: which OpenSSL, xxhash and glibc then pick: measured 2026-12-06 on this 2-core machine,
#: sha256 of 128 MiB took 8.4 s with "max" and 2.2 s with "qemu64", systemd's userspace
#: boot 26.5 s against 16.8 s. SEAMLESS_VM_CPU overrides it.
TCG_CPU = "qemu64"
#: TCG's threading: "single" runs the guest's vCPUs round robin in one host thread, so
#: no two vCPUs run at once and the cross-vCPU race above cannot happen; the tests run
#: two guests at a time on two cores anyway. SEAMLESS_VM_TCG_THREAD=multi: one host
#: thread per vCPU.
TCG_THREAD = os.environ.get("SEAMLESS_VM_TCG_THREAD", "single")
BOOT_TIMEOUT = 300.0  # TCG on 2 cores: a boot takes 20-60 s, leave room for a loaded CI machine
PR_SET_PDEATHSIG = 1
#: Until the boot's restore in seamless-restore.service (after switch-root, when the
#: initramfs left the trees to it) has ended. The agent answers before it does; and a
#: restore that refuses the trees takes the machine back to the old kernel (the way
#: back), which ends every command the new boot ran.
RESTORE_ENDED = """
grep -q seamless.restore /proc/cmdline || exit 0
for i in $(seq 1800); do
  s=$(systemctl show -P ActiveState seamless-restore.service)
  j=$(systemctl list-jobs --no-legend seamless-restore.service | grep -v '^No jobs' || true)
  [ "$s" != activating ] && [ -z "$j" ] && exit 0
  sleep 0.5
done
echo "seamless-restore.service still $s after 900 s" >&2; exit 1
"""
RESTORE_WAIT = 960.0


#: What QEMU prints when KVM cannot run the guest (a nested, paravirtual /dev/kvm): it
#: then pauses the guest and waits, instead of exiting.
KVM_BROKEN = (b"KVM internal error", b"emulation failure", b"Code=")
KVM_PROBE_TIMEOUT = 30.0


@functools.cache
def kvm_works(probe_kernel: Path | None = None) -> bool:
    """True only where KVM really runs a guest (not the nested paravirtual /dev/kvm here).

    The probe boots ``probe_kernel`` without a root under KVM: a working KVM gets
    as far as the kernel's banner in seconds; a broken one makes QEMU report an internal
    error (or abort). The probe ends at whichever comes first, and its answer is kept
    for the host's boot in the cache (every test process asked it again, 30 s each,
    when it waited for its timeout). SEAMLESS_VM_ACCEL=tcg|kvm overrides the probe.
    """
    forced = os.environ.get("SEAMLESS_VM_ACCEL")
    if forced in ("tcg", "kvm"):
        return forced == "kvm"
    if probe_kernel is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    kept = config.CACHE_DIR / "kvm-probe.json"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError, ValueError, KeyError):
        answer = json.loads(kept.read_text())
        if answer["boot_id"] == boot_id:
            return bool(answer["works"])
    works = _probe_kvm(probe_kernel)
    log.info("KVM %s; using %s", "works" if works else "does not run guests here",
             "KVM" if works else "TCG")
    with contextlib.suppress(OSError):
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_suffix(f".{os.getpid()}")
        tmp.write_text(json.dumps({"boot_id": boot_id, "works": works}))
        tmp.rename(kept)
    return works


def _probe_kvm(probe_kernel: Path) -> bool:
    try:
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
             "-no-reboot", "-display", "none", "-serial", "stdio", "-kernel", str(probe_kernel),
             "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    except OSError:
        return False
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + KVM_PROBE_TIMEOUT
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            if b"Linux version" in out:
                return True
            if any(mark in out for mark in KVM_BROKEN):
                return False
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            chunk = proc.stdout.read() if ready else None  # None: nothing to read yet
            if chunk == b"":  # QEMU exited
                return b"Linux version" in out
            out += chunk or b""
        return b"Linux version" in out
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise VMError(f"not a size: {text!r} (for example 2G, 512M)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


@dataclass
class GuestSpec:
    """How a guest was started (written to guest.json in its run directory)."""

    image: str
    kernel: str = "A"
    memory: str = config.DEFAULT_MEMORY
    region: str = config.DEFAULT_REGION
    smp: int = 2
    append: str = ""
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port on 127.0.0.1
    pid: int = 0

    @property
    def memmap(self) -> str:
        return f"memmap={self.region}"

    def cmdline(self) -> str:
        parts = [
            "root=/dev/vda", "rw", "console=ttyS0,115200", "panic=-1", "loglevel=4",
            "net.ifnames=0", self.memmap, self.append,
        ]
        return " ".join(p for p in parts if p)

    def validate(self) -> None:
        if self.kernel not in config.KERNELS:
            raise VMError(f"no kernel {self.kernel!r}: choose one of {', '.join(config.KERNELS)}")
        memory = parse_size(self.memory)
        size, _, offset = self.region.partition("!")
        if parse_size(offset) + parse_size(size) > min(memory, 3 << 30):
            raise VMError(
                f"memmap={self.region} does not fit in {self.memory} of guest RAM",
                hint="give the guest more memory (--memory) or a smaller region",
            )


class Guest:
    """A running QEMU guest and the channel to its agent."""

    def __init__(self, run_dir: Path, spec: GuestSpec, proc: subprocess.Popen[bytes] | None):
        self.run_dir = run_dir
        self.spec = spec
        self.proc = proc
        self._channel: Channel | None = None
        self.info: GuestInfo | None = None

    # -- files of the run directory
    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def socket(self) -> Path:
        return self.run_dir / "agent.sock"

    def console_tail(self, lines: int = 50) -> str:
        try:
            text = self.console_log.read_bytes().decode(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    # -- liveness
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.spec.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def check_alive(self) -> None:
        tail = self.console_tail()
        if self.running() and "Kernel panic - not syncing" in tail:
            # QEMU exits (-no-reboot) a moment after its guest panicked: wait for it
            deadline = time.monotonic() + 15
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.2)
            tail = self.console_tail()
        if not self.running():
            reason = "QEMU exited"
            if "Kernel panic" in tail:
                reason = "the guest kernel panicked"
                if TCG_RACE in self.console_tail(lines=400):
                    reason += f": {TCG_RACE_REASON}"
            if self.proc is not None and self.proc.returncode not in (0, None):
                reason += f" (exit code {self.proc.returncode})"
            raise LostVMError(reason, tail)

    @property
    def channel(self) -> Channel:
        if self._channel is None or self._channel.closed:
            self.check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket))
            except OSError as e:
                sock.close()
                self.check_alive()
                raise VMError(f"cannot connect to the guest agent at {self.socket}: {e}",
                              hint="only one client at a time: is another vm run active?") from e
            self._channel = Channel(sock, alive=self.check_alive)
        return self._channel

    def wait_ready(
        self, timeout: float = BOOT_TIMEOUT, *, not_boot: str | None = None
    ) -> GuestInfo:
        try:
            self.info = self.channel.wait_ready(timeout, not_boot=not_boot)
        except TimeoutError as e:
            raise LostVMError(str(e), self.console_tail()) from e
        return self.info

    # -- commands
    def run(self, *argv: str, check: bool = True, timeout: float | None = 600,
            input: bytes | None = None) -> str:
        """Run a command in the guest; returns its stdout, raises on failure when ``check``."""
        result = self.channel.run(argv, input=input, timeout=timeout, check=check)
        return result.out

    def sh(self, script: str, *, check: bool = True, timeout: float | None = 600) -> str:
        return self.run("/bin/sh", "-ec", script, check=check, timeout=timeout)

    def settled(self, timeout: float = 300) -> str:
        """The boot's state once no job is left (running, degraded), asked every 0.5 s
        and bounded. A boot that does not settle in time is an error naming its state,
        the jobs still queued and the units still activating. (It was written for a
        stock server whose boot seemed never to settle; that was its restore going
        back to the old kernel under the running command: see :meth:`switch_kernel`.)"""
        state = self.sh(
            f"for i in $(seq {int(timeout * 2)}); do s=$(systemctl is-system-running || true); "
            'case "$s" in initializing|starting) sleep 0.5 ;; *) echo "$s"; exit 0 ;; '
            'esac; done; echo "$s"', check=False, timeout=timeout + 60).strip()
        if state in ("initializing", "starting"):
            jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False)
            activating = self.run("systemctl", "list-units", "--state=activating",
                                  "--no-pager", check=False)
            raise VMError(f"the boot is still {state} after {timeout:.0f} s\njobs:\n{jobs}"
                          f"\nactivating:\n{activating}")
        return state

    def copy_in(self, local: Path, guest_path: str) -> None:
        self.channel.run(
            ["/bin/sh", "-ec", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "copy", guest_path],
            input=local.read_bytes(), check=True,
        )

    def kexec(self, kernel: config.Kernel, *, append: str | None = None,
              initrd: str | None = None, timeout: float = BOOT_TIMEOUT) -> GuestInfo:
        """kexec into ``kernel`` with kexec_file_load (``kexec -s``); wait for its agent.

        The new command line is the running one (``append`` replaces it if given),
        so the ``memmap=`` region stays reserved. ``initrd``: another initramfs than
        the kernel's own (a path in the guest).
        """
        before = self.info or self.wait_ready()
        cmdline = append if append is not None else self.spec.cmdline()
        self.run(
            "kexec", "-s", "-l", kernel.vmlinuz, f"--initrd={initrd or kernel.initrd}",
            f"--append={cmdline}",
        )
        start = time.monotonic()
        # Do not wait for an answer: the command never returns.
        self.channel.start(["/bin/sh", "-c", "sync; kexec -e"])
        info = self.wait_ready(timeout, not_boot=before.boot_id)
        record(f"kexec {before.release} -> {info.release} to agent ready",
               time.monotonic() - start)
        return info

    def seamless_kexec(self, kernel: config.Kernel, *args: str,
                       timeout: float = BOOT_TIMEOUT) -> tuple[GuestInfo, float]:
        """``seamless kexec --kernel`` into ``kernel``; see :meth:`switch_kernel`."""
        return self.switch_kernel(
            ["seamless", "kexec", "--kernel", kernel.vmlinuz, "--yes", *args], timeout=timeout)

    def switch_kernel(self, argv: list[str], *,
                      timeout: float = BOOT_TIMEOUT) -> tuple[GuestInfo, float]:
        """Run a seamless command that enters another kernel (kexec, upgrade) and wait for
        the new kernel's agent, and for its restore to end: when the new kernel refused
        the trees and went back to the old one (issue 22), the old one's.

        Returns its info and the seconds from the moment seamless says it enters the
        new kernel (the reboot call) to the agent answering there."""
        before = self.info or self.wait_ready()
        proc = self.channel.start(argv)
        output = b""
        entered = None
        with contextlib.suppress(TimeoutError):
            for _, data in proc.events(timeout=900):
                output += data
                if b"entering " in output:
                    entered = time.monotonic()
                    break
        if entered is None:
            raise VMError(f"{' '.join(argv)} ended with {proc.returncode} before entering "
                          f"the kernel:\n{output.decode(errors='replace')}")
        info = self.wait_ready(timeout, not_boot=before.boot_id)
        seconds = time.monotonic() - entered
        for _ in range(2):  # the new kernel's restore may go back to the old one: once
            try:
                self.sh(RESTORE_ENDED, timeout=RESTORE_WAIT)
                break
            except GuestRebooted:
                info = self.wait_ready(timeout, not_boot=info.boot_id)
                seconds = time.monotonic() - entered
        record(f"{' '.join(argv[:2])} {before.release} -> {info.release}, reboot call to "
               "agent ready", seconds)
        return info, seconds

    # -- QEMU's monitor
    def qmp(self, command: str, **arguments: object) -> object:
        """Run one QMP command on this guest's QEMU; returns its "return" value."""
        self.check_alive()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(self.run_dir / "qmp.sock"))
            stream = sock.makefile("rwb")
            stream.readline()  # the greeting
            answer: dict[str, object] = {}
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                stream.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
                stream.flush()
                while True:  # skip asynchronous events
                    answer = json.loads(stream.readline())
                    if "return" in answer or "error" in answer:
                        break
                if "error" in answer:
                    raise VMError(f"QMP {cmd} failed: {answer['error']}")
            return answer["return"]

    def reset(self, timeout: float = BOOT_TIMEOUT) -> GuestInfo:
        """A full reboot through the firmware (QEMU reset), for comparison with kexec."""
        before = self.info or self.wait_ready()
        start = time.monotonic()
        # -no-reboot turns every reset into an exit; allow this one.
        self.qmp("set-action", reboot="reset")
        try:
            self.qmp("system_reset")
            info = self.wait_ready(timeout, not_boot=before.boot_id)
        finally:
            if self.running():
                self.qmp("set-action", reboot="shutdown")
        record(f"firmware reboot {info.release} to agent ready", time.monotonic() - start)
        return info

    # -- lifetime
    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.running():
            pid = self.proc.pid if self.proc is not None else self.spec.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        (self.run_dir / "guest.json").unlink(missing_ok=True)

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def qemu_argv(image: Image, spec: GuestSpec, run_dir: Path) -> list[str]:
    kernel = config.KERNELS[spec.kernel]
    accel = "kvm" if kvm_works(image.vmlinuz(kernel)) else f"tcg,thread={TCG_THREAD}"
    netdev = "user,id=net0,restrict=on" + "".join(
        f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in spec.forwards.items()
    )
    # SEAMLESS_VM_PCAP=1: the guest's network traffic is written to net.pcap in the run
    # directory, for finding who resets a connection and when.
    capture = (["-object", f"filter-dump,id=pcap,netdev=net0,file={run_dir / 'net.pcap'}"]
               if os.environ.get("SEAMLESS_VM_PCAP") == "1" else [])
    return [
        "qemu-system-x86_64",
        "-accel", accel,
        "-m", spec.memory,
        "-smp", str(spec.smp),
        "-cpu", "host" if accel == "kvm" else os.environ.get("SEAMLESS_VM_CPU", TCG_CPU),
        "-nodefaults", "-no-reboot", "-display", "none",
        "-kernel", str(image.vmlinuz(kernel)),
        "-initrd", str(image.initrd(kernel)),
        "-append", spec.cmdline(),
        "-drive", f"file={run_dir / 'disk.qcow2'},if=virtio,format=qcow2,cache=unsafe",
        "-serial", f"file:{run_dir / 'console.log'}",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={run_dir / 'agent.sock'},server=on,wait=off",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={config.AGENT_PORT}",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=net0",
        *capture,
        "-device", "virtio-rng-pci",
    ]


#: Tests resume a booted guest instead of booting it (SEAMLESS_VM_SNAPSHOTS=0: they boot):
#: the first boot of each kind of guest (image, kernel, memory, region, command line) is
#: saved once it has settled, its RAM and its disk, and the next test that boots the same
#: kind resumes it. Under TCG a boot takes 35-45 s; a resume takes a few.
SNAPSHOTS = os.environ.get("SEAMLESS_VM_SNAPSHOTS", "1") != "0"
SNAPSHOT_SAVE_TIMEOUT = 180.0


def snapshot_dir(image: Image, spec: GuestSpec) -> Path:
    """Where the booted snapshot of ``spec``'s kind of guest is kept: in the image's own
    directory, so that it goes with it. Forwarded ports are the host's side only."""
    what = [spec.kernel, spec.memory, spec.smp, spec.cmdline(),  # the region: memmap=
            os.environ.get("SEAMLESS_VM_CPU", TCG_CPU), TCG_THREAD]
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    return image.directory / "snapshots" / key


def boot(image: Image, spec: GuestSpec, run_dir: Path, *, detach: bool = False,
         timeout: float = BOOT_TIMEOUT, snapshot: bool = False) -> Guest:
    """Boot a guest from a fresh overlay on ``image``; returns once its agent answers.

    With ``detach`` QEMU outlives this process (``vm boot``); otherwise it dies
    with it. With ``snapshot`` (and :data:`SNAPSHOTS`) the guest is resumed from the
    booted snapshot of its kind when there is one, and saved as one when there is not.
    """
    spec.validate()
    if shutil.which("qemu-system-x86_64") is None:
        raise VMError("qemu-system-x86_64 is not installed", hint="apt-get install qemu-system-x86")
    existing = attach(run_dir)
    if existing is not None:
        raise VMError(f"a guest is already running from {run_dir} (pid {existing.spec.pid})",
                      hint="stop it first (vm stop)")
    saved = snapshot_dir(image, spec) if snapshot and SNAPSHOTS else None
    if saved is not None and (saved / "done").exists():
        try:
            return _resume(image, spec, run_dir, saved, timeout)
        except VMError as e:
            log.warning("could not resume the booted snapshot %s, booting instead: %s",
                        saved, e)
            shutil.rmtree(saved, ignore_errors=True)
    _fresh_run_dir(run_dir, image, None)
    start = time.monotonic()
    guest = _start(image, spec, run_dir, detach=detach)
    try:
        info = guest.wait_ready(timeout)
        record(f"boot {info.release} to agent ready", time.monotonic() - start)
        # The package's seamless-arm.service makes the store ready at every boot, as on
        # a server; the agent answers earlier (sysinit.target), so this waits for the
        # boot's own start of it to finish, as an operator's login would come after it.
        guest.channel.run(["systemctl", "start", "seamless-arm.service"], timeout=timeout,
                          check=True)
        if saved is not None:
            try:
                _save(guest, saved)
            except VMError as e:  # the guest runs on (see _save); the next test boots
                log.warning("could not save %s as a booted snapshot: %s", saved, e)
    except BaseException:
        guest.stop()
        raise
    return guest


def _fresh_run_dir(run_dir: Path, image: Image, disk: Path | None) -> None:
    """An empty run directory with the guest's disk: a new overlay on the image, or a
    copy of ``disk`` (a snapshot's overlay, on the same image)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("disk.qcow2", "console.log", "agent.sock", "qmp.sock"):
        (run_dir / name).unlink(missing_ok=True)
    if disk is not None:
        shutil.copyfile(disk, run_dir / "disk.qcow2")
        return
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.rootfs),
         str(run_dir / "disk.qcow2")],
        check=True, stdin=subprocess.DEVNULL,
    )


def _start(image: Image, spec: GuestSpec, run_dir: Path, *, detach: bool = False,
           incoming: Path | None = None) -> Guest:
    """Start QEMU (``incoming``: loading the state saved there) and wait for its sockets."""
    argv = qemu_argv(image, spec, run_dir)
    if incoming is not None:
        argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    log.debug("+ %s", " ".join(argv))
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(run_dir / "qemu.log", "wb"),  # noqa: SIM115 - QEMU owns it from here
        start_new_session=True, preexec_fn=None if detach else _set_pdeathsig,
    )
    spec.pid = proc.pid
    guest = Guest(run_dir, spec, proc)
    try:
        deadline = time.monotonic() + 30
        while not (guest.socket.exists() and (run_dir / "qmp.sock").exists()):
            if not guest.running():
                qemu_err = (run_dir / "qemu.log").read_text(errors="replace").strip()
                raise VMError(f"QEMU did not start: {qemu_err[-2000:]}")
            if time.monotonic() > deadline:
                raise VMError("QEMU did not create its sockets within 30 s")
            time.sleep(0.05)
        (run_dir / "guest.json").write_text(json.dumps(asdict(spec), indent=2))
    except BaseException:
        guest.stop()
        raise
    return guest


def _migration_done(guest: Guest, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        answer = guest.qmp("query-migrate")
        status = answer.get("status") if isinstance(answer, dict) else None
        if status == "completed":
            return
        if status == "failed" or time.monotonic() > deadline:
            raise VMError(f"QEMU's migration {status or 'did not start'}: {answer}")
        time.sleep(0.1)


def _save(guest: Guest, saved: Path) -> None:
    """Save the booted ``guest`` (settled) as the snapshot of its kind, unless another
    test is saving it; the guest runs on."""
    saved.parent.mkdir(parents=True, exist_ok=True)
    with open(saved.parent / f"{saved.name}.lock", "w") as lock:
        if not try_lock(lock):
            return
        if (saved / "done").exists():
            return
        try:
            guest.settled(timeout=120)
        except VMError:
            return  # a boot that does not settle is not one to start the others from
        start = time.monotonic()
        work = saved.with_name(saved.name + ".work")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        guest.qmp("stop")
        try:
            guest.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(work / 'state'))}")
            _migration_done(guest, SNAPSHOT_SAVE_TIMEOUT)
            # the disks are flushed and let go at the end of the migration: a copy now
            # is the disk as the saved RAM knows it
            shutil.copyfile(guest.run_dir / "disk.qcow2", work / "disk.qcow2")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            guest.qmp("cont")
        (work / "done").write_text(json.dumps(asdict(guest.spec)))
        shutil.rmtree(saved, ignore_errors=True)
        work.rename(saved)
        record("saving a booted guest as a snapshot", time.monotonic() - start)


def _resume(image: Image, spec: GuestSpec, run_dir: Path, saved: Path,
            timeout: float) -> Guest:
    """Start a guest from the snapshot in ``saved``; its clock is set to the host's."""
    _fresh_run_dir(run_dir, image, saved / "disk.qcow2")
    start = time.monotonic()
    guest = _start(image, spec, run_dir, incoming=saved / "state")
    try:
        _migration_done(guest, timeout)
        guest.qmp("cont")
        info = guest.wait_ready(timeout)
        # The guest's clock stood still while it was saved.
        guest.run("date", "-u", "-s", f"@{time.time():.3f}")
        record(f"resume {info.release} from a booted snapshot to agent ready",
               time.monotonic() - start)
    except BaseException:
        guest.stop()
        raise
    return guest


def attach(run_dir: Path) -> Guest | None:
    """The guest running from ``run_dir`` (started by another process), if any."""
    try:
        data = json.loads((run_dir / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    data["forwards"] = {int(k): int(v) for k, v in data.get("forwards", {}).items()}
    guest = Guest(run_dir, GuestSpec(**data), None)
    if not guest.running():
        (run_dir / "guest.json").unlink(missing_ok=True)
        return None
    return guest


@contextlib.contextmanager
def booted(image: Image, spec: GuestSpec, run_dir: Path) -> Iterator[Guest]:
    guest = boot(image, spec, run_dir)
    try:
        yield guest
    finally:
        guest.stop()


#: The pytest fixture's type: ``boot_guest("A", memory="4G")`` boots and returns a guest.
BootGuest = Callable[..., Guest]
