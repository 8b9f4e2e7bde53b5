"""The host side of the guest agent's channel (see guest/agent.py for the protocol).

QEMU exposes the guest's virtio-serial port as a unix socket on the host.  The
connection outlives a kexec inside the guest: the new kernel's agent opens the
port again, and :meth:`Channel.wait_ready` tells it apart by its boot id.
"""

from __future__ import annotations

import base64
import itertools
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmtest.errors import VMError

Message = dict[str, Any]
_CLOSED: Message = {"type": "closed"}


@dataclass(frozen=True)
class GuestInfo:
    boot_id: str
    release: str
    uptime: float


@dataclass(frozen=True)
class RunResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    def check(self) -> RunResult:
        if self.returncode != 0:
            raise VMError(
                f"guest command {' '.join(self.argv)} exited with {self.returncode}:\n"
                f"{self.stderr.decode(errors='replace')[-2000:]}"
            )
        return self


class ChannelClosed(VMError):
    pass


class GuestRebooted(VMError):
    """The guest entered a new boot (a kexec) while a command ran there: it is lost."""


class Channel:
    """Requests to the agent and its answers, over QEMU's unix socket."""

    def __init__(self, sock: socket.socket, *, alive: Callable[[], None] = lambda: None) -> None:
        """Talk over connected ``sock``; ``alive`` raises (LostVMError) when the guest is gone."""
        self.alive = alive
        self.sock = sock
        self._ids = itertools.count(int(time.time() * 1000) % 10**9)
        self._queues: dict[int, queue.Queue[Message]] = {}
        self._commands: set[int] = set()  # the queues of commands, not of pings
        self._boot: str | None = None  # the boot id the agent last gave
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # noise from before a kexec
                if isinstance(message, dict) and message.get("type") in ("hello", "pong"):
                    self._seen_boot(str(message.get("boot_id")))
                ident = message.get("id") if isinstance(message, dict) else None
                q = self._queues.get(ident) if isinstance(ident, int) else None
                if q is not None:
                    q.put(message)
        self.closed = True
        with self._lock:
            for q in self._queues.values():
                q.put(_CLOSED)

    def _seen_boot(self, boot_id: str) -> None:
        """An agent of ``boot_id`` spoke: when it is a new boot, every command that ran in
        the one before is lost (the agent there died with its kernel)."""
        if self._boot is not None and boot_id != self._boot:
            with self._lock:
                for ident in self._commands:
                    self._queues[ident].put({"type": "rebooted", "boot_id": boot_id})
        self._boot = boot_id

    def send(self, message: Message) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError as e:
                self.alive()
                raise ChannelClosed(f"lost the connection to the guest agent: {e}") from e

    def _open(self) -> tuple[int, queue.Queue[Message]]:
        ident = next(self._ids)
        q: queue.Queue[Message] = queue.Queue()
        with self._lock:
            self._queues[ident] = q
        return ident, q

    def _forget(self, ident: int) -> None:
        with self._lock:
            self._queues.pop(ident, None)
            self._commands.discard(ident)

    def _get(self, q: queue.Queue[Message], deadline: float | None) -> Message | None:
        """The next message, or None at the deadline; checks the guest is alive meanwhile."""
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                message = q.get(timeout=wait)
            except queue.Empty:
                self.alive()
                continue
            if message is _CLOSED:
                self.alive()
                raise ChannelClosed("the guest agent's socket was closed")
            return message

    def ping(self, timeout: float = 2.0) -> GuestInfo | None:
        ident, q = self._open()
        try:
            self.send({"id": ident, "op": "ping"})
            message = self._get(q, time.monotonic() + timeout)
        finally:
            self._forget(ident)
        if message is None or message.get("type") != "pong":
            return None
        return GuestInfo(message["boot_id"], message["release"], float(message["uptime"]))

    def wait_ready(self, timeout: float, *, not_boot: str | None = None) -> GuestInfo:
        """Ping until an agent answers, from a boot other than ``not_boot`` if given."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            info = self.ping(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if info is not None and info.boot_id != not_boot:
                return info
            if info is not None:
                time.sleep(0.2)  # the old kernel's agent is still up
        self.alive()
        raise TimeoutError(f"the guest agent did not answer within {timeout:.0f} s")

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: bool = False,
        pty: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        size: tuple[int, int] = (24, 80),
    ) -> Process:
        ident, q = self._open()
        with self._lock:
            self._commands.add(ident)
        self.send({
            "id": ident, "op": "exec", "argv": list(argv), "stdin": stdin, "pty": pty,
            "env": dict(env or {}), "cwd": cwd, "rows": size[0], "cols": size[1],
        })
        return Process(self, ident, q, tuple(argv))

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float | None = 600,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> RunResult:
        """Run a command to its end; returns its exit code and output."""
        proc = self.start(argv, stdin=input is not None, env=env)
        if input is not None:
            proc.write(input)
            proc.close_stdin()
        result = proc.wait(timeout=timeout)
        return result.check() if check else result

    def sh(self, script: str, **kwargs: Any) -> RunResult:
        """Run a shell script in the guest (``set -e``)."""
        return self.run(["/bin/sh", "-ec", script], **kwargs)


class Process:
    """A command running in the guest."""

    def __init__(
        self, channel: Channel, ident: int, q: queue.Queue[Message], argv: tuple[str, ...]
    ) -> None:
        self.channel = channel
        self.id = ident
        self.q = q
        self.argv = argv
        self.returncode: int | None = None

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), 1 << 15):
            chunk = base64.b64encode(data[i : i + (1 << 15)]).decode()
            self.channel.send({"id": self.id, "op": "stdin", "data": chunk})

    def close_stdin(self) -> None:
        self.channel.send({"id": self.id, "op": "eof"})

    def signal(self, signum: int) -> None:
        self.channel.send({"id": self.id, "op": "signal", "signal": signum})

    def resize(self, rows: int, cols: int) -> None:
        self.channel.send({"id": self.id, "op": "resize", "rows": rows, "cols": cols})

    def events(self, timeout: float | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield (fd, data) as output arrives; ends when the command exits."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            message = self.channel._get(self.q, deadline)
            if message is None:
                raise TimeoutError(f"guest command {' '.join(self.argv)} still running "
                                   f"after {timeout:.0f} s")
            kind = message.get("type")
            if kind == "out":
                yield int(message["fd"]), base64.b64decode(message["data"])
            elif kind == "exit":
                self.returncode = int(message["code"])
            elif kind == "rebooted":
                self.channel._forget(self.id)
                raise GuestRebooted(f"guest command {' '.join(self.argv)} was lost: the "
                                    f"guest entered another boot ({message['boot_id']}) "
                                    "while it ran")
            elif kind == "error":
                self.returncode = 127
                yield 2, f"agent: {message.get('message')}\n".encode()
        self.channel._forget(self.id)

    def wait(self, timeout: float | None = None) -> RunResult:
        out: list[bytes] = []
        err: list[bytes] = []
        for fd, data in self.events(timeout):
            (out if fd == 1 else err).append(data)
        assert self.returncode is not None
        return RunResult(self.argv, self.returncode, b"".join(out), b"".join(err))
