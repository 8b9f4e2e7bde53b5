"""Choose the process trees to checkpoint.

By default every user process is preserved.  Left out, each with its reason:
kernel threads, PID 1, this seamless command and its helpers, and the system
plumbing that systemd restarts in the new boot rather than preserving (listed in
:data:`PLUMBING`).  Operators refine the choice with rules, from flags or the
config file: ``unit:NAME``, ``cgroup:PREFIX``, ``user:NAME``, ``pid:N``,
``comm:NAME``.  A rule matches a tree by its root process.  With any include
rule, only matching trees are kept; exclude rules always win; an include rule
can bring back a plumbing process, never a kernel thread, PID 1 or seamless.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from seamless.collect.processes import (
    ProcessInfo,
    ProcessTree,
    ancestors,
    children_map,
    descendants,
)
from seamless.errors import SeamlessError

CONFIG_PATH = Path("/etc/seamless/seamless.toml")
RULE_KINDS = ("unit", "cgroup", "user", "pid", "comm")

#: System plumbing restarted in the new boot instead of preserved, with the reason.
#: Keyed by systemd unit; :data:`PLUMBING_COMMS` catches the same programs by name.
PLUMBING: dict[str, str] = {
    "systemd-journald.service": "the journal daemon: systemd restarts it and the journal "
    "continues on disk; its clients' stdout streams are handed over at restore",
    "systemd-udevd.service": "the device manager: it must discover the new kernel's devices",
    "systemd-logind.service": "tracks seats and sessions: restarted, sessions re-register",
    "dbus.service": "the system bus: restarted by systemd, clients reconnect",
    "dbus-broker.service": "the system bus: restarted by systemd, clients reconnect",
    "systemd-networkd.service": "configures the network for the new kernel",
    "NetworkManager.service": "configures the network for the new kernel",
    "systemd-resolved.service": "a stateless resolver: restarted",
    "systemd-timesyncd.service": "clock synchronisation: restarted",
    "polkit.service": "authorisation daemon: restarted on demand",
    "rsyslog.service": "the syslog daemon: restarted, messages continue in the new boot",
    "unattended-upgrades.service": "waits on the system bus for the shutdown, holding "
    "no state: started afresh",
    "getty@.service": "login prompts are started fresh on each boot",
    "serial-getty@.service": "login prompts are started fresh on each boot",
}
PLUMBING_COMMS: dict[str, str] = {
    "systemd-journal": "systemd-journald.service",
    "systemd-udevd": "systemd-udevd.service",
    "systemd-logind": "systemd-logind.service",
    "dbus-daemon": "dbus.service",
    "dbus-broker": "dbus-broker.service",
    "dbus-broker-lau": "dbus-broker.service",
    "systemd-network": "systemd-networkd.service",
    "NetworkManager": "NetworkManager.service",
    "systemd-resolve": "systemd-resolved.service",
    "systemd-timesyn": "systemd-timesyncd.service",
    "polkitd": "polkit.service",
    "rsyslogd": "rsyslog.service",
    "unattended-upgr": "unattended-upgrades.service",
    "agetty": "getty@.service",
}
USER_MANAGER_REASON = "the per-user service manager: systemd starts a new one at login"
HELPERS = ("criu",)
#: Rules that name one program: only these bring back plumbing (not a cgroup prefix).
NAMING_KINDS = ("unit", "pid", "comm")  # programs the coordinator runs; never checkpointed


@dataclass(frozen=True)
class Rule:
    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Rule:
        kind, sep, value = text.partition(":")
        if not sep or kind not in RULE_KINDS or not value:
            raise SeamlessError(
                f"not a selection rule: {text!r}",
                hint=f"write KIND:VALUE with KIND one of {', '.join(RULE_KINDS)} "
                "(for example unit:redis-server.service or pid:1234)",
            )
        if kind == "pid" and not value.isdigit():
            raise SeamlessError(f"not a PID in rule {text!r}")
        return cls(kind, value)

    def matches(self, p: ProcessInfo) -> bool:
        if self.kind == "unit":
            return p.unit == self.value
        if self.kind == "cgroup":
            prefix = self.value.rstrip("/")
            return p.cgroup == prefix or p.cgroup.startswith(prefix + "/")
        if self.kind == "user":
            return p.user == self.value
        if self.kind == "pid":
            return p.pid == int(self.value)
        return p.name == self.value

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class Selection:
    include: tuple[Rule, ...] = ()
    exclude: tuple[Rule, ...] = ()

    @classmethod
    def from_texts(cls, include: Iterable[str], exclude: Iterable[str]) -> Selection:
        return cls(tuple(map(Rule.parse, include)), tuple(map(Rule.parse, exclude)))

    def merged(self, other: Selection) -> Selection:
        return Selection(self.include + other.include, self.exclude + other.exclude)


def load_config(path: Path = CONFIG_PATH) -> Selection:
    """The ``[select]`` table of the config file (include/exclude lists of rules)."""
    if not path.exists():
        return Selection()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SeamlessError(f"cannot read {path}: {e}") from e
    table = data.get("select", {})
    include, exclude = table.get("include", []), table.get("exclude", [])
    if not isinstance(include, list) or not isinstance(exclude, list):
        raise SeamlessError(f"{path}: [select] include and exclude must be lists of rules")
    return Selection.from_texts(map(str, include), map(str, exclude))


@dataclass(frozen=True)
class Excluded:
    """A process (and its tree) left out of the checkpoint, and why."""

    pid: int
    command: str
    unit: str | None
    reason: str
    restarted: bool  # systemd brings it back in the new boot


@dataclass
class Choice:
    trees: list[ProcessTree] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)


def _plumbing_reason(p: ProcessInfo) -> str | None:
    unit = p.unit or ""
    template = unit.split("@")[0] + "@.service" if "@" in unit else unit
    if template in PLUMBING:
        return PLUMBING[template]
    if p.name in PLUMBING_COMMS:
        return PLUMBING[PLUMBING_COMMS[p.name]]
    if p.name in ("systemd", "(sd-pam)") and p.pid != 1 and "/user@" in p.cgroup:
        return USER_MANAGER_REASON
    return None


def choose(
    table: Sequence[ProcessInfo],
    selection: Selection | None = None,
    *,
    coordinator: int | None = None,
) -> Choice:
    """Split the process table into trees to checkpoint and excluded processes.

    ``coordinator`` is this seamless process (default: the calling process): it,
    its helpers and any tree that contains it are never checkpointed.
    """
    coordinator = os.getpid() if coordinator is None else coordinator
    selection = selection or Selection()
    by_pid = {p.pid: p for p in table}
    children = children_map(table)
    choice = Choice()
    # The trees containing the coordinator: its ancestors can't be dumped while it runs.
    holding_coordinator = set(ancestors(coordinator, by_pid)) if coordinator in by_pid else set()

    def exclude(p: ProcessInfo, reason: str, *, restarted: bool = False) -> None:
        choice.excluded.append(Excluded(p.pid, p.command, p.unit, reason, restarted))

    def visit(p: ProcessInfo) -> None:
        """Decide about ``p``, a process whose parent is not checkpointed."""
        if p.kthread or p.pid == 2:
            return  # kernel threads: not processes to preserve, and never listed
        if p.pid == 1:
            exclude(p, "PID 1 (the init system) is the new kernel's own")
            for child in children.get(p.pid, []):
                visit(child)
            return
        if p.pid == coordinator or p.name in HELPERS:
            exclude(p, "this seamless command or a helper of it")
            return
        if any(rule.matches(p) for rule in selection.exclude):
            rule = next(r for r in selection.exclude if r.matches(p))
            exclude(p, f"excluded by rule {rule}")
            return
        included = [r for r in selection.include if r.matches(p)]
        plumbing = _plumbing_reason(p)
        if plumbing and not any(r.kind in NAMING_KINDS for r in included):
            exclude(p, f"system plumbing, restarted rather than preserved: {plumbing}",
                    restarted=True)
            for child in children.get(p.pid, []):
                visit(child)  # e.g. the user manager's services are users' processes
            return
        if p.pid in holding_coordinator:
            # Descend: the trees beside the coordinator's branch can still be preserved.
            exclude(p, f"runs this seamless command (pid {coordinator}) in its tree")
            for child in children.get(p.pid, []):
                visit(child)
            return
        if selection.include and not included:
            exclude(p, "matches no include rule")
            return
        members = [p, *descendants(p.pid, children)]
        choice.trees.append(ProcessTree(root=p, members=members))

    for p in sorted(table, key=lambda p: p.pid):
        if p.ppid == 0 or p.ppid not in by_pid:
            visit(p)
    return choice
