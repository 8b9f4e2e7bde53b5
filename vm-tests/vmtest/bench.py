"""The blackout benchmark: how long a client waits, for several sizes of state, across
`seamless upgrade` as it runs by default, a plain `systemctl kexec` (the service
restarted, its state lost) and a full reboot through the firmware; and whether the
default upgrade meets its goals.

One guest on kernel A. For every size S a service holding S MiB of state and a counter
answers HTTP on a port forwarded to 127.0.0.1; the host probes it every 20 ms while the
guest goes A→B with `seamless upgrade --kernel B --yes` (no flags: the default path,
into the kernel's own initramfs; ``--initrd`` only when ``--generator`` asks for the
other generator's), back B→A the same way (informational),
A→B with `systemctl kexec` into the same kernel and initramfs as the default upgrade,
then into A with `systemctl reboot` (QEMU resets instead of exiting and boots its own
kernel, A). ``--lazy-pages`` and ``--way-back`` run other pairs of upgrades instead of
the default pair (see :func:`one_size`).

Every upgrade and the kexec also record the new kernel's bare boot, from the kexec to
its init (``kernel_to_init_seconds``: systemd-analyze's "(kernel)", or the kernel log's
"Run /init as init process" when the initramfs has no systemd; for an upgrade plus its
phase "leaving the old kernel", the jump and the earliest boot that the new kernel's
clock does not see, which the kexec's figure lacks); an upgrade's ``added_seconds`` is
its blackout less that boot: what seamless adds to a kexec.

The figures are printed as a table with the goals (:func:`goals`) and the default
upgrade's phases, written as JSON (each size's medians as ``default_s``,
``systemctl_kexec_s``, ``reboot_s`` and ``added_s``, the goals under ``goals``) and
plotted beside it (:func:`plot`, matplotlib: the ``bench`` extra). It measures; it
asserts nothing about speed.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

from vmtest import config, image, qemu
from vmtest.errors import VMError
from vmtest.log import log
from vmtest.probe import free_port, measure_blackout

PORT = 8080
SIZES = (64, 256, 1024)
#: Room for the largest size's images and its pre-dump, with the guest's RAM to match.
MEMORY = "5G"
REGION = "1920M!1G"
INTERVAL = 0.02

#: Holds SIZE MiB of known memory and a counter. GET / answers the counter, POST /
#: advances it, GET /sum answers the SHA-256 of the memory.
STATE_SERVER = """\
import hashlib, http.server, sys
size = int(sys.argv[2])
memory = bytearray(b'seamless' * (size << 17))
state = {'n': 0}
class H(http.server.BaseHTTPRequestHandler):
    def answer(self, body):
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        if self.path == '/sum':
            self.answer(hashlib.sha256(memory).hexdigest().encode())
        else:
            self.answer(str(state['n']).encode())
    def do_POST(self):
        state['n'] += 1; self.answer(str(state['n']).encode())
    def log_message(self, *a): pass
http.server.HTTPServer(('', int(sys.argv[1])), H).serve_forever()
"""

#: MiB/s of the checksums the store could use, on 64 MiB in the guest.
DIGEST_RATES = """\
import hashlib, json, os, time, zlib
try:
    import xxhash
except ImportError:
    xxhash = None
data = os.urandom(64 << 20)
rates = {}
for name, f in (("blake2b", lambda: hashlib.blake2b(data).digest()),
                ("sha256", lambda: hashlib.sha256(data).digest()),
                ("md5", lambda: hashlib.md5(data).digest()),
                ("crc32", lambda: zlib.crc32(data))) + ((
                    ("xxh64", lambda: xxhash.xxh64(data).digest()),) if xxhash else ()):
    t = time.perf_counter(); f(); rates[name] = round(64 / (time.perf_counter() - t), 1)
print(json.dumps(rates))
"""

UNIT = """\
[Unit]
Description=HTTP server holding {size} MiB of state in memory
After=network.target

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/state-server.py {port} {size}

