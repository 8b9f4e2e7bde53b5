"""``vm-tests/vm``: the test bed for people (the tests and the demo use the same code)."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

from vmtest import bench, config, demo, fleet, image, qemu
from vmtest.errors import VMError
from vmtest.log import log


def run_dir(name: str) -> Path:
    return config.CACHE_DIR / "run" / name


def _attached(args: argparse.Namespace) -> qemu.Guest:
    guest = qemu.attach(run_dir(args.name))
    if guest is None:
        raise VMError(f"no guest {args.name!r} is running", hint="start one with: vm-tests/vm boot")
    return guest


def cmd_build(args: argparse.Namespace) -> int:
    img = image.build(tuple(args.extra_packages), stock=args.stock, force=args.force)
    print(img.directory)
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    img = image.build(tuple(args.extra_packages), stock=args.stock)
    forwards = {}
    for item in args.forward:
        guest_port, _, host_port = item.partition(":")
        forwards[int(guest_port)] = int(host_port or guest_port)
    spec = qemu.GuestSpec(
        image=str(img.directory), kernel=args.kernel, memory=args.memory, region=args.region,
        append=args.append, forwards=forwards,
    )
    guest = qemu.boot(img, spec, run_dir(args.name), detach=True)
    assert guest.info is not None
    print(f"guest {args.name!r} running kernel {guest.info.release} (pid {spec.pid}); "
          f"console log: {guest.console_log}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        raise VMError("no command given", hint="vm-tests/vm run -- uname -r")
    guest = _attached(args)
    proc = guest.channel.start(argv, stdin=True)

    def feed() -> None:
        try:
            while data := os.read(sys.stdin.fileno(), 1 << 15):
                proc.write(data)
            proc.close_stdin()
        except (OSError, VMError):
            pass

    if not sys.stdin.closed:
        threading.Thread(target=feed, daemon=True).start()
    else:
        proc.close_stdin()
    for fd, data in proc.events(args.timeout):
        stream = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
        stream.write(data)
        stream.flush()
    assert proc.returncode is not None
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def cmd_copy(args: argparse.Namespace) -> int:
    local = Path(args.local)
    if not local.is_file():
        raise VMError(f"{local} is not a file")
    _attached(args).copy_in(local, args.guest_path)
    return 0


@contextlib.contextmanager
def _raw_terminal() -> Iterator[None]:
    if not sys.stdin.isatty():
        yield
        return
    saved = termios.tcgetattr(sys.stdin.fileno())
    tty.setraw(sys.stdin.fileno())
    try:
        yield
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def cmd_shell(args: argparse.Namespace) -> int:
    guest = _attached(args)
    size = shutil.get_terminal_size()
    proc = guest.channel.start(
        ["/bin/bash", "-l"], stdin=True, pty=True, size=(size.lines, size.columns),
        env={"TERM": os.environ.get("TERM", "xterm")},
    )
    signal.signal(signal.SIGWINCH, lambda *_: proc.resize(*reversed(shutil.get_terminal_size())))
    with _raw_terminal():

        def feed() -> None:
            while True:
                ready, _, _ = select.select([sys.stdin], [], [], 0.5)
                if ready:
                    data = os.read(sys.stdin.fileno(), 4096)
                    if not data:
                        proc.close_stdin()
                        return
                    proc.write(data)

        threading.Thread(target=feed, daemon=True).start()
        for _, data in proc.events():
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    return proc.returncode or 0


def cmd_stop(args: argparse.Namespace) -> int:
    guest = qemu.attach(run_dir(args.name))
    if guest is None:
        log.info("no guest %r is running", args.name)
        return 0
    guest.stop()
    log.info("stopped guest %r", args.name)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return demo.main(json_output=args.json)


def cmd_bench(args: argparse.Namespace) -> int:
    return bench.main(sizes=tuple(args.sizes), with_initramfs=args.initramfs,
                      generator=args.generator, lazy_pages=args.lazy_pages,
                      rounds=args.rounds, json_path=Path(args.json) if args.json else None,
                      way_back=args.way_back)


def cmd_fleet_bench(args: argparse.Namespace) -> int:
    return fleet.bench()


STOCK_HELP = ("a stock server: Debian's packaged services (postgresql, mariadb, redis, "
              "nginx, ...) installed and enabled as apt does")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vm-tests/vm", description=__doc__)
    p.add_argument("--name", default="default", help="which background guest (default: default)")
    p.add_argument("--debug", action="store_true", help="log every command")
    sub = p.add_subparsers(dest="cmd", required=True)

    def packages(text: str) -> list[str]:
        return [x for x in text.split(",") if x]

    b = sub.add_parser("build", help="build the guest image, or reuse the cached one")
    b.add_argument("--extra-packages", type=packages, default=[], metavar="PKG,...",
                   help="more Debian packages to install in the guest")
    b.add_argument("--stock", action="store_true", help=STOCK_HELP)
    b.add_argument("--force", action="store_true", help="rebuild the top layer even if cached")
    b.set_defaults(func=cmd_build)

    bt = sub.add_parser("boot", help="boot a guest and leave it running in the background")
    bt.add_argument("--kernel", choices=sorted(config.KERNELS), default="A")
    bt.add_argument("--memory", default=config.DEFAULT_MEMORY, metavar="SIZE")
    bt.add_argument("--region", default=config.DEFAULT_REGION, metavar="SIZE!OFFSET",
                    help=f"reserved RAM region, memmap= syntax (default {config.DEFAULT_REGION})")
    bt.add_argument("--append", default="", help="more kernel command line arguments")
    bt.add_argument("--forward", action="append", default=[], metavar="GUESTPORT[:HOSTPORT]",
                    help="forward 127.0.0.1:HOSTPORT to the guest's TCP port")
    bt.add_argument("--extra-packages", type=packages, default=[], metavar="PKG,...")
    bt.add_argument("--stock", action="store_true", help=STOCK_HELP)
    bt.set_defaults(func=cmd_boot)

    r = sub.add_parser("run", help="run a command in the guest (vm run -- CMD ...)")
    r.add_argument("--timeout", type=float, default=None)
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("copy", help="copy a local file into the guest")
    c.add_argument("local")
    c.add_argument("guest_path")
    c.set_defaults(func=cmd_copy)

    sub.add_parser("shell", help="an interactive shell in the guest").set_defaults(func=cmd_shell)
    sub.add_parser("stop", help="stop the background guest").set_defaults(func=cmd_stop)

    d = sub.add_parser("demo", help="services on kernel A, upgrade to B, state kept")
    d.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    d.set_defaults(func=cmd_demo)
    bn = sub.add_parser("bench", help="the blackout benchmark: seamless upgrade against "
                        "systemctl kexec and a reboot, for several sizes of state")
    bn.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",") if x],
                    default=list(bench.SIZES), metavar="MIB,...",
                    help="sizes of state in MiB (default %(default)s)")
    bn.add_argument("--no-initramfs", dest="initramfs", action="store_false",
                    help="skip the initramfs with/without the module (size, time in it)")
    bn.add_argument("--generator", choices=bench.GENERATORS, default="default",
                    help="the initramfs the upgrades and the kexec boot: the kernel's own "
                    "(default: the distribution's generator, initramfs-tools on Debian 13, "
                    "dracut on 12), dracut's (restore after switch-root, in "
                    "seamless-restore.service) or initramfs-tools' (restore before init)")
    bn.add_argument("--lazy-pages", action="store_true",
                    help="upgrade with a lazy restore, then with a pre-dump (instead of "
                    "the default upgrade and its way back)")
    bn.add_argument("--way-back", action="store_true",
                    help="upgrade with all or nothing and its way back (the default), then "
                    "with --no-way-back, both whole dumps: what the way back costs")
    bn.add_argument("--rounds", type=int, default=1, metavar="N",
                    help="measure every size N times (interleaved) and show the medians "
                    "and ranges (default 1)")
    bn.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    bn.set_defaults(func=cmd_bench)
    sub.add_parser("fleet-bench", help="two guests: a rollout with the Ansible collection "
                   "beside one with ansible.builtin.reboot (state lost), wall times"
                   ).set_defaults(func=cmd_fleet_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.debug:
        log.setLevel("DEBUG")
    try:
        code: int = args.func(args)
        return code
    except VMError as e:
        print(f"vm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130
