"""CRIU as the engine: its RPC protocol, spoken by one client (see client.py)."""

from seamless.criu.client import (
    Criu,
    CriuResult,
    Notification,
    NotifyHandler,
    Peer,
    SpawnPeer,
    swrk,
)
from seamless.criu.errors import (
    CriuDiedError,
    CriuError,
    CriuNotifyError,
    CriuProtocolError,
    CriuTimeoutError,
)
from seamless.criu.options import (
    CgroupMode,
    CgroupRoot,
    CriuOptions,
    InheritFd,
    NetworkLock,
    PreDumpMode,
)
from seamless.criu.wire import ReqType, Version

__all__ = [
    "CgroupMode", "CgroupRoot", "Criu", "CriuDiedError", "CriuError", "CriuNotifyError",
    "CriuOptions", "CriuProtocolError", "CriuResult", "CriuTimeoutError", "InheritFd",
    "NetworkLock", "Notification", "NotifyHandler", "Peer", "PreDumpMode", "ReqType",
    "SpawnPeer", "Version", "swrk",
]
