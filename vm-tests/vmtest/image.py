"""Build (or reuse) the guest image.

Two layers, each cached under a key made of everything that goes into it:

base   mmdebstrap's Debian root (packages, both kernels, their dracut
       initramfs), from the host's own apt sources.  Slow (about 2 minutes);
       changes only with the package list or the kernels.
image  the base plus this project's Debian package (installed with apt, as an
       operator installs it), the guest agent and the guest's configuration, as
       an ext4 file, with each kernel and initramfs copied beside it for direct
       boot.  Fast (seconds); changes with the project.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmtest import config
from vmtest.errors import VMError
from vmtest.log import log, step

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
GUEST = HERE / "guest"
IMAGE_SIZE = "4G"
KEEP = 6  # cached images and bases kept per kind (releases, stock or not)

DRACUT_CONF = """\
# seamless test bed: a generic initramfs (not host-only: it is built in a chroot)
hostonly="no"
compress="zstd"
add_drivers+=" virtio_blk virtio_pci virtio_console virtio_net ext4 "
omit_dracutmodules+=" plymouth "
"""

INITRAMFS_TOOLS_MODULES = "virtio_pci\nvirtio_blk\nvirtio_console\nvirtio_net\next4\n"

NETWORK_CONF = """\
[Match]
Name=e*

[Network]
DHCP=ipv4
"""


@dataclass(frozen=True)
class Image:
    """A built guest image: the root filesystem and the kernels to boot directly."""

    directory: Path

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.ext4"

    def vmlinuz(self, kernel: config.Kernel) -> Path:
        return self.directory / f"vmlinuz-{kernel.release}"

    def initrd(self, kernel: config.Kernel) -> Path:
        return self.directory / f"initrd.img-{kernel.release}"

    @property
    def info(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.directory / "info.json").read_text())
        return data


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    log.debug("+ %s", " ".join(argv))
    try:
        return subprocess.run(
            argv, check=True, text=True, capture_output=True, stdin=subprocess.DEVNULL
        )
    except subprocess.CalledProcessError as e:
        tail = "\n".join((e.stderr or e.stdout or "").strip().splitlines()[-20:])
        raise VMError(f"{argv[0]} failed with exit code {e.returncode}:\n{tail}") from e
    except FileNotFoundError as e:
        raise VMError(f"{argv[0]} is not installed (apt-get install {argv[0]})") from e


#: Debian's codenames, oldest first: a host source of any of them is the mirror to use.
CODENAMES = ("bullseye", "bookworm", "trixie", "forky", "duke", "sid")


def host_apt_sources(etc: Path = Path("/etc/apt"),
                     codenames: tuple[str, ...] | None = None) -> str:
    """The host's Debian apt sources, moved to ``codenames`` (the guest's release and
    any other a kernel comes from), as one deb822 text.

    The host may run another release than the guest: its Debian mirrors serve every
    release, so each of its Debian sources is taken with the suite's codename swapped
    (``bookworm-security`` becomes ``trixie-security``). Read at run time, so no mirror
    address is ever written into the repository.
    """
    wanted = codenames or wanted_codenames()
    found: list[tuple[str, list[str]]] = []  # (the stanza but its suites, suites)
    paths = [etc / "sources.list"]
    d = etc / "sources.list.d"
    if d.is_dir():
        paths += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = _deb822(stanza)
                enabled = fields.get("enabled", "yes").lower() != "no"
                if enabled and "deb" in fields.get("types", "").split():
                    found.append((_without_fields(stanza, ("types", "suites")),
                                  fields.get("suites", "").split()))
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)$", line)
                if m:
                    components = m.group(4).split("#")[0].strip()
                    found.append((f"URIs: {m.group(2)}\nComponents: {components}",
                                  [m.group(3)]))
    stanzas: list[str] = []
    for codename in wanted:
        for rest, suites in found:
            moved = sorted({codename + s[len(s.split("-")[0]):] for s in suites
                            if s.split("-")[0] in CODENAMES})
            stanza = f"Types: deb\nSuites: {' '.join(moved)}\n{rest}"
            if moved and stanza not in stanzas:
                stanzas.append(stanza)
    if not stanzas:
        raise VMError(
            "no Debian apt source in /etc/apt/sources.list(.d)",
            hint="the guest is built from the host's Debian mirror: add a Debian source",
        )
    return "\n\n".join(stanzas) + "\n"


def wanted_codenames() -> tuple[str, ...]:
    """The guest's release first, then any other release one of its kernels comes from."""
    others = [k.suite for k in config.KERNELS.values() if k.suite]
    return tuple(dict.fromkeys([config.DISTRIBUTION, *others]))


