"""The one place that runs subprocesses."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
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
