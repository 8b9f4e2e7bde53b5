"""The blackout benchmark: how long a client waits, for several sizes of state, across
`seamless upgrade`, a plain `systemctl kexec` (the service restarted, its state lost)
and a full reboot through the firmware.

One guest on kernel A. For every size S a service holding S MiB of state and a counter
answers HTTP on a port forwarded to 127.0.0.1; the host probes it every 20 ms while the
guest goes A→B with `seamless upgrade --no-pre-dump`, B→A with `seamless upgrade`
(pre-dump), A→B with `systemctl kexec`, then into A with `systemctl reboot` (QEMU resets
instead of exiting). The figures are printed as a table
and written as JSON. It measures; it asserts nothing about speed.
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


def upgrade(guest: qemu.Guest, port: int, target: config.Kernel, digest: str,
            *args: str) -> dict[str, Any]:
    """`seamless upgrade` into ``target``, probed; its blackout, phases and whether the
    service kept its counter and memory."""
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
    return {
        "blackout_seconds": round(probed.seconds, 2),
        # The service answers during the preflight (loading the kernel ...).
        "blackout_began_after_seconds": round(probed.began, 2),
        "state_kept": (probed.last_answer == 3 and ask(guest, "/sum") == digest
                       and bool(status.get("ok")) and status.get("memory") in (None, "back")),
        "phases": {name: round(s, 2) for name, s in status.get("phases", {}).items()},
    }


def one_size(guest: qemu.Guest, size: int, port: int,
             initramfs_tools: bool = False, lazy_pages: bool = False,
             way_back: bool = False, round_no: int = 0) -> dict[str, Any]:
    a, b = config.KERNELS["A"], config.KERNELS["B"]

    def initrd(k: config.Kernel) -> tuple[str, ...]:
        """The upgrade's initramfs: initramfs-tools' (restore before init) or the
        kernel's own (dracut with systemd: restore in seamless-restore.service)."""
        return ("--initrd", k.initramfs_tools_initrd) if initramfs_tools else ()

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
    else:  # a whole dump, then a pre-dump
        log.info("%d MiB: seamless upgrade --no-pre-dump %s -> %s", size, a.release,
                 b.release)
        upgrades["seamless_upgrade_whole_dump"] = upgrade(guest, port, b, digest,
                                                          "--no-pre-dump", *initrd(b))
        log.info("%d MiB: seamless upgrade (pre-dump) %s -> %s", size, b.release, a.release)
        upgrades["seamless_upgrade_pre_dump"] = upgrade(guest, port, a, digest, "--pre-dump",
                                                        *initrd(a))

    log.info("%d MiB: systemctl kexec %s -> %s", size, a.release, b.release)
    guest.run("kexec", "-s", "-l", b.vmlinuz, f"--initrd={b.initrd}",
              f"--append={guest.spec.cmdline()}")
    kexec = measure_blackout(
        port, lambda: guest.switch_kernel(
            ["sh", "-c", "echo entering the new kernel; exec systemctl kexec"]),
        interval=INTERVAL)

    log.info("%d MiB: systemctl reboot through the firmware (into %s)", size, a.release)
    rebooted = measure_blackout(port, lambda: reboot(guest), interval=INTERVAL)
    return {
        "size_mib": size,
        **upgrades,
        "systemctl_kexec": {"blackout_seconds": round(kexec.seconds, 2),
                            "state_kept": kexec.last_answer == 3},
        "reboot": {"blackout_seconds": round(rebooted.seconds, 2),
                   "state_kept": rebooted.last_answer == 3},
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's rounds as one row: each variant's median blackout and phases, the
    range of its blackouts, and whether every round kept the state; the rounds too."""
    out: dict[str, Any] = {"size_mib": runs[0]["size_mib"], "rounds": runs}
    for key in (k for k in runs[0] if k != "size_mib"):
        got = [r[key] for r in runs]
        seconds = [g["blackout_seconds"] for g in got]
        out[key] = {"blackout_seconds": round(statistics.median(seconds), 2),
                    "blackout_range": [min(seconds), max(seconds)],
                    "state_kept": all(g["state_kept"] for g in got)}
        if "phases" in got[0]:
            names = dict.fromkeys(n for g in got for n in g["phases"])
            out[key]["phases"] = {
                n: round(statistics.median(g["phases"][n] for g in got if n in g["phases"]), 2)
                for n in names}
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
            m = re.search(r"([\d.]+)(m?s) \(initrd\)", out)
            if m is None:
                raise VMError(f"no initrd time in systemd-analyze: {out}")
            seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
            result[name]["initrd_seconds"].append(seconds)
    return result


VARIANTS = (("seamless_upgrade_no_way_back", "whole dump, --no-way-back", "no-back"),
            ("seamless_upgrade_whole_dump", "whole dump", "whole"),
            ("seamless_upgrade_pre_dump", "pre-dump", "pre-dump"),
            ("seamless_upgrade_lazy", "lazy restore (whole dump)", "lazy"))


def table(result: dict[str, Any]) -> str:
    rows = result["sizes"]
    variants = [v for v in VARIANTS if v[0] in rows[0]]
    best = variants[-1]  # the ratios are the fastest variant's
    lines = [f"the upgrades' initramfs: {result.get('upgrade_initramfs', 'dracut')}",
             f"guest memory copy bandwidth (dd 1 GiB into tmpfs): "
             f"{result['copy_bandwidth_mib_s']:.0f} MiB/s", "",
             "blackout in seconds (kept: the service's counter and memory checksum)",
             f"{'state':>8}" + "".join(f" {short:>9}" for _, _, short in variants)
             + f" {'kept':>5} {'kexec':>7} {'reboot':>7}"
             f" {'/kexec':>7} {'/reboot':>8} {'/64MiB':>7} {'+s':>6}   (ratios, growth: {best[2]})"]
    smallest = rows[0][best[0]]["blackout_seconds"]
    for r in rows:
        k = r["systemctl_kexec"]["blackout_seconds"]
        b = r["reboot"]["blackout_seconds"]
        p = r[best[0]]["blackout_seconds"]
        kept = all(r[v]["state_kept"] for v, _, _ in variants)
        lines.append(f"{r['size_mib']:>4} MiB"
                     + "".join(f" {r[v]['blackout_seconds']:>9.1f}" for v, _, _ in variants)
                     + f" {'yes' if kept else 'NO':>5} {k:>7.1f} {b:>7.1f}"
                     f" {p / k:>7.2f} {p / b:>8.2f} {p / smallest:>7.2f} {p - smallest:>+6.1f}")
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
              "smallest state."]
    for key, title, _ in variants:
        names = list(dict.fromkeys(n for r in rows for n in r[key]["phases"]))
        lines += ["", f"seamless upgrade, {title}: phases in seconds (seamless status)"]
        for n in names:
            lines.append(f"  {n:<44}" + "".join(f" {r[key]['phases'].get(n, 0):>7.1f}"
                                                 for r in rows))
        lines.append(f"  {'(state, MiB)':<44}" + "".join(f" {r['size_mib']:>7}" for r in rows))
    return "\n".join(lines)


def main(*, sizes: tuple[int, ...] = SIZES, with_initramfs: bool = True,
         initramfs_tools: bool = False, lazy_pages: bool = False, rounds: int = 1,
         json_path: Path | None = None, way_back: bool = False) -> int:
    img = image.build()
    port = free_port()
    spec = qemu.GuestSpec(image=str(img.directory), kernel="A", memory=MEMORY, region=REGION,
                          forwards={PORT: port})
    result: dict[str, Any] = {"kernels": {k: v.release for k, v in config.KERNELS.items()},
                              "memory": MEMORY, "region": REGION, "sizes": [],
                              "upgrade_initramfs": "initramfs-tools" if initramfs_tools
                              else "dracut", "rounds": rounds}
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
                    runs[size].append(one_size(guest, size, port, initramfs_tools, lazy_pages,
                                               way_back, n))
                    log.info("%s", json.dumps(runs[size][-1]))
                result["sizes"] = [summary(r) for r in runs.values() if r]
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
    return 0