def _without_fields(stanza: str, names: tuple[str, ...]) -> str:
    """A deb822 stanza without comments and without the fields ``names`` (lower case)."""
    kept: list[str] = []
    dropping = False
    for line in stanza.strip().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if not line[:1].isspace():
            dropping = line.split(":", 1)[0].strip().lower() in names
        if not dropping:
            kept.append(line)
    return "\n".join(kept)


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line[:1].isspace() and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def packages(extra: tuple[str, ...] = ()) -> list[str]:
    kernels = [k.package for k in config.KERNELS.values()]
    return sorted(set(config.PACKAGES) | set(kernels) | set(extra))


class AptIndex:
    """The package lists of the guest's sources, in a directory of the test bed's own.

    The host's apt knows only the host's release; this asks the guest's (``apt-get
    update`` into the cache, refreshed once a day) without touching the host's apt.
    """

    MAX_AGE = 24 * 3600.0

    def __init__(self, sources: str) -> None:
        self.dir = config.CACHE_DIR / f"apt-{_digest(sources)}"
        self.sources = sources

    def _options(self) -> list[str]:
        d = self.dir
        return [
            "-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={d / 'etc'}",
            "-o", f"Dir::State::Lists={d / 'lists'}", "-o", f"Dir::State::Status={d / 'status'}",
            "-o", f"Dir::Cache={d / 'cache'}", "-o", "Debug::NoLocking=1",
        ]

    def update(self) -> None:
        stamp = self.dir / "updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime < self.MAX_AGE:
            return
        for sub in ("etc", "lists/partial", "cache/archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "etc/debian.sources").write_text(self.sources)
        (self.dir / "status").touch()
        with step("apt-get update (the guest's release)"):
            _run(["apt-get", *self._options(), "update"])
        stamp.touch()

    def cache(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-cache", *self._options(), *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)


def check_kernels_available(sources: str) -> None:
    """Stop with the alternatives when the archive no longer has a kernel we name."""
    index = AptIndex(sources)
    index.update()
    for kernel in config.KERNELS.values():
        shown = index.cache("show", "--no-all-versions", kernel.package)
        if shown.returncode == 0 and shown.stdout.strip():
            continue
        found = index.cache("search", "--names-only", r"^linux-image-[0-9.]+.*-cloud-amd64$")
        alternatives = sorted(line.split()[0] for line in found.stdout.splitlines() if line)
        raise VMError(
            f"kernel {kernel.label} of Debian {config.RELEASE.version}: the archive has no "
            f"package {kernel.package}",
            hint=(
                f"choose another in vm-tests/vmtest/config.py; the archive has: "
                f"{', '.join(alternatives)}"
                if alternatives
                else "the archive knows no cloud kernel at all: check the host's apt sources"
            ),
        )


#: What goes into the Debian package: a change to any of them makes dist/'s stale.
PACKAGE_SOURCES = ("seamless", "debian", "dracut-module", "initramfs", "systemd", "udev",
                   "pyproject.toml", "dev/deb.sh")


def _newest_source() -> float:
    newest = 0.0
    for name in PACKAGE_SOURCES:
        top = PROJECT / name
        paths = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()
                                            and "__pycache__" not in p.parts]
        newest = max([newest, *(p.stat().st_mtime for p in paths)])
    return newest


def build_package() -> Path:
    """The project's Debian package, as ./dev/deb.sh builds it (dist/seamless_*_all.deb):
    the one in dist/ when it is newer than every file that goes into it, else built."""
    def built() -> list[Path]:
        return sorted((PROJECT / "dist").glob("seamless_*_all.deb"),
                      key=lambda p: p.stat().st_mtime)

    debs = built()
    if debs and debs[-1].stat().st_mtime > _newest_source():
        log.info("reusing %s", debs[-1].relative_to(PROJECT))
        return debs[-1]
    with step("building the Debian package (./dev/deb.sh)"):
        _run([str(PROJECT / "dev/deb.sh")])
    debs = built()
    if not debs:
        raise VMError("./dev/deb.sh left no dist/seamless_*_all.deb")
    return debs[-1]


def package_digest(deb: Path) -> str:
    """A digest of what the package holds (its control fields, and its files' names,
    modes and bytes: not their timestamps)."""
    parts: list[bytes | str] = [_run(["dpkg-deb", "--field", str(deb)]).stdout]
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                f = tar.extractfile(member) if member.isfile() else None
                parts += [member.name, str(member.mode), member.linkname,
                          f.read() if f else b""]
    if proc.returncode:
        raise VMError(f"dpkg-deb could not read {deb}")
    return _digest(*parts)


def _prune(kind: str, keep: Path) -> None:
    entries = sorted(
        (p for p in config.CACHE_DIR.glob(f"{kind}-*") if p != keep and p.is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    for old in entries[: max(0, len(entries) - (KEEP - 1))]:
        log.info("removing old cached %s %s", kind, old.name)
        _remove_tree(old)


def build_base(extra: tuple[str, ...]) -> Path:
    """mmdebstrap the Debian root, or reuse the cached one."""
    sources = host_apt_sources()
    pkgs = packages(extra)
    key = _digest(config.DISTRIBUTION, "\n".join(pkgs), sources, DRACUT_CONF)
    base = config.CACHE_DIR / f"base-{key}"
    if (base / "done").exists():
        log.info("reusing base root %s", base)
        os.utime(base)
        return base
    if os.geteuid() != 0:
        raise VMError("building the guest image needs root (mmdebstrap --mode=root)")
    check_kernels_available(sources)
    _remove_tree(base)
    base.mkdir(parents=True)
    with step(f"mmdebstrap {config.DISTRIBUTION} with {len(pkgs)} packages"):
        (base / "debian.sources").write_text(sources)
        hook = (
            'mkdir -p "$1/etc/dracut.conf.d" && '
            f'cp {base / "dracut.conf"} "$1/etc/dracut.conf.d/10-seamless-vm.conf"'
        )
        (base / "dracut.conf").write_text(DRACUT_CONF)
        _run([
            "mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
            "--include=" + ",".join(pkgs), f"--setup-hook={hook}",
            config.DISTRIBUTION, str(base / "root"), str(base / "debian.sources"),
        ])
    (base / "done").write_text(json.dumps({"packages": pkgs, "built": time.time()}))
    _prune("base", base)
    return base


def _configure(root: Path, deb: Path, stock: bool) -> None:
    """Turn the base root into the test-bed guest; ``stock``: a stock server's."""
    agent_dir = root / "usr/local/lib/seamless-vm"
    agent_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(GUEST / "agent.py", agent_dir / "agent.py")
    unit = "seamless-vm-agent.service"
    shutil.copy(GUEST / unit, root / "etc/systemd/system" / unit)
    wants = root / "etc/systemd/system/sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit).unlink(missing_ok=True)
    (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")

    (root / "etc/hostname").write_text("seamless-guest\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 seamless-guest\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/machine-id").write_text("")  # a new one each boot: "uninitialized"
    net = root / "etc/systemd/network/10-user.network"
    net.write_text(NETWORK_CONF)
    nwants = root / "etc/systemd/system/multi-user.target.wants"
    nwants.mkdir(parents=True, exist_ok=True)
    link = nwants / "systemd-networkd.service"
    link.unlink(missing_ok=True)
    link.symlink_to("/lib/systemd/system/systemd-networkd.service")
    # Root logs in on the serial console without a password: a throwaway test guest.
    _run(["chroot", str(root), "passwd", "-d", "root"])
    if stock:
        # As an operator would on a server with both: apache2 keeps port 80, nginx
        # moves to 8080. Every unit stays as its package enabled it.
        site = root / "etc/nginx/sites-available/default"
        site.write_text(site.read_text().replace("listen 80 default_server",
                                                 "listen 8080 default_server")
                        .replace("listen [::]:80 default_server",
                                 "listen [::]:8080 default_server"))
    else:
        # redis runs only when a test starts it (as a plain service: see test_services.py).
        (root / "etc/systemd/system/multi-user.target.wants/redis-server.service").unlink(
            missing_ok=True)
        # So does sshd (test_ssh.py): the other tests checkpoint only their own workloads.
        for wanted in ("multi-user.target.wants/ssh.service", "sockets.target.wants/ssh.socket",
                       "sshd.service"):
            (root / "etc/systemd/system" / wanted).unlink(missing_ok=True)
    # As on a server that has booted before: the first boot's catch-up units (ldconfig,
    # the hwdb and journal catalog updates: ConditionNeedsUpdate=) are done; the stamps
    # are newer than /usr, whose packages are all in.
    for stamp in ("etc/.updated", "var/.updated"):
        (root / stamp).write_text("# written by the test bed's image build\n")
    # The pmem drivers for the reserved region, loaded at boot.
    (root / "etc/modules-load.d/seamless-pmem.conf").write_text(
        "libnvdimm\nnd_btt\nnd_pmem\nnd_e820\n"
    )

    # As an operator installs it: apt, from the package (its dependencies are in the
    # base already, so apt needs no network); the hooks, units and udev rule are the
    # package's own, and its units are enabled as apt enables them.
    shutil.copy(deb, root / "tmp" / deb.name)
    with _chroot_mounts(root):
        _run(["chroot", str(root), "env", "DEBIAN_FRONTEND=noninteractive", "apt-get",
              "install", "-y", "-q", "--no-install-recommends",
              f"/tmp/{deb.name}"])
        (root / "tmp" / deb.name).unlink()
        # The agent and every command the host runs through it are the test bed, not
        # workloads: an operator would exclude their own management agent the same way.
        conf = root / "etc/seamless/seamless.toml"
        text = conf.read_text()
        if "\n[select]\n" not in text:
            raise VMError(f"the package's {conf.name} has no [select] table to set")
        conf.write_text(text.replace(
            "\n[select]\n", '\n[select]\nexclude = ["unit:seamless-vm-agent.service"]\n', 1))
        for kernel in config.KERNELS.values():
            _run(["chroot", str(root), "dracut", "--force", "--quiet", kernel.initrd,
                  kernel.release])
        # An initramfs from initramfs-tools too, with only the drivers the guest needs.
        itools = root / "etc/initramfs-tools"
        (itools / "conf.d/seamless-vm.conf").write_text("MODULES=list\nCOMPRESS=zstd\n")
        (itools / "modules").write_text(INITRAMFS_TOOLS_MODULES)
        for kernel in config.KERNELS.values():
            _run(["chroot", str(root), "mkinitramfs", "-o", kernel.initramfs_tools_initrd,
                  kernel.release])
            if config.itools_default(stock):
                # The distribution's default generator makes /boot's initramfs, as on a
                # server; dracut's is kept beside it for the tests of the dracut path.
                boot = root / "boot"
                name = Path(kernel.initrd).name
                (boot / name).rename(boot / Path(kernel.dracut_initrd).name)
                shutil.copy2(boot / Path(kernel.initramfs_tools_initrd).name, boot / name)


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev in the chroot while dracut runs there."""
    mounted: list[Path] = []
    try:
        for d in ("proc", "sys", "dev"):
            _run(["mount", "--bind", f"/{d}", str(root / d)])
            mounted.append(root / d)
        yield
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], check=False)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


def _remove_tree(path: Path) -> None:
    """rmtree, but never through a mount (a bind of the host's /dev, say)."""
    if not path.exists():
        return
    left = _mounts_under(path)
    if left:
        raise VMError(f"refusing to delete {path}: still mounted there: {', '.join(left)}",
                      hint="unmount them (umount -l) and delete it by hand")
    shutil.rmtree(path, ignore_errors=True)


def build(extra: tuple[str, ...] = (), *, stock: bool = False, force: bool = False) -> Image:
    """Build or reuse the image; returns it ready to boot. ``stock``: a stock server, with
    :data:`config.STOCK_PACKAGES` installed and enabled as apt does.

    Holds a lock on the cache, so concurrent test runs build each layer once.
    """
    config.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(config.CACHE_DIR / "lock", "w") as lock:
        if not try_lock(lock):
            log.info("waiting for another build of the guest image to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(extra + config.STOCK_PACKAGES if stock else extra, stock, force)


def try_lock(lock: IO[str]) -> bool:
    """Take ``lock`` (exclusive) if no one holds it; False if someone does."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _build(extra: tuple[str, ...], stock: bool, force: bool) -> Image:
    deb = build_package()
    base = build_base(extra)
    guest_files = [GUEST / "agent.py", GUEST / "seamless-vm-agent.service", Path(__file__)]
    key = _digest(
        base.name, package_digest(deb), IMAGE_SIZE, str(stock),
        *(p.read_bytes() for p in guest_files),
    )
    image = Image(config.CACHE_DIR / f"image-{key}")
    if (image.directory / "info.json").exists() and not force:
        log.info("reusing image %s", image.directory)
        os.utime(image.directory)
        return image
    if os.geteuid() != 0:
        raise VMError("building the guest image needs root (chroot, mkfs.ext4 -d)")
    shutil.rmtree(image.directory, ignore_errors=True)
    work = config.CACHE_DIR / f"work-{key}"
    _remove_tree(work)
    try:
        with step("configuring the guest root"):
            _run(["cp", "-a", "--reflink=auto", str(base / "root"), str(work)])
            _configure(work, deb, stock)
        image.directory.mkdir(parents=True)
        # A cold boot starts from /boot's initramfs, as kexec and seamless upgrade do
        # unless a test names the other one (see config.itools_default).
        for kernel in config.KERNELS.values():
            shutil.copy(work / kernel.vmlinuz.lstrip("/"), image.vmlinuz(kernel))
            shutil.copy(work / kernel.initrd.lstrip("/"), image.initrd(kernel))
        with step(f"making the ext4 root filesystem ({IMAGE_SIZE})"):
            tmp_fs = image.directory / "rootfs.ext4.tmp"
            _run([
                "mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(work), str(tmp_fs),
                IMAGE_SIZE,
            ])
            tmp_fs.rename(image.rootfs)
    except BaseException:
        shutil.rmtree(image.directory, ignore_errors=True)
        raise
    finally:
        _remove_tree(work)
    (image.directory / "info.json").write_text(json.dumps({
        "base": base.name,
        "package": deb.name,
        "kernels": {k.label: k.release for k in config.KERNELS.values()},
        "stock": stock,
        "built": time.time(),
    }, indent=2))
    _prune("image", image.directory)
    return image
