# Copyright: seamless developers; GNU General Public License v2.0 only
"""What the seamless modules decide, apart from running commands: which kernel, whether
the host is ready, and what the upgrade did. Pure functions, tested on the host."""

from __future__ import annotations

import json
import re

#: Installed kernels: /boot/vmlinuz-RELEASE.
VMLINUZ = re.compile(r"^/boot/vmlinuz-(?P<release>.+)$")


def release_key(release):
    """Order kernel releases as a person would: 6.12.118 after 6.12.90, and a Debian
    "+deb13" or "-1" revision compared number by number."""
    parts = re.split(r"(\d+)", release)
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p]


def choose_kernel(requested, installed):
    """The kernel to move to: ``requested`` (a path or a release) when given, else the
    newest installed one. Returns (path, release, error)."""
    by_release = {}
    for path in installed:
        m = VMLINUZ.match(path)
        if m:
            by_release[m.group("release")] = path
    if requested:
        m = VMLINUZ.match(requested)
        release = m.group("release") if m else requested
        if release not in by_release:
            known = ", ".join(sorted(by_release, key=release_key)) or "none"
            return None, None, f"kernel {requested} is not installed (installed: {known})"
        return by_release[release], release, None
    if not by_release:
        return None, None, "no kernel is installed in /boot"
    newest = max(by_release, key=release_key)
    return by_release[newest], newest, None


def _json(text, what):
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise ValueError(f"{what} did not print JSON: {text.strip()[:200]}") from e


def preflight_problems(plan_rc, plan_out, check_rc, check_out, store_rc, store_out):
    """Why the host cannot be upgraded now (an empty list: it can), from the output of
    seamless plan --json, seamless kernel-check RELEASE --json and seamless store status
    --json."""
    problems = []
    plan = _json(plan_out, "seamless plan")
    if plan_rc not in (0, 4) or not plan:
        problems.append(f"seamless plan failed (exit {plan_rc})")
    else:
        problems += [f"plan: {p}" for p in plan.get("problems", [])]
        if plan_rc == 4 and not plan.get("problems"):
            problems.append("plan: something would block the checkpoint (seamless plan)")
    check = _json(check_out, "seamless kernel-check")
    if check_rc != 0 or not check.get("ok", False):
        problems += [f"kernel: {p}" for p in check.get("problems", [])] or [
            f"seamless kernel-check failed (exit {check_rc})"]
    if store_rc != 0:
        problems.append(f"the store is not ready (seamless store status exits {store_rc}: "
                        "is seamless-arm.service done, and the region reserved?)")
    return problems, plan


def upgrade_outcome(status_rc, status_out, boot_id_before, release_now, expected_release):
    """What the upgrade did, from seamless status --json in the new boot. Returns
    (ok, facts, message): facts for the summary, message saying what state the host is
    in and what the operator can do."""
    status = _json(status_out, "seamless status")
    trees = status.get("trees") or []
    lost = [t for t in trees if not t.get("restored")]
    phases = status.get("phases") or {}
    facts = {
        "release": release_now,
        "came_back": bool(boot_id_before) and status.get("this_boot") not in (
            None, boot_id_before),
        "generation": status.get("generation"),
        "trees_restored": len(trees) - len(lost),
        "trees_failed": [
            {"root": t.get("root"), "unit": t.get("unit"), "command": t.get("command"),
             "error": t.get("error")} for t in lost],
        "blackout_seconds": phases.get("total blackout (freeze to restored)"),
        "error": status.get("error"),
        "kept_until": status.get("kept_until"),
    }
    if status.get("unrestored_upgrade"):
        lost_up = status["unrestored_upgrade"]
        return False, facts, (
            "the upgrade to {} never came back: the host runs {} after a reset, its "
            "processes of that upgrade are lost; generation {} can be restored by hand "
            "(seamless restore --generation {})".format(
                lost_up.get("to"), release_now, lost_up.get("generation"),
                lost_up.get("generation")))
    refused = status.get("refused")
    if refused and status.get("boot_id_before") == boot_id_before:
        facts["refused"] = refused
        return False, facts, (
            "{} refused the upgrade: {}. No tree ran there; the host went back to {} and "
            "{} of {} trees run there again. Mend the cause, then upgrade again".format(
                refused.get("release"), refused.get("reason"), release_now,
                facts["trees_restored"], len(trees)))
    if release_now != expected_release:
        return False, facts, f"the host runs {release_now}, not {expected_release}"
    if status.get("boot_id_before") and status["boot_id_before"] != boot_id_before:
        return False, facts, ("seamless status reports another upgrade (from boot {}), "
                              "not this one".format(status["boot_id_before"]))
    if status_rc != 0 or not status.get("ok"):
        gen = status.get("generation")
        what = ", ".join("{} ({}): {}".format(t["root"], t["unit"] or t["command"], t["error"])
                         for t in facts["trees_failed"]) or status.get("error") or "?"
        return False, facts, (
            f"the host runs {release_now} but not every tree came back: {what}. The "
            f"generation is kept: seamless restore --generation {gen} on the host retries "
            "them")
    blackout = facts["blackout_seconds"]
    shown = f"{blackout:.1f}" if blackout is not None else "?"
    return True, facts, f"{release_now}: {facts['trees_restored']} trees back, blackout {shown} s"