[Install]
WantedBy=multi-user.target
"""


def ask(guest: qemu.Guest, path: str = "/", method: str = "GET") -> str:
    return guest.run(
        "python3", "-c",
        "import sys, urllib.request\n"
        "r = urllib.request.Request(sys.argv[1], method=sys.argv[2],"
        " data=b'' if sys.argv[2] == 'POST' else None)\n"
        "print(urllib.request.urlopen(r, timeout=300).read().decode())",
        f"http://127.0.0.1:{PORT}{path}", method).strip()


def wait_answer(guest: qemu.Guest, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if guest.channel.run(["python3", "-c", "import urllib.request; urllib.request."
                              f"urlopen('http://127.0.0.1:{PORT}/', timeout=5)"]).returncode == 0:
            return
        time.sleep(0.5)
    raise VMError(f"the state server did not answer within {timeout:.0f} s")


def copy_bandwidth(guest: qemu.Guest) -> float:
    """MiB/s of one 1 GiB dd from /dev/zero into a tmpfs file: the guest's memory copy rate."""
    out = guest.sh("dd if=/dev/zero of=/dev/shm/bandwidth bs=1M count=1024 2>&1; "
                   "rm -f /dev/shm/bandwidth")
    m = re.search(r"copied, ([\d.]+) s", out)
    if m is None:
        raise VMError(f"cannot read dd's rate from: {out}")
    return 1024 / float(m.group(1))


def start_state(guest: qemu.Guest, size: int) -> None:
    guest.channel.run(["sh", "-c", "cat > /etc/systemd/system/state.service"],
                      input=UNIT.format(size=size, port=PORT).encode(), check=True)
    guest.run("systemctl", "daemon-reload")
    guest.run("systemctl", "enable", "state.service")
    guest.run("systemctl", "restart", "state.service")
    wait_answer(guest)
    for _ in range(3):
        ask(guest, method="POST")


def reboot(guest: qemu.Guest) -> None:
    """`systemctl reboot`, with QEMU resetting the machine instead of exiting."""
    before = guest.info or guest.wait_ready()
    guest.qmp("set-action", reboot="reset")
    try:
        guest.channel.start(["systemctl", "reboot"])
        guest.wait_ready(not_boot=before.boot_id)
    finally:
        if guest.running():
            guest.qmp("set-action", reboot="shutdown")


#: systemd's time spans ("1min 2.345s", "512ms"): seconds per unit, longest names first.
SPAN_UNITS = {"month": 2629800.0, "min": 60.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6,
              "y": 31557600.0, "w": 604800.0, "d": 86400.0, "h": 3600.0, "s": 1.0}
_SPAN_PART = r"(\d+(?:\.\d+)?)\s*(" + "|".join(SPAN_UNITS) + r")(?![a-zµ])"


def parse_timespan(text: str) -> float:
    """Seconds of one of systemd's time spans: "2.345s", "830ms", "1min 2.345s",
    "1h 2min 3s". Raises ValueError on anything else."""
    text = text.strip()
    if not re.fullmatch(rf"(?:{_SPAN_PART}\s*)+", text):
        raise ValueError(f"not a systemd time span: {text!r}")
    return sum(float(n) * SPAN_UNITS[unit] for n, unit in re.findall(_SPAN_PART, text))


def parse_startup(text: str) -> dict[str, float]:
    """The parts of systemd-analyze's "Startup finished in 2.345s (kernel) + 1.2s
    (initrd) + 1min 3.5s (userspace) = ...", in seconds by name ("kernel", "initrd",
    "userspace", and "firmware", "loader" where there are). Raises ValueError when
    there is no such line (the boot has not finished)."""
    m = re.search(r"Startup finished in ([^=\n]*)", text)
    if m is None:
        raise ValueError(f"no 'Startup finished' in: {text.strip()!r}")
    parts = {}
    for part in m.group(1).split(" + "):
        p = re.fullmatch(r"\s*(.+?)\s*\(([^)]+)\)\s*", part)
        if p is None:
            raise ValueError(f"cannot read {part!r} of: {m.group(0)!r}")
        parts[p.group(2)] = parse_timespan(p.group(1))
    return parts


def run_init_seconds(kernel_log: str) -> float | None:
    """When the kernel ran its init (the initramfs' /init, or /sbin/init), in seconds
    after it started, from its log ("[    2.345678] Run /init as init process")."""
    m = re.search(r"\[\s*(\d+(?:\.\d+)?)\][^\n]*\bRun \S+ as init process", kernel_log)
    return float(m.group(1)) if m else None


