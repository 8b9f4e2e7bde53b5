"""The records that cross the kexec: what the old kernel writes, the new one reads,
including what an earlier seamless wrote (the new kernel may run a newer one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seamless.memstore import handoff
from seamless.memstore.handoff import TREE_INFO, TreeInfo
from seamless.restore.restorer import trees_in

#: seamless-tree.json with the keys seamless wrote until the record was typed (commit
#: 9a9528d: a dict with no version), for an nginx tree; the nested entries are kept as
#: they are, whatever their shape, so they are abbreviated here.
WRITTEN_BEFORE = {
    "streams": [{"inode": 4242, "peer": 4243, "type": 1, "buffered": ""}],
    "order": 2,
    "root": 812,
    "pids": [812, 813, 814],
    "unit": "nginx.service",
    "cgroup": "/system.slice/nginx.service",
    "command": "nginx: master process /usr/sbin/nginx -g daemon on; master_process on;",
    "user": "root",
    "external": ["unix[4242]", "file[1f:2a]"],
    "foreign_files": {"file[1f:2a]": {"path": "/dev/null", "flags": 2}},
    "mount_namespace": True,
    "socket_dirs": [{"path": "/run/app", "uid": 0, "gid": 0, "mode": 493}],
    "peer_paths": ["/run/systemd/journal/dev-log"],
    "fifos": [],
    "runtime_files": [{"path": "/run/nginx.pid", "data": "812\n", "mode": 420,
                       "uid": 0, "gid": 0}],
    "addresses": [{"address": "10.0.2.15", "prefix": 24, "ifname": "ens3"}],
    "connections": [{"src": "10.0.2.15", "sport": 80, "dst": "10.0.2.2", "dport": 51000}],
    "loopback": [],
}


def test_a_record_written_before_it_was_typed_reads_whole() -> None:
    info = TreeInfo.from_json(json.loads(json.dumps(WRITTEN_BEFORE)))
    assert (info.root, info.order, info.pids) == (812, 2, [812, 813, 814])
    assert info.unit == "nginx.service" and info.name == "nginx.service"
    assert info.mount_namespace is True and info.version == 1
    assert info.streams[0]["inode"] == 4242
    assert info.foreign_files["file[1f:2a]"]["path"] == "/dev/null"
    assert info.runtime_files[0]["path"] == "/run/nginx.pid"
    assert info.connections[0]["dport"] == 51000
    # nothing is lost on the way: it writes what it read, a version, and the fields
    # added since (empty)
    assert info.to_json() == {**WRITTEN_BEFORE, "version": 1, "nonblocking": [], "mounts": []}


def test_a_record_round_trips(tmp_path: Path) -> None:
    info = TreeInfo(root=77, order=1, pids=[77, 78], unit=None, command="/usr/bin/tmux",
                    external=["unix[9]"], loopback=[{"sport": 1, "dport": 2}])
    handoff.write_tree_info(tmp_path, info)
    assert json.loads((tmp_path / TREE_INFO).read_text())["root"] == 77
    back = handoff.read_tree_info(tmp_path)
    assert back == info and back.name == "/usr/bin/tmux"


def test_an_older_record_gets_the_defaults_and_unknown_keys_are_left_out() -> None:
    info = TreeInfo.from_json({"root": "301", "pids": ["301"], "unit": "app.service",
                               "command": "app", "from_the_future": {"x": 1}})
    assert info.root == 301 and info.order == 301 and info.pids == [301]
    assert info.streams == [] and info.peer_paths == [] and not info.mount_namespace
    assert "from_the_future" not in info.to_json()


@pytest.mark.parametrize("data", [{}, {"pids": [1]}, ["root"], {"root": "x"}])
def test_what_is_not_a_tree_record_is_refused(data: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        TreeInfo.from_json(data)  # type: ignore[arg-type]


def test_the_restore_orders_the_trees_and_leaves_out_what_does_not_read(
        tmp_path: Path) -> None:
    for root, order in ((30, 0), (10, 2), (20, 1)):
        (tmp_path / str(root)).mkdir()
        handoff.write_tree_info(tmp_path / str(root), TreeInfo(root=root, order=order))
    (tmp_path / "40").mkdir()
    (tmp_path / "40" / TREE_INFO).write_text('{"pids": [40]}')
    (tmp_path / "50").mkdir()
    (tmp_path / "50" / TREE_INFO).write_text("not json")
    assert [info.root for _, info in trees_in(tmp_path)] == [30, 20, 10]


def test_the_upgrade_record_round_trips_with_its_way_back(tmp_path: Path) -> None:
    record = handoff.UpgradeRecord(
        generation=4, token_sha256=handoff.digest("t"), source_boot_id="b1",
        machine_id="m", times={"frozen": 1.5}, stopped_units=["postgresql@15-main.service"],
        last_pid=9000, requires=["true"],
        way_back=handoff.WayBack("6.12.90", "/boot/vmlinuz-6.12.90",
                                 "/boot/initrd.img-6.12.90", "root=/dev/vda1 ro"))
    handoff.write(tmp_path, record)
    assert handoff.read(tmp_path) == record


def test_an_upgrade_record_of_an_earlier_seamless_reads(tmp_path: Path) -> None:
    """Written before the way back, the checks and the left-out units existed."""
    (tmp_path / handoff.RECORD).write_text(json.dumps({
        "generation": 2, "token_sha256": handoff.digest("t"), "source_boot_id": "b0",
        "lazy_pages": True, "times": {"kexec": 9.0}, "version": 1}))
    record = handoff.read(tmp_path)
    assert record is not None and record.generation == 2 and record.lazy_pages
    assert record.way_back is None and record.requires == [] and record.stopped_units == []
    assert handoff.refusal(record, 2, "t", "b0", "b1") is None


#: last-upgrade.json as the restore wrote it until the report was typed (9a9528d).
REPORT_BEFORE = {
    "generation": 3, "to": "6.12.118+deb13-cloud-amd64", "ok": True,
    "boot_id": "b2", "times": {"frozen": 10.0, "entering": 12.0, "restorer_started": 20.0,
                               "restored": 23.5, "finished": 24.0},
    "from": "6.12.90+deb13-cloud-amd64", "stage": "initramfs", "boot_id_before": "b1",
    "upgrade": {"state": "entering", "bytes": 4096}, "corrupt": [], "mounted": ["/tmp"],
    "trees": [{"root": 101, "unit": "app.service", "command": "app", "restored": True,
               "pid": 101, "error": None}],
    "adopted": ["app.service"], "wiped": True,
}


def test_a_report_written_before_it_was_typed_reads_and_writes_the_same() -> None:
    report = handoff.Report.from_json(json.loads(json.dumps(REPORT_BEFORE)))
    assert report.source == "6.12.90+deb13-cloud-amd64" and report.generation == 3
    assert report.ok and report.wiped and report.adopted == ["app.service"]
    assert report.restored_trees[0]["pid"] == 101
    assert report.to_json() == REPORT_BEFORE  # no key added, none lost, "from" kept


def test_a_report_writes_what_it_knows_only() -> None:
    report = handoff.Report(generation=None, to="B")
    assert report.to_json() == {"generation": None, "to": "B", "ok": False, "boot_id": "",
                                "times": {}}
    report.deferred, report.source = "1 tree not restorable before init", "A"
    assert report.to_json()["deferred"] == "1 tree not restorable before init"
    assert report.to_json()["from"] == "A" and "source" not in report.to_json()
    assert handoff.Report.from_json(report.to_json()) == report


@pytest.mark.parametrize("data", [[], "x", {"times": [1, 2]}])
def test_what_is_not_a_report_is_refused(data: object) -> None:
    with pytest.raises(ValueError):
        handoff.Report.from_json(data)  # type: ignore[arg-type]
