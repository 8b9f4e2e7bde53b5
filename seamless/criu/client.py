"""Drive CRIU over its RPC protocol: one ``criu swrk`` process per call.

The client makes a SOCK_SEQPACKET socket pair, starts ``criu swrk <fd>`` with
one end (the only descriptor it inherits, besides those of ``inherit_fd``),
sends one ``criu_req`` and reads ``criu_resp`` messages until the answer to
its request.  On the way CRIU sends a NOTIFY for each action script
(``network-lock``, ``post-dump``, ``pre-resume`` ...) and waits: the client
calls the handler registered for that script, then answers with
``notify_success`` so CRIU goes on (or stops, when the handler raised).

CRIU finds the images directory as ``/proc/<client>/fd/<N>`` (the client is
the socket's peer), so /proc must be mounted; its log goes into that
directory, named after the call (``dump.log``, ``restore.log`` ...), at level
4.  Every failure is a :class:`~seamless.criu.errors.CriuError` that
carries CRIU's errno, its first error message and the last error lines of
that log; the swrk process is always reaped.

The process that speaks for CRIU is started by a :class:`SpawnPeer`, so tests
can put a fake one in its place (and never run CRIU on the host).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from seamless.criu import wire
from seamless.criu.errors import (
    CriuDiedError,
    CriuError,
    CriuNotifyError,
    CriuProtocolError,
    CriuTimeoutError,
)
from seamless.criu.options import CriuOptions
from seamless.criu.wire import ReqType, Response, Version
from seamless.log import log
from seamless.run import spawn as spawn_process

#: The action scripts CRIU announces with a NOTIFY (criu/action-scripts.c): 3.17's, and
#: query-ext-files, which 4.0 and later send during a dump.
SCRIPTS = frozenset({
    "pre-dump", "post-dump", "pre-restore", "post-restore", "network-lock", "network-unlock",
    "setup-namespaces", "post-setup-namespaces", "pre-resume", "post-resume",
    "orphan-pts-master", "status-ready", "query-ext-files",
})

#: CRIU's answers are a few hundred bytes; anything near this is not CRIU.
MAX_MESSAGE = 1 << 20
#: How often a silent CRIU is checked for being still alive, in seconds.
POLL_INTERVAL = 0.2
#: How long CRIU may take to exit once it answered (or lost us) before it is killed.
EXIT_GRACE = 30.0


@dataclass(frozen=True)
class Notification:
    """One NOTIFY from CRIU: it reached ``script`` and waits for the answer."""

    script: str
    #: setup-namespaces and post-restore: the PID of the restored tree's root.
    pid: int | None
    #: Seconds since the call started.
    at: float
    #: orphan-pts-master: the pty's master side, open only while the handler runs
    #: (``os.dup`` it to keep it).
    fd: int | None = None


#: Called for a notification; raising tells CRIU to fail the call.
NotifyHandler = Callable[[Notification], None]


@dataclass(frozen=True)
class CriuResult:
    """What one successful call did and how long it took."""

    operation: str
    seconds: float
    notifications: tuple[Notification, ...] = ()
    images_dir: Path | None = None
    log: Path | None = None
    #: restore: the PID of the restored tree's root.
    pid: int | None = None
    version: Version | None = None
    features: dict[str, bool] = field(default_factory=dict)

    def notified(self, script: str) -> Notification | None:
        return next((n for n in self.notifications if n.script == script), None)


class Peer(Protocol):
    """The process speaking for CRIU (a :class:`subprocess.Popen` does)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class SpawnPeer(Protocol):
    """Start the peer with ``sock_fd`` (and ``pass_fds``, same numbers) inherited and
    stdout/stderr going to ``output``; the peer is told ``sock_fd`` as ``criu swrk`` is."""

    def __call__(self, sock_fd: int, pass_fds: tuple[int, ...], output: int) -> Peer: ...


def swrk(binary: str = "criu") -> SpawnPeer:
    """Start the real thing: ``criu swrk <fd>``."""

    def spawn(sock_fd: int, pass_fds: tuple[int, ...], output: int) -> Peer:
        # In a session of its own: a Ctrl-C or a hangup of the operator's terminal must
        # not kill CRIU while its code runs inside a process; the coordinator handles
        # them, and stops CRIU through the protocol (or by closing the socket).
        return spawn_process([binary, "swrk", str(sock_fd)], pass_fds=(sock_fd, *pass_fds),
                             stdout=output, stderr=output)

    return spawn