def kernel_to_init(guest: qemu.Guest) -> float | None:
    """The running kernel's own boot, from its start (the kexec) to its init, in
    seconds; None (with a warning) when the guest does not tell.

    systemd-analyze's "(kernel)" ends when systemd starts: in a dracut initramfs that
    is the init. Without systemd in the initramfs (initramfs-tools) it ends only in the
    real root, after the initramfs' scripts and, in an upgrade, the restore run there:
    the kernel log's "Run /init as init process" is the init then."""
    out = guest.run("systemd-analyze", check=False)
    try:
        parts = parse_startup(out)
    except ValueError as e:
        log.warning("no kexec-to-init time: %s", e)
        return None
    if "initrd" in parts:
        return parts.get("kernel")
    found = run_init_seconds(guest.run("dmesg", check=False))
    if found is None:
        log.warning("no kexec-to-init time: no initrd in systemd-analyze and no "
                    "'Run ... as init process' in the kernel log")
    return found


#: The upgrade's phase from the kexec call to the new kernel's clock (seamless status).
LEAVING = "  leaving the old kernel"


def set_clock(guest: qemu.Guest) -> None:
    """Set the guest's wall clock to the host's. A guest's clock under TCG drifts while
    it is busy (once by more than a minute, after two initramfs builds), and the new
    kernel takes its clock from the RTC, which is the host's: the upgrade's phase
    "leaving the old kernel" (A's clock against B's), and so the kexec-to-init time and
    the seconds added, would carry the drift."""
    guest.run("date", "-u", "-s", f"@{time.time():.3f}")


def upgrade(guest: qemu.Guest, port: int, target: config.Kernel, digest: str,
            *args: str) -> dict[str, Any]:
    """`seamless upgrade` into ``target``, probed; its blackout, phases, the new
    kernel's own boot to init, the seconds seamless adds to it, and whether the
    service kept its counter and memory."""
    set_clock(guest)
    probed = measure_blackout(
        port, lambda: guest.switch_kernel(["seamless", "upgrade", "--kernel", target.vmlinuz,
                                           "--yes", *args]),
        interval=INTERVAL)
    guest.settled()
    status = json.loads(guest.run("seamless", "status", "--json"))
    deadline = time.monotonic() + 600
    while status.get("memory") == "arriving" and time.monotonic() < deadline:
        time.sleep(2)  # a lazy restore: the memory still arrives while the service runs
        status = json.loads(guest.run("seamless", "status", "--json"))
    kernel = kernel_to_init(guest)
    # The new kernel's clock starts after the jump (purgatory and its earliest boot: 3
    # to 18 s under TCG): the upgrade's phases time it, "leaving the old kernel" (less
    # the old kernel's way out, a fraction of a second), and it is the kexec's too.
    leaving = status.get("phases", {}).get(LEAVING)
    if kernel is not None and leaving is not None:
        kernel += leaving
    return {
        "blackout_seconds": round(probed.seconds, 2),
        # The service answers during the preflight (loading the kernel ...).
        "blackout_began_after_seconds": round(probed.began, 2),
        "kernel_to_init_seconds": None if kernel is None else round(kernel, 2),
        "added_seconds": None if kernel is None else round(probed.seconds - kernel, 2),
        "state_kept": (probed.last_answer == 3 and ask(guest, "/sum") == digest
                       and bool(status.get("ok")) and status.get("memory") in (None, "back")),
        "phases": {name: round(s, 2) for name, s in status.get("phases", {}).items()},
    }


DEFAULT = "seamless_upgrade_default"
DEFAULT_BACK = "seamless_upgrade_default_back"


GENERATORS = ("default", "dracut", "initramfs-tools")


def default_generator() -> str:
    """The generator of the test bed's /boot/initrd.img-*: the distribution's default."""
    return "initramfs-tools" if config.itools_default(False) else "dracut"


def generator_initrd(kernel: config.Kernel, generator: str) -> str:
    """The path of ``kernel``'s initramfs made by ``generator`` (or the default one)."""
    if generator in ("default", default_generator()):
        return kernel.initrd
    return kernel.dracut_initrd if generator == "dracut" else kernel.initramfs_tools_initrd


