"""The lock of a tree's TCP connections, made again in the new kernel.

CRIU's dump locks each established connection of a tree (nftables: a table
``inet CRIU-<root PID>`` whose rules drop the connection's segments both ways),
so that the peer's segments are dropped, not answered with a reset, until the
restore has the socket back; at the end of the restore CRIU deletes that table.
CRIU expects the restore in the same kernel, where the lock still stands. After a
kexec it does not: the moment the restore puts a connection's address up, any
segment the peer resends before CRIU has made the socket gets a reset, and the
connection is lost (an operator's ssh session, mostly while the restore is slow).
So the restore makes the same table again before any address comes up.

The table is made through libnftables, which CRIU itself is linked with (no
`nft` program needed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterable
from typing import Any

from seamless.errors import SeamlessError
from seamless.log import log

#: CRIU's mark on its own repair sockets' packets, let through (soccr.h SOCCR_MARK).
SOCCR_MARK = "0xC114"


def table(root: int) -> str:
    """CRIU's table for the tree whose root is ``root`` (netfilter.c nftables_get_table)."""
    return f"inet CRIU-{root}"


#: The table that holds the connections between two trees over loopback until every
#: tree is back (CRIU deletes each tree's own table as soon as that tree is restored).
LOOPBACK = "inet seamless-loopback"


def lock_script(root: int, connections: Iterable[dict[str, Any]],
                name: str | None = None) -> str:
    """The commands that make the table (``name``, default CRIU's for the tree ``root``),
    as CRIU's dump does: its chains and sets, then each connection in both directions."""
    t = name or table(root)
    lines = [f"add table {t}", f"delete table {t}", f"add table {t}"]
    for hook in ("output", "input"):
        lines += [f"add chain {t} {hook} {{ type filter hook {hook} priority 0; }}",
                  f"add rule {t} {hook} meta mark {SOCCR_MARK} accept"]
    for v, ip, addr in (("4", "ip", "ipv4_addr"), ("6", "ip6", "ipv6_addr")):
        lines.append(f"add set {t} conns{v} {{ type {addr} . inet_service . {addr} . "
                     "inet_service; }")
        for hook in ("output", "input"):
            lines.append(f"add rule {t} {hook} {ip} saddr . tcp sport . {ip} daddr . "
                         f"tcp dport @conns{v} drop")
    for c in connections:
        v = str(c["family"])
        for a, ap, b, bp in ((c["remote"], c["rport"], c["local"], c["lport"]),
                             (c["local"], c["lport"], c["remote"], c["rport"])):
            lines.append(f"add element {t} conns{v} {{ {a} . {int(ap)} . {b} . {int(bp)} }}")
    return "\n".join(lines) + "\n"


Runner = Callable[[str], None]


def lock(root: int, connections: list[dict[str, Any]], nft: Runner | None = None) -> bool:
    """Lock a tree's connections (nothing to do without any); True when locked. A lock
    that cannot be made is logged, not raised: the restore goes on as before."""
    if not connections:
        return False
    try:
        (nft or libnftables)(lock_script(root, connections))
    except SeamlessError as e:
        log.warning("the TCP connections of tree %d are not locked (a peer's segment may "
                    "reset them before the restore): %s", root, e)
        return False
    log.info("locked the %d TCP connections of tree %d again until its restore",
             len(connections), root)
    return True


def unlock(root: int, nft: Runner | None = None) -> None:
    """Delete the table if CRIU did not (its restore failed: the peers should learn at once
    that the connections are gone)."""
    try:
        (nft or libnftables)(f"add table {table(root)}\ndelete table {table(root)}\n")
    except SeamlessError as e:
        log.warning("the lock of tree %d's connections stays: %s", root, e)


def libnftables(script: str) -> None:
    """Run an nft script with libnftables (nft_run_cmd_from_buffer)."""
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise SeamlessError(f"libnftables is missing ({e})") from e
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise SeamlessError("libnftables: no context")
    try:
        lib.nft_ctx_buffer_error(ctx)
        if lib.nft_run_cmd_from_buffer(ctx, script.encode()) != 0:
            error = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            raise SeamlessError(f"nft: {error.strip() or 'failed'}")
    finally:
        lib.nft_ctx_free(ctx)


def lock_loopback(connections: list[dict[str, Any]], nft: Runner | None = None) -> bool:
    """Lock the connections over loopback of every tree until all are restored: the two
    ends of one are in two trees, and the end restored first must not see a reset from
    the kernel while the other is not back yet (a client's keep-alive connection to a
    service). True when locked; a lock that cannot be made is logged, not raised."""
    if not connections:
        return False
    unique = {tuple(sorted([(c["local"], c["lport"]), (c["remote"], c["rport"])])): c
              for c in connections}
    try:
        (nft or libnftables)(lock_script(0, unique.values(), LOOPBACK))
    except SeamlessError as e:
        log.warning("the connections over loopback are not locked: %s", e)
        return False
    log.info("locked %d connections over loopback until every tree is back", len(unique))
    return True


def unlock_loopback(nft: Runner | None = None) -> None:
    try:
        (nft or libnftables)(f"add table {LOOPBACK}\ndelete table {LOOPBACK}\n")
    except SeamlessError as e:
        log.warning("the lock of the connections over loopback stays: %s", e)
