"""The one place that runs subprocesses: :func:`run` to wait for one, :func:`spawn` for
one that runs beside seamless."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from seamless.errors import SeamlessError
from seamless.log import log


class CommandError(SeamlessError):
    """A command exited with a non-zero status, or could not be started."""

    def __init__(self, argv: Sequence[str | Path], returncode: int, stderr: str) -> None:
        last = stderr.strip().splitlines()[-1:] or ["(no output)"]
        super().__init__(f"{shlex.join(map(str, argv))} failed ({returncode}): {last[0]}")
        self.argv = [str(a) for a in argv]
        self.returncode = returncode
        self.stderr = stderr


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` with stdin closed (or fed ``input``), capturing stdout and stderr."""
    args = [str(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        result = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=None if env is None else dict(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(args, 127, f"{args[0]}: command not found") from e
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, result.stderr.decode(errors="replace"))
    return result


def spawn(
    argv: Sequence[str | Path],
    *,
    pass_fds: Iterable[int] = (),
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` beside seamless, in a session of its own: the operator's Ctrl-C or
    the terminal's hangup does not reach it (seamless stops it itself). Only
    ``pass_fds`` are inherited; stdin is closed unless given. Raises OSError as
    :class:`subprocess.Popen` does (FileNotFoundError: no such program)."""
    args = [str(a) for a in argv]
    log.debug("+ %s &", shlex.join(args))
    return subprocess.Popen(args, pass_fds=tuple(pass_fds), stdin=stdin, stdout=stdout,
                            stderr=stderr, cwd=cwd, close_fds=True, start_new_session=True)