def one_size(guest: qemu.Guest, size: int, port: int,
             generator: str = "default", lazy_pages: bool = False,
             way_back: bool = False, round_no: int = 0) -> dict[str, Any]:
    a, b = config.KERNELS["A"], config.KERNELS["B"]

    def initrd(k: config.Kernel) -> tuple[str, ...]:
        """The upgrade's --initrd: none for the kernel's own initramfs (the
        distribution's generator), else the other generator's."""
        path = generator_initrd(k, generator)
        return () if path == k.initrd else ("--initrd", path)

    log.info("%d MiB of state: starting the service", size)
    guest.sh("umount /run/seamless/store 2>/dev/null || true; seamless store format --force")
    start_state(guest, size)
    digest = ask(guest, "/sum")

    upgrades: dict[str, dict[str, Any]] = {}
    if way_back:
        # All or nothing (the default, with its way back) against --no-way-back, both
        # whole dumps; each goes A -> B in every other round, so that neither has the
        # faster kernel's boot.
        pair = [("seamless_upgrade_no_way_back", ("--no-way-back",)),
                ("seamless_upgrade_whole_dump", ())]
        if round_no % 2:
            pair.reverse()
        for (key, extra), target in zip(pair, (b, a), strict=True):
            log.info("%d MiB: seamless upgrade --no-pre-dump %s-> %s", size,
                     " ".join(extra) + " " if extra else "", target.release)
            upgrades[key] = upgrade(guest, port, target, digest, "--no-pre-dump", *extra,
                                    *initrd(target))
    elif lazy_pages:
        # The lazy restore (a whole dump: see --lazy-pages) goes A -> B like the kexec
        # baseline, so the two it is compared with boot the same kernel and initramfs;
        # the pre-dump upgrade comes back B -> A.
        log.info("%d MiB: seamless upgrade --lazy-pages %s -> %s", size, a.release,
                 b.release)
        upgrades["seamless_upgrade_lazy"] = upgrade(guest, port, b, digest, "--lazy-pages",
                                                    *initrd(b))
        log.info("%d MiB: seamless upgrade --pre-dump %s -> %s", size, b.release, a.release)
        upgrades["seamless_upgrade_pre_dump"] = upgrade(guest, port, a, digest, "--pre-dump",
                                                        *initrd(a))
    else:
        # The default path, no flags: A -> B like the kexec baseline (the same kernel
        # and initramfs), then back B -> A the same way (informational: the other
        # kernel's boot).
        log.info("%d MiB: seamless upgrade (default) %s -> %s", size, a.release, b.release)
        upgrades[DEFAULT] = upgrade(guest, port, b, digest, *initrd(b))
        log.info("%d MiB: seamless upgrade (default) back %s -> %s", size, b.release,
                 a.release)
        upgrades[DEFAULT_BACK] = upgrade(guest, port, a, digest, *initrd(a))

    # The initramfs the upgrades into B booted: the baseline boots the same.
    kexec_initrd = generator_initrd(b, generator)
    log.info("%d MiB: systemctl kexec %s -> %s (%s)", size, a.release, b.release,
             kexec_initrd)
    guest.run("kexec", "-s", "-l", b.vmlinuz, f"--initrd={kexec_initrd}",
              f"--append={guest.spec.cmdline()}")
    kexec = measure_blackout(
        port, lambda: guest.switch_kernel(
            ["sh", "-c", "echo entering the new kernel; exec systemctl kexec"]),
        interval=INTERVAL)
    guest.settled()
    kexec_boot = kernel_to_init(guest)

    log.info("%d MiB: systemctl reboot through the firmware (into %s)", size, a.release)
    rebooted = measure_blackout(port, lambda: reboot(guest), interval=INTERVAL)
    return {
        "size_mib": size,
        **upgrades,
        "systemctl_kexec": {"blackout_seconds": round(kexec.seconds, 2),
                            "kernel_to_init_seconds": None if kexec_boot is None
                            else round(kexec_boot, 2),
                            "state_kept": kexec.last_answer == 3},
        "reboot": {"blackout_seconds": round(rebooted.seconds, 2),
                   "state_kept": rebooted.last_answer == 3},
    }