class Criu:
    """The CRIU engine: dump, pre-dump, check, restore and version, over RPC.

    ``timeout`` bounds each call (CRIU is killed when it runs out: a
    :class:`CriuTimeoutError`), not counting the time the notification handlers take
    (a tree held at post-dump until every other is dumped); ``None`` waits as long as
    CRIU keeps running.
    """

    def __init__(
        self, *, binary: str = "criu", spawn: SpawnPeer | None = None,
        timeout: float | None = None,
    ) -> None:
        self.binary = binary
        self.spawn = spawn or swrk(binary)
        self.timeout = timeout

    # -- the calls

    def check(self, work_dir: Path) -> CriuResult:
        """``criu check``: can this kernel be checkpointed?  The log goes to ``work_dir``."""
        return self.call(ReqType.CHECK, work_dir, CriuOptions())

    def version(self) -> Version:
        result = self.call(ReqType.VERSION)
        if result.version is None:
            raise CriuProtocolError("version", "the answer carries no version")
        return result.version

    def features(self, *names: str) -> dict[str, bool]:
        """``FEATURE_CHECK``: which of mem_track, lazy_pages, pidfd_store work here."""
        asked = names or ("mem_track", "lazy_pages", "pidfd_store")
        return self.call(ReqType.FEATURE_CHECK, features=asked).features

    def dump(
        self, images_dir: Path, options: CriuOptions,
        on_notify: Mapping[str, NotifyHandler] | None = None,
    ) -> CriuResult:
        """Dump the tree rooted at ``options.pid`` into ``images_dir``."""
        if options.pid is None:
            raise ValueError("a dump needs the PID of the tree's root (never ourselves)")
        return self.call(ReqType.DUMP, images_dir, options, on_notify)

    def pre_dump(
        self, images_dir: Path, options: CriuOptions,
        on_notify: Mapping[str, NotifyHandler] | None = None,
    ) -> CriuResult:
        """Copy the tree's memory while it keeps running (``parent_img`` chains them).

        CRIU waits for a next PRE_DUMP or DUMP on the same connection after
        answering; each call has its own CRIU, which stops when we hang up.
        """
        if options.pid is None:
            raise ValueError("a pre-dump needs the PID of the tree's root")
        return self.call(ReqType.PRE_DUMP, images_dir, options, on_notify)

    def restore(
        self, images_dir: Path, options: CriuOptions | None = None,
        on_notify: Mapping[str, NotifyHandler] | None = None,
    ) -> CriuResult:
        """Restore the tree in ``images_dir``; the result's ``pid`` is its root.

        CRIU's RPC always restores detached: the tree's root is a child of
        CRIU (which exits: init inherits it), or of this process with
        ``rst_sibling``.
        """
        return self.call(ReqType.RESTORE, images_dir, options or CriuOptions(), on_notify)

    # -- one round trip

    def call(
        self, kind: ReqType, images_dir: Path | None = None, options: CriuOptions | None = None,
        on_notify: Mapping[str, NotifyHandler] | None = None, *, features: tuple[str, ...] = (),
    ) -> CriuResult:
        handlers = dict(on_notify or {})
        unknown = set(handlers) - SCRIPTS
        if unknown:
            raise ValueError(f"CRIU sends no notification {', '.join(sorted(unknown))}")
        operation = kind.verb
        logfile: Path | None = None
        with contextlib.ExitStack() as stack:
            dir_fd = None
            if options is not None:
                if images_dir is None:
                    raise ValueError(f"criu {operation} needs an images directory")
                options = dataclasses.replace(
                    options, log_file=options.log_file or f"{operation}.log")
                assert options.log_file is not None
                if "/" in options.log_file:
                    raise ValueError(f"CRIU's log_file is a name, not a path: {options.log_file}")
                logfile = images_dir / options.log_file
                try:
                    dir_fd = os.open(images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as e:
                    raise CriuError(operation, f"cannot open {images_dir}: {e.strerror}") from e
                stack.callback(os.close, dir_fd)
            data = wire.request(
                kind, options=options, images_dir_fd=dir_fd, notify_scripts=options is not None,
                features=features,
            )
            output = stack.enter_context(tempfile.TemporaryFile(prefix="seamless-criu-"))
            call = _Call(operation, kind, logfile, output, self.timeout)
            inherited = tuple(i.fd for i in options.inherit_fd) if options else ()
            with call.peer(self.spawn, inherited) as sock:
                response, notes = call.exchange(sock, data, handlers)
                seconds = call.elapsed()  # to the answer, not to CRIU's exit
            return CriuResult(
                operation=operation, seconds=seconds, notifications=tuple(notes),
                images_dir=images_dir, log=logfile, pid=response.restored_pid,
                version=response.version, features=response.features or {},
            )
        raise AssertionError("unreachable")  # pragma: no cover (mypy: ExitStack may swallow)


class _Call:
    """The state of one call: its peer, its deadline and what to say when it fails."""

    def __init__(
        self, operation: str, kind: ReqType, logfile: Path | None, output: IO[bytes],
        timeout: float | None,
    ) -> None:
        self.operation = operation
        self.kind = kind
        self.logfile = logfile
        self.output = output
        self.start = time.monotonic()
        self.deadline = None if timeout is None else self.start + timeout
        self.timeout = timeout
        self.proc: Peer | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def error(self, cls: type[CriuError], reason: str, response: Response | None = None
              ) -> CriuError:
        self.output.seek(0)
        stderr = self.output.read()[-4000:].decode(errors="replace")
        return cls(
            self.operation, reason, log=self.logfile, stderr=stderr,
            cr_errno=response.cr_errno if response else None,
            cr_errmsg=response.cr_errmsg if response else None,
        )

    @contextlib.contextmanager
    def peer(self, spawn: SpawnPeer, pass_fds: tuple[int, ...]) -> Iterator[socket.socket]:
        """Start the peer on one end of a fresh socket pair; yield the other end.

        On the way out (answered, failed or interrupted) the socket is closed,
        which makes a CRIU still waiting on it stop, and the peer is reaped.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                self.proc = spawn(theirs.fileno(), pass_fds, self.output.fileno())
            except FileNotFoundError as e:
                raise CriuError(
                    self.operation, f"cannot run {e.filename or 'criu'}: not installed"
                ) from e
            except OSError as e:
                raise CriuError(self.operation, f"cannot start criu swrk: {e}") from e
            finally:
                theirs.close()  # only the peer holds it now: its death is our EOF
            yield ours
        finally:
            ours.close()
            self.reap()

    def reap(self) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=EXIT_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("criu %s (PID %d) did not exit; killing it", self.operation,
                        self.proc.pid)
            self.proc.kill()
            return self.proc.wait()

    def died(self) -> CriuError:
        assert self.proc is not None
        try:
            status = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return self.error(CriuDiedError, "CRIU closed the connection without answering")
        if status < 0:
            how = f"was killed by {signal.Signals(-status).name}"
        else:
            how = f"exited with status {status}"
        return self.error(CriuDiedError, f"CRIU {how} before it answered")

    # -- messages

    def send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise self.died() from e

    def receive(self, sock: socket.socket) -> tuple[bytes, list[int]]:
        """The next message and the descriptors that came with it."""
        assert self.proc is not None
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while True:
            wait = POLL_INTERVAL
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.monotonic())
                if wait <= 0:
                    self.proc.kill()
                    raise self.error(CriuTimeoutError, f"CRIU did not answer within "
                                     f"{self.timeout:g} s and was killed")
            if poller.poll(wait * 1000):
                break
            if self.proc.poll() is not None and not poller.poll(0):
                raise self.died()
        fds_size = socket.CMSG_SPACE(4 * array.array("i").itemsize)
        data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, fds_size)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise self.error(CriuProtocolError, "a message too large for the protocol")
        if not data and not fds:
            raise self.died()
        return data, fds

    def exchange(
        self, sock: socket.socket, request: bytes, handlers: Mapping[str, NotifyHandler]
    ) -> tuple[Response, list[Notification]]:
        """Send the request; answer NOTIFYs in order until the request's own answer."""
        notes: list[Notification] = []
        failed: tuple[Notification, BaseException] | None = None
        self.send(sock, request)
        while True:
            try:
                data, fds = self.receive(sock)
            except CriuError as e:
                if failed is None:
                    raise
                raise self.error(
                    CriuNotifyError, f"the {failed[0].script} handler failed ({failed[1]}), "
                    f"then: {e.reason}",
                ) from failed[1]
            try:
                response = wire.parse_response(data)
            except wire.WireError as e:
                for fd in fds:
                    os.close(fd)
                raise self.error(CriuProtocolError, str(e)) from e
            if response.type != ReqType.NOTIFY:
                for fd in fds:
                    os.close(fd)
                break
            note = Notification(
                script=response.script or "", pid=response.notify_pid,
                at=self.elapsed(), fd=fds[0] if fds else None,
            )
            notes.append(note)
            log.debug("criu %s: %s at %.3f s", self.operation, note.script, note.at)
            ok = True
            handler = handlers.get(note.script)
            handled = time.monotonic()
            try:
                if handler is not None and failed is None:
                    handler(note)
            except Exception as e:
                failed = (note, e)
                ok = False
            finally:
                for fd in fds:
                    os.close(fd)
                if self.deadline is not None:  # our own time (a tree held) is not CRIU's
                    self.deadline += time.monotonic() - handled
            self.send(sock, wire.notify_answer(ok))
        if failed is not None:
            note, cause = failed
            raise self.error(
                CriuNotifyError, f"the {note.script} handler failed ({cause}), so CRIU stopped",
                response,
            ) from cause
        if response.type == ReqType.EMPTY and not response.success:
            raise self.error(CriuError, "CRIU rejected the request", response)
        if response.type != self.kind:
            raise self.error(
                CriuProtocolError, f"answer of type {response.type.name} to {self.kind.name}",
                response,
            )
        if not response.success:
            raise self.error(CriuError, "CRIU reported failure", response)
        return response, notes
