#!/usr/bin/python3
"""seamless test-bed agent: runs commands for the host over a virtio-serial port.

Runs inside the guest (Debian's python3, standard library only), started by
systemd.  The protocol is one JSON object per line in each direction:

host -> guest
  {"id": N, "op": "ping"}
  {"id": N, "op": "exec", "argv": [...], "stdin": bool, "pty": bool,
   "env": {...}, "cwd": str, "rows": int, "cols": int}
  {"id": N, "op": "stdin", "data": base64}      (to a process started with stdin)
  {"id": N, "op": "eof"}                        (close its stdin)
  {"id": N, "op": "signal", "signal": int}      (to its process group)
  {"id": N, "op": "resize", "rows": int, "cols": int}

guest -> host
  {"type": "hello", ...info}                    (once, when the agent starts)
  {"id": N, "type": "pong", ...info}            info: boot_id, release, uptime
  {"id": N, "type": "out", "fd": 1|2, "data": base64}
  {"id": N, "type": "exit", "code": int}        (negative: killed by that signal)
  {"id": N, "type": "error", "message": str}

The host survives the guest kexec-ing: the port's host side stays open, the
agent of the new kernel starts, and a ping answered with a new boot_id says so.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import queue
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any

PORT = "/dev/virtio-ports/org.seamless.agent"
CHUNK = 32768


def info() -> dict[str, Any]:
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return {"boot_id": boot_id, "release": os.uname().release, "uptime": uptime}


class Port:
    """The virtio-serial port: line-framed JSON, one writer at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        with self.lock:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]

    def messages(self) -> Any:
        buf = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:  # host side closed: wait for the next host
                time.sleep(0.2)
                continue
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # a partial line left over from before a kexec
                if isinstance(message, dict):
                    yield message


class Job:
    """One command started for the host."""

    def __init__(self, port: Port, ident: int, request: dict[str, Any]) -> None:
        self.port = port
        self.id = ident
        self.stdin: queue.Queue[bytes | None] = queue.Queue()
        self.master: int | None = None
        self.done = False
        env = dict(os.environ)
        env.update(request.get("env") or {})
        argv = request["argv"]
        cwd = request.get("cwd") or "/"
        if request.get("pty"):
            master, slave = pty.openpty()
            self.master = master
            self.resize(request.get("rows", 24), request.get("cols", 80))
            env.setdefault("TERM", "xterm")
            self.proc = subprocess.Popen(
                argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                start_new_session=True, preexec_fn=_take_tty,
            )
            os.close(slave)
            readers = [threading.Thread(target=self._read_pty, daemon=True)]
            threading.Thread(target=self._write_pty, args=(master,), daemon=True).start()
        else:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if request.get("stdin") else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
                start_new_session=True,
            )
            readers = [
                threading.Thread(target=self._read, args=(self.proc.stdout, 1), daemon=True),
                threading.Thread(target=self._read, args=(self.proc.stderr, 2), daemon=True),
            ]
            if self.proc.stdin is not None:
                threading.Thread(target=self._write_pipe, daemon=True).start()
        for r in readers:
            r.start()
        threading.Thread(target=self._wait, args=(readers,), daemon=True).start()

    def _out(self, fd: int, data: bytes) -> None:
        self.port.send(
            {"id": self.id, "type": "out", "fd": fd, "data": base64.b64encode(data).decode()}
        )

    def _read(self, stream: Any, fd: int) -> None:
        while True:
            data = os.read(stream.fileno(), CHUNK)
            if not data:
                return
            self._out(fd, data)

    def _read_pty(self) -> None:
        assert self.master is not None
        while True:
            try:
                data = os.read(self.master, CHUNK)
            except OSError:  # EIO: every holder of the slave side is gone
                return
            if not data:
                return
            self._out(1, data)

    def _write_pipe(self) -> None:
        # Through the Popen's own file object, which owns the descriptor: closing
        # the bare fd would let Popen close it again later, by then someone else's.
        stream = self.proc.stdin
        assert stream is not None
        try:
            while (data := self.stdin.get()) is not None:
                stream.write(data)
                stream.flush()
        except OSError:
            pass  # the process closed its input or exited
        try:
            stream.close()
        except OSError:
            pass

    def _write_pty(self, master: int) -> None:
        try:
            while (data := self.stdin.get()) is not None:
                view = memoryview(data)
                while view:
                    view = view[os.write(master, view):]
            if not self.done:
                os.write(master, b"\x04")  # ^D: end of input on a terminal
        except OSError:
            pass  # the terminal is gone

    def _wait(self, readers: list[threading.Thread]) -> None:
        code = self.proc.wait()
        # A daemon started by the command may hold its output open forever:
        # give the readers a moment, then report the exit regardless.
        for r in readers:
            r.join(timeout=1.0)
        jobs.pop(self.id, None)  # no more input is routed here
        self.done = True
        self.stdin.put(None)  # ends the writer thread
        if self.master is not None:
            os.close(self.master)
        self.port.send({"id": self.id, "type": "exit", "code": code})

    def resize(self, rows: int, cols: int) -> None:
        if self.master is not None:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass


def _take_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


jobs: dict[int, Job] = {}


def serve(port: Port) -> None:
    port.send({"type": "hello", **info()})
    debug = os.environ.get("SEAMLESS_VM_AGENT_DEBUG") == "1"
    for message in port.messages():
        if debug:
            print("agent: got", json.dumps(message)[:200], file=sys.stderr, flush=True)
        ident = message.get("id")
        op = message.get("op")
        try:
            if op == "ping":
                port.send({"id": ident, "type": "pong", **info()})
            elif op == "exec":
                if not isinstance(ident, int) or ident in jobs:
                    raise ValueError(f"bad or duplicate id {ident!r}")
                jobs[ident] = Job(port, ident, message)
            elif isinstance(ident, int) and ident in jobs:
                job = jobs[ident]
                if op == "stdin":
                    job.stdin.put(base64.b64decode(message["data"]))
                elif op == "eof":
                    job.stdin.put(None)
                elif op == "signal":
                    job.signal(int(message["signal"]))
                elif op == "resize":
                    job.resize(int(message["rows"]), int(message["cols"]))
        except Exception as e:  # report to the host, keep serving
            port.send({"id": ident, "type": "error", "message": f"{type(e).__name__}: {e}"})


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else PORT
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    serve(Port(os.open(path, os.O_RDWR | os.O_CLOEXEC)))


if __name__ == "__main__":
    main()