def _median(values: list[float | None]) -> float | None:
    """The median of the values there are (None: not measured), rounded; None if none."""
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's rounds as one row: the medians of the default path as flat keys
    (``default_s``, ``systemctl_kexec_s``, ``reboot_s``, ``added_s``; None for what
    this run did not measure), then each variant's median blackout, kexec-to-init,
    added seconds and phases, the range of its blackouts, and whether every round kept
    the state; the rounds last."""
    out: dict[str, Any] = {"size_mib": runs[0]["size_mib"]}
    variants: dict[str, Any] = {}
    for key in (k for k in runs[0] if k != "size_mib"):
        got = [r[key] for r in runs]
        seconds = [g["blackout_seconds"] for g in got]
        variants[key] = {"blackout_seconds": round(statistics.median(seconds), 2),
                         "blackout_range": [min(seconds), max(seconds)],
                         "state_kept": all(g["state_kept"] for g in got)}
        for field in ("kernel_to_init_seconds", "added_seconds"):
            if any(field in g for g in got):
                variants[key][field] = _median([g.get(field) for g in got])
        if "phases" in got[0]:
            names = dict.fromkeys(n for g in got for n in g["phases"])
            variants[key]["phases"] = {
                n: round(statistics.median(g["phases"][n] for g in got if n in g["phases"]), 2)
                for n in names}
    out["default_s"] = variants.get(DEFAULT, {}).get("blackout_seconds")
    out["systemctl_kexec_s"] = variants.get("systemctl_kexec", {}).get("blackout_seconds")
    out["reboot_s"] = variants.get("reboot", {}).get("blackout_seconds")
    out["added_s"] = variants.get(DEFAULT, {}).get("added_seconds")
    return {**out, **variants, "rounds": runs}


#: The default upgrade's goals: its blackout against systemctl kexec's, its growth from
#: the smallest state to the largest, the seconds it adds to the bare kexec, and the
#: restorer's own start (python) within it. Each figure must be at most the goal.
KEXEC_RATIO_GOAL = 0.33
GROWTH_GOAL = 1.1
ADDED_GOAL = 3.0
RESTORER_SHARE_GOAL = 0.10
RESTORER_START = "the restorer's start (python)"
GROWTH_SIZES = (64, 1024)


def restorer_share(row: dict[str, Any]) -> float | None:
    """The default upgrade's restorer start (python), as a share of its blackout."""
    phases = row.get(DEFAULT, {}).get("phases", {})
    start = next((s for n, s in phases.items() if n.strip() == RESTORER_START), None)
    if start is None or not row.get("default_s"):
        return None
    return float(start) / float(row["default_s"])


