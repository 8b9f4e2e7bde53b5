"""The checkpoint plan: which trees, which not and why, what blocks, and does it fit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from seamless.collect.freeze import own_cgroup
from seamless.collect.processes import ProcessInfo, ProcessTree, ancestors
from seamless.collect.resources import Finding, inspect
from seamless.collect.select import Choice, Excluded, Selection, choose

#: Images are larger than the resident memory (page maps, metadata): plan with a margin.
IMAGE_OVERHEAD = 1.10
IMAGE_SLACK = 16 << 20


@dataclass
class StoreSpace:
    """What the store can take, as the planner sees it."""

    device: str | None
    free: int | None  # bytes; None when there is no usable store
    problem: str | None = None


@dataclass
class CheckpointPlan:
    choice: Choice
    findings: list[Finding]
    store: StoreSpace
    needed: int = 0
    problems: list[str] = field(default_factory=list)
    #: tree root PID -> the cgroup frozen for it before the dumps (all at once), or None
    #: when it shares its cgroup and CRIU freezes it as its dump starts
    cgroups: dict[int, str | None] = field(default_factory=dict)

    @property
    def trees(self) -> list[ProcessTree]:
        return self.choice.trees

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    @property
    def ok(self) -> bool:
        return not self.blocking and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "trees": [
                {
                    "root": t.root.pid,
                    "unit": t.root.unit,
                    "command": t.root.command,
                    "user": t.root.user,
                    "processes": len(t.members),
                    "pids": t.pids,
                    "memory": t.rss,
                    "frozen_through_cgroup": self.cgroups.get(t.root.pid),
                }
                for t in self.trees
            ],
            "excluded": [asdict(e) for e in self.choice.excluded],
            "findings": [asdict(f) for f in self.findings],
            "memory": sum(t.rss for t in self.trees),
            "needed": self.needed,
            "store": asdict(self.store),
            "problems": self.problems,
        }


#: Why a process is left out when the operator chose so (a rule), as select.choose says.
OPERATOR_CHOICES = ("excluded by rule", "matches no include rule")
#: ... and when it runs this command: its unit is never stopped.
RUNS_THIS = ("this seamless command", "runs this seamless command")


def left_out_services(plan: CheckpointPlan, table: Sequence[ProcessInfo] = (),
                      coordinator: int | None = None) -> list[str]:
    """The system services the operator left out of the checkpoint and that run now: the
    upgrade stops them cleanly before the kexec, in dependency order, as ``systemctl
    kexec`` would (a database left out gets its shutdown), and the new boot starts them
    again. Not plumbing (the boot restarts it), not a user's own units, never a unit a
    carried tree or this seamless command runs in (``table`` and ``coordinator``: the
    process table and this command's PID, whose units and its ancestors' are kept)."""
    by_pid = {p.pid: p for p in table}
    keep = {p.system_unit for t in plan.trees for p in t.members}
    coordinator = os.getpid() if coordinator is None else coordinator
    keep |= {by_pid[pid].system_unit for pid in (coordinator, *ancestors(coordinator, by_pid))
             if pid in by_pid}
    units: list[str] = []
    for e in plan.choice.excluded:
        p = by_pid.get(e.pid)
        unit = p.system_unit if p is not None else None
        if e.reason.startswith(RUNS_THIS):
            keep.add(unit)
        elif (e.reason.startswith(OPERATOR_CHOICES) and unit and unit.endswith(".service")
                and not unit.startswith("user@") and unit not in units):
            units.append(unit)
    return [u for u in units if u not in keep]


def make_plan(
    table: list[ProcessInfo],
    selection: Selection,
    store: StoreSpace,
    *,
    coordinator: int | None = None,
) -> CheckpointPlan:
    """Plan a checkpoint of the process table; freezes nothing."""
    choice = choose(table, selection, coordinator=coordinator)
    findings = inspect(choice.trees, table)
    memory = sum(t.rss for t in choice.trees)
    needed = int(memory * IMAGE_OVERHEAD) + IMAGE_SLACK
    plan = CheckpointPlan(choice, findings, store, needed=needed,
                          cgroups={t.root.pid: own_cgroup(t) for t in choice.trees})
    if not choice.trees:
        plan.problems.append("no process tree is selected for the checkpoint")
    if store.free is None:
        plan.problems.append(store.problem or "no store to checkpoint into")
    elif plan.needed > store.free:
        plan.problems.append(
            f"the checkpoint needs about {_mib(plan.needed)} but the store has "
            f"{_mib(store.free)} free: reserve a larger region (seamless setup --region) "
            "or exclude trees"
        )
    return plan


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _excluded_lines(excluded: Sequence[Excluded], shown: int = 8) -> list[str]:
    """A line per process left out; processes alike (the same command, left out for the
    same reason: udev's workers, say) as one line with their PIDs after it."""
    alike: dict[tuple[str, str], list[Excluded]] = {}
    for e in excluded:
        alike.setdefault((e.command[:40], e.reason), []).append(e)
    lines = []
    for (command, reason), group in alike.items():
        lines.append(f"  {group[0].pid:>7}  {command:<40}  {reason}")
        if len(group) > 1:
            pids = ", ".join(str(e.pid) for e in group[1:shown + 1])
            more = f" and {len(group) - 1 - shown} more" if len(group) - 1 > shown else ""
            lines.append(f"  {'':>7}  and {len(group) - 1} alike: {pids}{more}")
    return lines


def render(plan: CheckpointPlan) -> str:
    lines = [f"checkpoint {len(plan.trees)} process trees:"]
    lines.append(f"  {'ROOT':>7} {'PROCS':>5} {'MEMORY':>9}  {'UNIT':<28} COMMAND")
    for t in plan.trees:
        lines.append(
            f"  {t.root.pid:>7} {len(t.members):>5} {_mib(t.rss):>9}  "
            f"{(t.root.unit or '-')[:28]:<28} {t.root.command[:60]}"
        )
    shared = [t.root.pid for t in plan.trees if plan.cgroups.get(t.root.pid) is None]
    if plan.trees:
        lines.append(f"  {len(plan.trees) - len(shared)} frozen at once through their own cgroups"
                     + ("; frozen by CRIU as its dump starts (cgroup shared): "
                        + ", ".join(map(str, shared)) if shared else ""))
    lines.append(f"left out ({len(plan.choice.excluded)}):")
    lines += _excluded_lines(plan.choice.excluded)
    if plan.findings:
        lines.append("resources:")
        for f in plan.findings:
            mark = "BLOCKS" if f.blocking else "ok"
            lines.append(f"  [{mark}] pid {f.pid}: {f.resource}: {f.problem}")
            lines.append(f"           -> {f.hint}")
    store = plan.store
    free = _mib(store.free) if store.free is not None else "-"
    lines.append(
        f"memory: {_mib(sum(t.rss for t in plan.trees))} resident, about {_mib(plan.needed)} "
        f"of images; store {store.device or '-'}: {free} free"
    )
    for problem in plan.problems:
        lines.append(f"problem: {problem}")
    lines.append("ready to checkpoint" if plan.ok else "NOT ready: see the problems above")
    return "\n".join(lines)
