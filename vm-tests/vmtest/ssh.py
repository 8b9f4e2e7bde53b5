"""An interactive ssh session from the host into the guest, through a forwarded port:
one TCP connection, kept open for as long as the test wants."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from vmtest.errors import VMError
from vmtest.qemu import Guest


def authorize_key(guest: Guest, directory: Path) -> Path:
    """A new key pair in ``directory`` whose public half root's authorized_keys holds in
    the guest; returns the private key."""
    if shutil.which("ssh") is None:
        raise VMError("the ssh client is missing: apt-get install openssh-client")
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    guest.run("install", "-d", "-m", "700", "/root/.ssh")
    guest.channel.run(["sh", "-c", "cat >> /root/.ssh/authorized_keys"],
                      input=key.with_suffix(".pub").read_bytes(), check=True)
    return key


class Session:
    """``ssh -tt`` to root@127.0.0.1:PORT running a shell; lines go in, output is
    collected as it comes."""

    def __init__(self, port: int, key: Path) -> None:
        self.proc = subprocess.Popen(
            ["ssh", "-tt", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=0", "root@127.0.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = b""
        self.ended: float | None = None  # time.monotonic() when ssh's output ended
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while data := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            with self._lock:
                self.output += data
        self.ended = time.monotonic()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, text: str, timeout: float = 60) -> str:
        """Wait until ``text`` has come (choose it so that the terminal's echo of the typed
        line does not hold it); returns all the output so far."""
        deadline = time.monotonic() + timeout
        needle = text.encode()
        while time.monotonic() < deadline:
            with self._lock:
                if needle in self.output:
                    return self.output.decode(errors="replace")
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        with self._lock:
            seen = self.output.decode(errors="replace")
        state = (f"ssh exited with {self.proc.returncode}" if self.proc.poll() is not None
                 else f"not within {timeout:.0f} s")
        raise VMError(f"ssh session: {text!r} did not come ({state}); output:\n{seen[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
