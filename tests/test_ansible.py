"""The Ansible collection (ansible/): its decisions as pure functions, its modules run by
ansible against a fake seamless, and the rolling playbook's flow on a fake inventory.

Nothing here upgrades anything: the hosts are this machine through the local connection,
where ansible.builtin.reboot refuses to run (it would reboot the control node), which
stands for a host whose upgrade is refused."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ANSIBLE = Path(__file__).resolve().parent.parent / "ansible"


def _module_utils() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "seamless_ansible", ANSIBLE / "plugins/module_utils/seamless.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


utils = _module_utils()

INSTALLED = ["/boot/vmlinuz-6.12.90+deb13-cloud-amd64",
             "/boot/vmlinuz-6.12.118+deb13-cloud-amd64",
             "/boot/vmlinuz-6.1.0-47-cloud-amd64", "/boot/config-6.12.90+deb13-cloud-amd64"]


def test_the_newest_installed_kernel_or_the_one_asked_for() -> None:
    assert utils.choose_kernel("", INSTALLED) == (
        "/boot/vmlinuz-6.12.118+deb13-cloud-amd64", "6.12.118+deb13-cloud-amd64", None)
    assert utils.choose_kernel("6.1.0-47-cloud-amd64", INSTALLED)[0] == \
        "/boot/vmlinuz-6.1.0-47-cloud-amd64"
    assert utils.choose_kernel("/boot/vmlinuz-6.12.90+deb13-cloud-amd64", INSTALLED)[1] == \
        "6.12.90+deb13-cloud-amd64"
    path, _, error = utils.choose_kernel("7.0", INSTALLED)
    assert path is None and "7.0 is not installed" in error and "6.12.118" in error
    assert utils.choose_kernel(None, [])[2] == "no kernel is installed in /boot"


def test_preflight_names_every_reason() -> None:
    ok_plan = json.dumps({"ok": True, "trees": [{"root": 1}], "problems": []})
    ok_check = json.dumps({"ok": True, "problems": []})
    assert utils.preflight_problems(0, ok_plan, 0, ok_check, 0, "{}")[0] == []
    problems, _ = utils.preflight_problems(
        4, json.dumps({"ok": False, "problems": ["the store has 10 MiB free, 300 needed"]}),
        4, json.dumps({"ok": False, "problems": ["no pmem modules in its initramfs"]}),
        1, "")
    assert problems[0] == "plan: the store has 10 MiB free, 300 needed"
    assert problems[1] == "kernel: no pmem modules in its initramfs"
    assert "store is not ready" in problems[2]
    with pytest.raises(ValueError, match="did not print JSON"):
        utils.preflight_problems(0, "Traceback", 0, ok_check, 0, "{}")


def _status(**kw: object) -> str:
    base = {"ok": True, "this_boot": "new", "boot_id_before": "old", "generation": 3,
            "trees": [{"root": 812, "restored": True, "unit": "redis-server.service",
                       "command": "redis-server", "error": None}],
            "phases": {"total blackout (freeze to restored)": 12.5}}
    base.update(kw)
    return json.dumps(base)


def test_the_outcome_says_what_state_the_host_is_in_and_what_to_do() -> None:
    ok, facts, msg = utils.upgrade_outcome(0, _status(), "old", "B", "B")
    assert ok and facts["blackout_seconds"] == 12.5 and facts["trees_restored"] == 1
    assert msg == "B: 1 trees back, blackout 12.5 s"

    lost = _status(ok=False, trees=[{"root": 812, "restored": False, "unit": None,
                                     "command": "redis-server", "error": "PID 812 busy"}])
    ok, facts, msg = utils.upgrade_outcome(4, lost, "old", "B", "B")
    assert not ok and facts["trees_failed"][0]["error"] == "PID 812 busy"
    assert "812 (redis-server): PID 812 busy" in msg
    assert "seamless restore --generation 3" in msg

    ok, _, msg = utils.upgrade_outcome(0, _status(), "old", "A", "B")
    assert not ok and msg == "the host runs A, not B"
    ok, _, msg = utils.upgrade_outcome(0, _status(boot_id_before="older"), "old", "B", "B")
    assert not ok and "another upgrade" in msg
    refused = _status(refused={"release": "B", "reason": "tree 7 (redis) could not be restored"},
                      ok=True)
    ok, facts, msg = utils.upgrade_outcome(4, refused, "old", "A", "B")
    assert not ok and facts["refused"]["release"] == "B"
    assert msg.startswith("B refused the upgrade: tree 7 (redis) could not be restored")
    assert "went back to A" in msg
    never = json.dumps({"unrestored_upgrade": {"to": "B", "generation": 4}, "this_boot": "x"})
    ok, _, msg = utils.upgrade_outcome(4, never, "old", "A", "B")
    assert not ok and "never came back" in msg and "--generation 4" in msg


# --- through ansible ---------------------------------------------------------------------

FAKE_SEAMLESS = """#!/bin/sh
# a fake seamless: prints what $FAKE_DIR/$1.json holds, exits with $FAKE_DIR/$1.rc
echo "$@" >> "$FAKE_DIR/calls"
cat "$FAKE_DIR/$1.json"
exit "$(cat "$FAKE_DIR/$1.rc" 2>/dev/null || echo 0)"
"""


@pytest.fixture
def collection(tmp_path: Path) -> Path:
    if shutil.which("ansible-playbook") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("ansible-core is not installed (./dev/bootstrap.sh installs it)")
        pytest.skip("ansible-core is not installed (apt-get install ansible-core)")
    dest = tmp_path / "collections"
    subprocess.run(["ansible-galaxy", "collection", "install", "--force", "-p", str(dest),
                    str(ANSIBLE)], check=True, capture_output=True)
    return dest


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    d = tmp_path / "fake"
    d.mkdir()
    (d / "seamless").write_text(FAKE_SEAMLESS)
    (d / "seamless").chmod(0o755)
    (d / "plan.json").write_text(json.dumps({"ok": True, "trees": [{"root": 1}, {"root": 2}],
                                             "memory": 3 << 20, "problems": []}))
    (d / "kernel-check.json").write_text(json.dumps({"ok": True, "problems": []}))
    (d / "store.json").write_text("{}")
    boot = d / "boot"
    boot.mkdir()
    # newer than whatever this machine runs: the newest installed is an upgrade
    for k in ("99.1.9-1-amd64", "99.1.12-1-amd64"):
        (boot / f"vmlinuz-{k}").write_text("")
    return d


def _playbook(collection: Path, fake: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(collection), "FAKE_DIR": str(fake),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_STDOUT_CALLBACK": "default"}
    return subprocess.run(
        ["ansible-playbook", "-i", "h1,h2,", "-c", "local", "seamless.kernel.rolling_upgrade",
         "-e", f"seamless_command={fake / 'seamless'}", "-e", "ansible_become=false",
         "-e", f"ansible_python_interpreter={shutil.which('python3')}", *extra],
        env=env, capture_output=True, text=True, timeout=300)


def test_a_dry_run_plans_every_host_and_changes_nothing(collection: Path, fake: Path) -> None:
    result = _playbook(collection, fake, "-e", "seamless_dry_run=true",
                       "-e", f"seamless_boot={fake / 'boot'}")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (fake / "calls").read_text().splitlines()
    assert not any(c.startswith("upgrade") for c in calls), calls
    assert calls.count("plan --json") == 2  # both hosts planned
    assert result.stdout.count('"result": "planned"') == 3  # h1; then h1 and h2
    assert '"to": "99.1.12-1-amd64"' in result.stdout
    assert '"trees": "2"' in result.stdout


def test_the_first_host_refused_stops_the_rollout(collection: Path, fake: Path) -> None:
    result = _playbook(collection, fake, "-e", f"seamless_boot={fake / 'boot'}")
    assert result.returncode != 0
    out = result.stdout
    # h1 was refused (here: reboot will not run on the control node); h2 was never touched
    assert '"result": "REFUSED"' in out and '"host": "h1"' in out
    assert '"host": "h2"' not in out and "[h2]" not in out, out
    assert "fatal: [h1]" in out


def test_a_host_that_cannot_be_upgraded_fails_its_preflight_with_every_reason(
        collection: Path, fake: Path) -> None:
    (fake / "plan.json").write_text(json.dumps({"ok": False, "problems": ["CRIU is missing"]}))
    (fake / "plan.rc").write_text("4")
    result = _playbook(collection, fake, "-e", f"seamless_boot={fake / 'boot'}")
    assert result.returncode != 0
    assert "cannot be upgraded to 99.1.12-1-amd64: plan: CRIU is missing" in result.stdout, \
        result.stdout
    assert "[h2]" not in result.stdout
