"""Fault injection, for the tests that prove nothing is lost whatever fails where.

At each named point of an upgrade and of its restore, :func:`point` looks for
``SEAMLESS_FAULT=POINT:ACTION`` in the environment, or ``seamless.fault=POINT:ACTION`` on
the kernel command line (the restorer at boot has no environment of the operator's; an
empty ``SEAMLESS_FAULT=`` overrides it, for a retry by hand), and acts: ``fail`` raises
an error as a failing step would, ``term`` sends this process
SIGTERM (as systemd or an operator would), ``kill`` SIGKILL (as the OOM killer would:
nothing of seamless runs after it), ``hang`` sleeps until something else ends it.

The points, in order: ``preflight`` (checked, nothing touched), ``pre-dumped``,
``frozen`` (every tree frozen), ``dumped`` (every tree dumped, held), ``sealed``,
``entering`` (the record written, just before the kexec); in the new kernel
``restoring`` (before the first tree), ``restored-one`` (after the first tree),
``restored`` (after every tree), ``finishing`` (the lazy restore's finisher).

Nothing happens without the variable or the argument: a production machine has neither.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from seamless.errors import SeamlessError
from seamless.log import log

ENV = "SEAMLESS_FAULT"
ARG = "seamless.fault="
POINTS = ("preflight", "pre-dumped", "frozen", "dumped", "sealed", "entering",
          "restoring", "restored-one", "restored", "finishing")
ACTIONS = ("fail", "term", "kill", "hang")


class InjectedFault(SeamlessError):
    """The failure a test asked for."""


def _asked(cmdline: Path = Path("/proc/cmdline")) -> str | None:
    if ENV in os.environ:  # set, even empty: it wins over the command line
        return os.environ[ENV] or None
    try:
        for arg in cmdline.read_text().split():
            if arg.startswith(ARG):
                return arg.removeprefix(ARG)
    except OSError:
        pass
    return None


def point(name: str) -> None:
    """Fail here if a test asked for it (see the module's doc)."""
    asked = _asked()
    if asked is None:
        return
    where, _, action = asked.partition(":")
    if where != name:
        return
    log.warning("injected fault at %s: %s", name, action)
    if action == "fail":
        raise InjectedFault(f"injected fault at {name}")
    if action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs in the meantime
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        while True:
            time.sleep(3600)
