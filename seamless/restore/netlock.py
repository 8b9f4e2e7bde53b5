"""The lock of a tree's TCP connections, made again in the new kernel.

CRIU's dump locks each established connection of a tree (nftables: a table
``inet CRIU-<root PID>`` in CRIU 3.17, ``inet CRIU-<the dump's run id>`` in 4.1, whose
rules drop the connection's segments both ways),
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
import functools
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from seamless.errors import SeamlessError
from seamless.log import log

#: CRIU's mark on its own repair sockets' packets, let through (soccr.h SOCCR_MARK).
SOCCR_MARK = "0xC114"


def table(root: int, images_dir: Path | None = None) -> str:
    """CRIU's table for the tree whose root is ``root``, dumped into ``images_dir``
    (netfilter.c nftables_get_table): named after the dump's run id where CRIU (4.1 and
    later) wrote one into the inventory, the whole "inet CRIU-..." in a buffer of 32
    bytes; else after the root."""
    run_id = criu_run_id(images_dir) if images_dir is not None else None
    return f"inet CRIU-{run_id}"[:31] if run_id else f"inet CRIU-{root}"


#: The magics an image may begin with before its own (CRIU's images/magic.h).
IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC = 0x54564319, 0x55105940
#: inventory_entry's dump_criu_run_id (CRIU's images/inventory.proto).
RUN_ID_FIELD = 13


@functools.cache
def _inventory_class() -> Any:
    """A message class for the one field of CRIU's inventory read here (protobuf keeps
    the others as unknown fields)."""
    proto = descriptor_pb2.FileDescriptorProto(name="seamless_criu_inventory.proto",
                                               package="seamless.criuimg", syntax="proto2")
    message = proto.message_type.add(name="inventory_entry")
    message.field.add(name="dump_criu_run_id", number=RUN_ID_FIELD,
                      type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    descriptor = pool.FindMessageTypeByName("seamless.criuimg.inventory_entry")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf 4.22+; Debian's is 4.21
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)  # type: ignore[attr-defined]


def criu_run_id(images_dir: Path) -> str | None:
    """The run id of the dump in ``images_dir`` (inventory.img), or None (CRIU 3.17, or
    no inventory to read)."""
    try:
        data = (images_dir / "inventory.img").read_bytes()
        pos = 4
        if struct.unpack_from("<I", data)[0] in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
            pos = 8
        (size,) = struct.unpack_from("<I", data, pos)
        entry = _inventory_class().FromString(data[pos + 4:pos + 4 + size])
    except (OSError, struct.error, DecodeError) as e:
        log.debug("no run id in %s: %s", images_dir, e)
        return None
    return str(entry.dump_criu_run_id) or None


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


def lock(root: int, connections: list[dict[str, Any]], nft: Runner | None = None,
         name: str | None = None) -> bool:
    """Lock a tree's connections (nothing to do without any) in the table ``name``
    (default: :func:`table` of ``root``); True when locked. A lock that cannot be made is
    logged, not raised: the restore goes on as before."""
    if not connections:
        return False
    try:
        (nft or libnftables)(lock_script(root, connections, name))
    except SeamlessError as e:
        log.warning("the TCP connections of tree %d are not locked (a peer's segment may "
                    "reset them before the restore): %s", root, e)
        return False
    log.info("locked the %d TCP connections of tree %d again until its restore",
             len(connections), root)
    return True


def unlock(root: int, nft: Runner | None = None, name: str | None = None) -> None:
    """Delete the table if CRIU did not (its restore failed: the peers should learn at once
    that the connections are gone)."""
    t = name or table(root)
    try:
        (nft or libnftables)(f"add table {t}\ndelete table {t}\n")
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
