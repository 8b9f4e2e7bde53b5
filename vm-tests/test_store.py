"""The store on the preserved region: format, a generation across kexec, corruption, wipe."""

from __future__ import annotations

import json
import re

import pytest

from vmtest import config, qemu
from vmtest.log import record
from vmtest.qemu import BootGuest
from vmtest.workloads import prepare_for_criu, start_counter

pytestmark = pytest.mark.vm

A, B = config.KERNELS["A"], config.KERNELS["B"]
STORE = "/run/seamless/store"


def file_sums(guest: qemu.Guest, directory: str) -> dict[str, str]:
    out = guest.sh(f"cd {directory} && find . -type f ! -name '*.log' -exec sha256sum {{}} +")
    return {name: digest for digest, name in (line.split() for line in out.splitlines())}


def throughput(guest: qemu.Guest, label: str, mib: int = 128) -> None:
    """Write then read ``mib`` MiB through the store's filesystem; record MiB/s."""
    out = guest.sh(
        f"f={STORE}/throughput; s=$(date +%s.%N); "
        f"dd if=/dev/zero of=$f bs=1M count={mib} conv=fsync status=none; "
        f"m=$(date +%s.%N); echo 3 > /proc/sys/vm/drop_caches; "
        f"dd if=$f of=/dev/null bs=1M status=none; e=$(date +%s.%N); rm $f; "
        f"echo $s $m $e")
    s, m, e = map(float, out.split())
    record(f"store {label}: write {mib} MiB ({mib / (m - s):.0f} MiB/s)", m - s)
    record(f"store {label}: read {mib} MiB ({mib / (e - m):.0f} MiB/s)", e - m)


def test_store_generation_survives_kexec_and_verify_names_a_corrupt_file(
    boot_guest: BootGuest,
) -> None:
    """format (DAX when possible), a real checkpoint into generation 1, kexec A→B with
    the same memmap=: B's `seamless store verify` passes and every file is identical;
    one flipped byte makes verify fail naming exactly that file; wipe leaves an empty
    store with none of the old bytes on the device; only root may read the device, in
    both kernels. Throughput with and without DAX."""
    g = boot_guest("A")
    # The package's seamless-arm.service found garbage in the region (a cold boot) and
    # made an empty store of it: no manual step before an upgrade.
    armed = g.run("journalctl", "-b", "-o", "cat", "-u", "seamless-arm.service")
    assert "formatted: the region held no store" in armed, armed
    assert json.loads(g.run("seamless", "store", "status", "--json"))["generations"] == []
    fmt = json.loads(g.run("seamless", "store", "format", "--json"))
    assert fmt["device"] == "/dev/pmem0" and fmt["size"] == 256 << 20
    assert g.run("stat", "-c", "%a", STORE).strip() == "700"
    # The device holds every checkpointed process's memory: root's alone, not disk's.
    assert g.run("stat", "-c", "%a %u %g", "/dev/pmem0").strip() == "600 0 0"
    # A second format of a store needs no --force; a foreign filesystem does.
    again = g.channel.run(["seamless", "store", "format"])
    assert again.returncode == 0, again.stderr

    # Throughput, with DAX (as formatted, when the device offers it) and without.
    throughput(g, "with DAX" if fmt["dax"] else "without DAX")
    if fmt["dax"]:
        g.sh(f"umount {STORE} && mount -o nodev,nosuid,noexec /dev/pmem0 {STORE}")
        throughput(g, "without DAX")
        g.run("umount", STORE)

    prepare_for_criu(g)
    pid = start_counter(g, "counter", "/root/count")
    ckpt = json.loads(g.run("seamless", "checkpoint", "--include", "unit:counter.service",
                            "--leave-running", "--json", timeout=900))
    assert ckpt["generation"] == 1 and [t["root"] for t in ckpt["trees"]] == [pid]
    images = ckpt["images"]
    assert images == f"{STORE}/generations/gen-1"
    # Root-only: nothing of the store is readable by others.
    loose = g.sh(f"find {STORE} \\( -type d ! -perm 700 \\) -o \\( -type f ! -perm 600 \\)"
                 " | grep -v lost+found || true")
    assert loose.strip() == "", loose
    before = file_sums(g, images)
    assert any(name.endswith(".img") for name in before)
    boot_before = g.info
    assert boot_before is not None

    g.run("umount", STORE)  # as the kexec path will do: nothing in flight
    g.kexec(B)
    assert g.run("uname", "-r").strip() == B.release
    # udev's rule made it so at this boot, before any seamless command ran
    assert g.run("stat", "-c", "%a %u %g", "/dev/pmem0").strip() == "600 0 0"

    verify = g.channel.run(["seamless", "store", "verify", "--json"])
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["ok"]
    assert file_sums(g, images) == before
    status = json.loads(g.run("seamless", "store", "status", "--json"))
    gen = status["generations"][0]
    assert gen["number"] == 1 and gen["source_release"] == A.release
    assert gen["source_boot_id"] == boot_before.boot_id
    assert [t["root"] for t in gen["trees"]] == [pid]

    # Flip one byte of one image: verify exits 4 and names exactly that file.
    victim = sorted(n for n in before if "pages-" in n)[0].removeprefix("./")
    g.run("python3", "-c", FLIP_BYTE, f"{images}/{victim}")
    corrupt = g.channel.run(["seamless", "store", "verify", "--json"])
    assert corrupt.returncode == 4, corrupt.stderr
    assert json.loads(corrupt.stdout)["generations"][0]["bad"] == [victim]

    # Wipe overwrites: none of a file's bytes remain anywhere on the device.
    marker = g.sh(f"head -c 1M /dev/urandom > {STORE}/marker; sync;"
                  f" dd if={STORE}/marker bs=64 skip=100 count=1 status=none | od -An -tx1"
                  " | tr -d ' \\n'")
    assert re.fullmatch(r"[0-9a-f]{128}", marker), marker
    assert g.run("python3", "-c", COUNT_BYTES, marker).strip() == "1"
    g.run("seamless", "store", "wipe", "--yes", timeout=300)
    status = json.loads(g.run("seamless", "store", "status", "--json"))
    assert status["generations"] == [] and status["partial"] == []
    g.run("umount", STORE)
    assert g.run("python3", "-c", COUNT_BYTES, marker).strip() == "0"


FLIP_BYTE = ("import sys\n"
             "with open(sys.argv[1], 'r+b') as f:\n"
             "    f.seek(100); b = f.read(1); f.seek(100); f.write(bytes([b[0] ^ 1]))\n")
COUNT_BYTES = ("import sys\n"
               "print(open('/dev/pmem0', 'rb').read().count(bytes.fromhex(sys.argv[1])))\n")