def _goal(limit: float, what: str, figures: dict[int, float | None],
          per_size: bool = True) -> dict[str, Any]:
    """A goal over the sizes: the worst size's figure, met when every measured size's
    is at most ``limit``; figure and met None when no size measured it. ``per_size``:
    each size's figure and whether it meets the goal too."""
    measured = {size: f for size, f in figures.items() if f is not None}
    out: dict[str, Any] = {"what": what, "goal": limit,
                           "figure": round(max(measured.values()), 3) if measured else None,
                           "met": all(f <= limit for f in measured.values())
                           if measured else None}
    if per_size:
        out["per_size"] = [{"size_mib": size, "figure": None if f is None else round(f, 3),
                            "met": None if f is None else f <= limit}
                           for size, f in figures.items()]
    return out


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The default upgrade's goals, from the size rows of :func:`summary`: each with
    its figure, its goal (the figure must be at most that) and whether it is met. Empty
    when the default upgrade did not run (--lazy-pages, --way-back)."""
    rows = [r for r in rows if r.get("default_s") is not None]
    if not rows:
        return {}
    out = {
        "default_vs_systemctl_kexec": _goal(
            KEXEC_RATIO_GOAL, "the default upgrade's blackout / systemctl kexec's",
            {r["size_mib"]: r["default_s"] / r["systemctl_kexec_s"]
             if r.get("systemctl_kexec_s") else None for r in rows}),
    }
    by_size = {r["size_mib"]: r["default_s"] for r in rows}
    if len(by_size) > 1:
        small, large = (GROWTH_SIZES if all(s in by_size for s in GROWTH_SIZES)
                        else (min(by_size), max(by_size)))
        out["growth"] = _goal(
            GROWTH_GOAL, f"the default upgrade's blackout at {large} MiB / at {small} MiB",
            {large: by_size[large] / by_size[small] if by_size[small] else None},
            per_size=False)
        out["growth"]["sizes_mib"] = [small, large]
    out["added_s"] = _goal(
        ADDED_GOAL, "seconds the default upgrade adds to the bare kexec-to-init",
        {r["size_mib"]: r.get("added_s") for r in rows})
    out["restorer_start_share"] = _goal(
        RESTORER_SHARE_GOAL, f"{RESTORER_START} / the default upgrade's blackout",
        {r["size_mib"]: restorer_share(r) for r in rows})
    return out


WITHOUT = "/boot/initrd-without-seamless.img"


def initramfs(guest: qemu.Guest, rounds: int = 2) -> dict[str, Any]:
    """Kernel A's initramfs with and without the seamless module: its size, and the
    time systemd spends in it (systemd-analyze's "initrd"), kexec'ing into each in
    turn."""
    a = config.KERNELS["A"]
    log.info("initramfs: building %s without the seamless module", WITHOUT)
    guest.run("dracut", "--force", "--quiet", "--omit", "seamless", WITHOUT, a.release,
              timeout=1200)
    paths = {"with": a.initrd, "without": WITHOUT}
    result: dict[str, Any] = {
        name: {"bytes": int(guest.run("stat", "-L", "-c", "%s", path)), "initrd_seconds": []}
        for name, path in paths.items()}
    for _ in range(rounds):
        for name, path in paths.items():
            guest.kexec(a, initrd=path)
            guest.settled()
            out = guest.run("systemd-analyze")
            try:
                seconds = parse_startup(out)["initrd"]
            except (ValueError, KeyError) as e:
                raise VMError(f"no initrd time in systemd-analyze: {out}") from e
            result[name]["initrd_seconds"].append(seconds)
    return result


#: The upgrades a run may have measured (key, title, column), the default path first.
VARIANTS = ((DEFAULT, "the default path", "default"),
            (DEFAULT_BACK, "the default path, the way back (B -> A)", "back"),
            ("seamless_upgrade_no_way_back", "whole dump, --no-way-back", "no-back"),
            ("seamless_upgrade_whole_dump", "whole dump", "whole"),
            ("seamless_upgrade_pre_dump", "pre-dump", "pre-dump"),
            ("seamless_upgrade_lazy", "lazy restore (whole dump)", "lazy"))


def _seconds(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def goal_lines(found: dict[str, Any]) -> list[str]:
    """The goals block of the table: each goal, its figure, MET or NOT MET."""
    lines = ["goals (the default upgrade; over the sizes, the worst size's figure)"]
    for g in found.values():
        met = {True: "MET", False: "NOT MET", None: "n/a (not measured)"}[g["met"]]
        figure = "-" if g["figure"] is None else f"{g['figure']:.2f}"
        per = ", ".join(f"{p['size_mib']} MiB "
                        + ("-" if p["figure"] is None else f"{p['figure']:.2f}")
                        for p in g.get("per_size", []))
        lines.append(f"  {g['what']:<62} {figure:>6}  goal <= {g['goal']:<5.2f} {met}"
                     + (f"  ({per})" if per else ""))
    return lines


def table(result: dict[str, Any]) -> str:
    rows = result["sizes"]
    variants = [v for v in VARIANTS if v[0] in rows[0]]
    # the ratios are the default upgrade's, or else the last variant's
    best = variants[0] if variants[0][0] == DEFAULT else variants[-1]
    lines = [f"the upgrades' initramfs: {result.get('upgrade_initramfs', 'dracut')}",
             f"guest memory copy bandwidth (dd 1 GiB into tmpfs): "
             f"{result['copy_bandwidth_mib_s']:.0f} MiB/s", "",
             "blackout in seconds (kept: the service's counter and memory checksum)",
             f"{'state':>8}" + "".join(f" {short:>9}" for _, _, short in variants)
             + f" {'kept':>5} {'kexec':>7} {'reboot':>7}"
             f" {'/kexec':>7} {'/reboot':>8} {'/64MiB':>7} {'+s':>6} {'added':>6}"
             f"   (ratios, growth, added: {best[2]})"]
    smallest = rows[0][best[0]]["blackout_seconds"]
    for r in rows:
        k = r["systemctl_kexec"]["blackout_seconds"]
        b = r["reboot"]["blackout_seconds"]
        p = r[best[0]]["blackout_seconds"]
        kept = all(r[v]["state_kept"] for v, _, _ in variants)
        lines.append(f"{r['size_mib']:>4} MiB"
                     + "".join(f" {r[v]['blackout_seconds']:>9.1f}" for v, _, _ in variants)
                     + f" {'yes' if kept else 'NO':>5} {k:>7.1f} {b:>7.1f}"
                     f" {p / k:>7.2f} {p / b:>8.2f} {p / smallest:>7.2f} {p - smallest:>+6.1f}"
                     f" {_seconds(r[best[0]].get('added_seconds'), 6)}")
    if result.get("rounds", 1) > 1:
        lines += ["", f"blackout range (min-max) over {result['rounds']} rounds; the table "
                  "shows the medians"]
        for r in rows:
            lines.append(f"{r['size_mib']:>4} MiB" + "".join(
                f"  {short} {r[v]['blackout_range'][0]:.1f}-{r[v]['blackout_range'][1]:.1f}"
                for v, _, short in variants) + "".join(
                f"  {name} {r[k]['blackout_range'][0]:.1f}-{r[k]['blackout_range'][1]:.1f}"
                for k, name in (("systemctl_kexec", "kexec"), ("reboot", "reboot"))))
    if "seamless_upgrade_no_way_back" in rows[0]:
        lines.append("")
        for r in rows:
            with_back = r["seamless_upgrade_whole_dump"]["blackout_seconds"]
            without = r["seamless_upgrade_no_way_back"]["blackout_seconds"]
            lines.append(f"{r['size_mib']:>4} MiB: all or nothing (the way back) adds "
                         f"{with_back - without:+.1f} s to the blackout "
                         f"({(with_back / without - 1) * 100:+.0f}%; goal: under +10%)")
            # The hold changes only the restore: the blackouts also differ by the new
            # kernel's boot, whose spread under TCG is larger than the hold.
            restore = [r[k]["phases"].get("restore") for k in
                       ("seamless_upgrade_whole_dump", "seamless_upgrade_no_way_back")]
            if None not in restore:
                held, free = restore
                lines.append(f"          the restore, the one phase it changes: {held:.1f} s, "
                             f"{free:.1f} s without ({held - free:+.1f} s, "
                             f"{(held - free) / without * 100:+.0f}% of the blackout)")
    lines += ["", "blackout: the longest gap between answered probes (every "
              f"{INTERVAL * 1000:.0f} ms) as the host sees it. kexec and reboot lose the "
              "state: their service starts again empty. +s: seconds more than at the "
              "smallest state. added: the blackout less the new kernel's own boot from "
              "the kexec to its init."]
    found = result.get("goals") or goals(rows)
    if found:
        lines += [""] + goal_lines(found)
    for key, title, _ in variants:
        names = list(dict.fromkeys(n for r in rows for n in r[key]["phases"]))
        lines += ["", f"seamless upgrade, {title}: phases in seconds (seamless status)"]
        for n in names:
            lines.append(f"  {n:<44}" + "".join(f" {r[key]['phases'].get(n, 0):>7.1f}"
                                                 for r in rows))
        extra = [("blackout (the host's probes)", key, "blackout_seconds"),
                 ("the new kernel's boot, kexec to init", key, "kernel_to_init_seconds"),
                 ("added (blackout - kexec to init)", key, "added_seconds"),
                 ("systemctl kexec's boot, its clock to init", "systemctl_kexec",
                  "kernel_to_init_seconds")]
        for name, variant, field in extra:
            if variant != key and key != best[0]:
                continue  # the baseline's boot beside the compared upgrade's only
            if any(r[variant].get(field) is not None for r in rows):
                lines.append(f"  {name:<44}" + "".join(
                    f" {_seconds(r[variant].get(field), 7)}" for r in rows))
        lines.append(f"  {'(state, MiB)':<44}" + "".join(f" {r['size_mib']:>7}" for r in rows))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """The blackout (median, min-max bars) against the state's size, one line per way
    (each upgrade variant, systemctl kexec, reboot), with the goal of 0.33 x systemctl
    kexec's dashed, written as PNG to ``path``. Raises ImportError without matplotlib
    (the ``bench`` extra)."""
    from matplotlib.figure import Figure  # only the benchmark's plot needs it

    rows = result["sizes"]
    sizes = [r["size_mib"] for r in rows]
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    ways = [(key, f"seamless upgrade, {title}") for key, title, _ in VARIANTS
            if key in rows[0]]
    ways += [("systemctl_kexec", "systemctl kexec (state lost)"),
             ("reboot", "reboot through the firmware (state lost)")]
    for key, label in ways:
        medians = [r[key]["blackout_seconds"] for r in rows]
        ranges = [r[key].get("blackout_range", [m, m]) for r, m in zip(rows, medians,
                                                                        strict=True)]
        ax.errorbar(sizes, medians, yerr=[[m - lo for m, (lo, _) in zip(medians, ranges,
                                                                       strict=True)],
                                          [hi - m for m, (_, hi) in zip(medians, ranges,
                                                                       strict=True)]],
                    marker="o", capsize=4, label=label)
    ax.plot(sizes, [KEXEC_RATIO_GOAL * r["systemctl_kexec"]["blackout_seconds"] for r in rows],
            linestyle="--", color="grey",
            label=f"goal: {KEXEC_RATIO_GOAL} x systemctl kexec")
    if len(sizes) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("state held by the service (MiB)")
    ax.set_ylabel("blackout (s): median, bars min-max")
    kernels = result.get("kernels", {})
    n = result.get("rounds", 1)
    ax.set_title(f"blackout: {kernels.get('A', 'A')} -> {kernels.get('B', 'B')}, "
                 f"{result.get('upgrade_initramfs', 'dracut')} initramfs, "
                 f"{n} round{'s' if n != 1 else ''}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)


def main(*, sizes: tuple[int, ...] = SIZES, with_initramfs: bool = True,
         generator: str = "default", lazy_pages: bool = False, rounds: int = 1,
         json_path: Path | None = None, way_back: bool = False) -> int:
    img = image.build()
    port = free_port()
    spec = qemu.GuestSpec(image=str(img.directory), kernel="A", memory=MEMORY, region=REGION,
                          forwards={PORT: port})
    result: dict[str, Any] = {"kernels": {k: v.release for k, v in config.KERNELS.items()},
                              "memory": MEMORY, "region": REGION, "sizes": [], "goals": {},
                              "upgrade_initramfs": default_generator()
                              if generator == "default" else generator, "rounds": rounds}
    start = time.monotonic()
    with qemu.booted(img, spec, config.CACHE_DIR / "run" / "bench") as guest:
        guest.settled()
        result["copy_bandwidth_mib_s"] = round(copy_bandwidth(guest), 1)
        guest.channel.run(["sh", "-c", "cat > /usr/local/lib/state-server.py"],
                          input=STATE_SERVER.encode(), check=True)
        result["digest_rates_mib_s"] = json.loads(guest.run("python3", "-c", DIGEST_RATES))
        runs: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
        try:
            # the rounds interleave the sizes: a slow stretch of the machine hits them all
            for n in range(rounds):
                for size in sizes:
                    log.info("round %d of %d, %d MiB", n + 1, rounds, size)
                    runs[size].append(one_size(guest, size, port, generator, lazy_pages,
                                               way_back, n))
                    log.info("%s", json.dumps(runs[size][-1]))
                result["sizes"] = [summary(r) for r in runs.values() if r]
                result["goals"] = goals(result["sizes"])
            if with_initramfs:
                result["initramfs"] = initramfs(guest)
        finally:
            result["total_seconds"] = round(time.monotonic() - start, 1)
            if json_path is not None:
                json_path.write_text(json.dumps(result, indent=2) + "\n")
    if result["sizes"]:
        print(table(result))
    if "initramfs" in result:
        for name, r in result["initramfs"].items():
            times = ", ".join(f"{t:.2f}" for t in r["initrd_seconds"])
            print(f"initramfs {name} the seamless module: {r['bytes'] / (1 << 20):.1f} MiB, "
                  f"time in it (systemd-analyze): {times} s")
    print("checksum rates in the guest (MiB/s): " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["digest_rates_mib_s"].items()))
    if json_path is not None:
        print(f"\nwritten to {json_path}")
    if result["sizes"]:
        png = json_path.with_suffix(".png") if json_path is not None else Path("bench.png")
        try:
            plot(result, png)
        except ImportError:
            print("plot skipped: matplotlib is not installed "
                  "(.venv/bin/python -m pip install -e '.[bench]')")
        else:
            print(f"plotted to {png}")
    return 0
