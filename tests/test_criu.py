"""The CRIU client against a fake peer (CRIU never runs on the host).

The fake is this file run as a script: it gets its end of the socket pair the
way ``criu swrk <fd>`` does, finds the images directory through
/proc/<client>/fd/<N> as CRIU does, writes a log there, and plays a scenario
(a list of steps) given as JSON.  What it receives is recorded for the test.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from seamless.criu import (
    Criu,
    CriuDiedError,
    CriuError,
    CriuNotifyError,
    CriuOptions,
    CriuProtocolError,
    CriuTimeoutError,
    InheritFd,
    Notification,
    Peer,
    SpawnPeer,
    wire,
)
from seamless.criu.wire import ReqType

ROOT = Path(__file__).resolve().parent.parent

Step = dict[str, Any]


# -- the fake peer (runs in its own process) ----------------------------------


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def _fake_main(scenario: Path, fd: int) -> None:
    sock = socket.socket(fileno=fd)
    record = scenario.with_name("record.jsonl")
    steps: list[Step] = json.loads(scenario.read_text())
    images: str | None = None
    log_name = "criu.log"

    def note(**item: object) -> None:
        with record.open("a") as f:
            f.write(json.dumps(item) + "\n")

    for step in steps:
        if "expect" in step:
            data = sock.recv(1 << 16)
            if not data:
                note(eof=True)
                return
            req = wire.parse_request(data)
            assert req["type"] == step["expect"], req
            opts = req.get("opts")
            if opts is not None:
                # As CRIU does: the images directory through the client's /proc.
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                peer_pid = struct.unpack("3i", creds)[0]
                images = os.readlink(f"/proc/{peer_pid}/fd/{opts['images_dir_fd']}")
                log_name = opts.get("log_file", log_name)
            inherited = {
                str(i["fd"]): os.path.exists(f"/proc/self/fd/{i['fd']}")
                for i in (opts or {}).get("inherit_fd", [])
            }
            others = [n for n in range(3, 1024) if n != fd and _is_open(n)]
            note(request=req, images=images, inherited=inherited, others=others)
        elif "log" in step:
            assert images is not None
            with open(os.path.join(images, log_name), "a") as f:
                f.write("".join(line + "\n" for line in step["log"]))
        elif "notify" in step:
            notify: dict[str, Any] = {"script": step["notify"]}
            if "pid" in step:
                notify["pid"] = step["pid"]
            message = wire.response(ReqType.NOTIFY, True, notify=notify)
            if "send_fd_with" in step:
                r, w = os.pipe()
                os.write(w, step["send_fd_with"].encode())
                os.close(w)
                socket.send_fds(sock, [message], [r])
                os.close(r)
            else:
                sock.send(message)
            answer = sock.recv(1 << 16)
            note(answer=wire.parse_request(answer) if answer else None)
        elif "respond" in step:
            fields = dict(step["respond"])
            kind = ReqType[fields.pop("type")]
            sock.send(wire.response(kind, fields.pop("success"), **fields))
        elif "raw" in step:
            sock.send(bytes.fromhex(step["raw"]))
        elif "die" in step:
            os.kill(os.getpid(), step["die"])
        elif "exit" in step:
            os._exit(step["exit"])
        elif "sleep" in step:
            time.sleep(step["sleep"])
        elif "await_eof" in step:
            note(eof=sock.recv(1 << 16) == b"")


if __name__ == "__main__":
    _fake_main(Path(sys.argv[1]), int(sys.argv[2]))
    sys.exit(0)


# -- helpers ------------------------------------------------------------------


class Fake:
    """A scenario for the fake peer, and what it recorded."""

    def __init__(self, tmp_path: Path, steps: list[Step]) -> None:
        self.scenario = tmp_path / "scenario.json"
        self.scenario.write_text(json.dumps(steps))
        self.record = tmp_path / "record.jsonl"
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, sock_fd: int, pass_fds: tuple[int, ...], output: int) -> Peer:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, __file__, str(self.scenario), str(sock_fd)],
            pass_fds=(sock_fd, *pass_fds), stdin=subprocess.DEVNULL, stdout=output,
            stderr=output, env=env,
        )
        self.procs.append(proc)
        return proc

    def client(self, timeout: float | None = 30) -> Criu:
        spawn: SpawnPeer = self.spawn
        return Criu(spawn=spawn, timeout=timeout)

    def items(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def reaped(self) -> bool:
        return all(p.returncode is not None for p in self.procs)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


# -- the protocol ---------------------------------------------------------------


def test_dump_sends_options_and_answers_notifications_in_order(
    tmp_path: Path, images: Path
) -> None:
    fake = Fake(tmp_path, [
        {"expect": "DUMP"},
        {"log": ["(00.000100) Dumping tree 4242"]},
        {"notify": "network-lock"},
        {"notify": "post-dump"},
        {"notify": "network-unlock"},
        {"respond": {"type": "DUMP", "success": True, "dump": {"restored": False}}},
    ])
    seen: list[str] = []

    def on_post_dump(n: Notification) -> None:
        seen.append(n.script)

    options = CriuOptions(
        pid=4242, leave_running=True, tcp_established=True, shell_job=True, ghost_limit=64 << 20,
        external=("unix[1234]",), file_locks=True,
    )
    result = fake.client().dump(images, options, on_notify={"post-dump": on_post_dump})

    request, *answers = fake.items()
    assert request["images"] == str(images)
    assert request["others"] == []  # the images directory is read through our /proc
    opts = request["request"]["opts"]
    assert opts["pid"] == 4242
    assert opts["leave_running"] is True and opts["tcp_established"] is True
    assert opts["shell_job"] is True and opts["file_locks"] is True
    assert opts["ghost_limit"] == 64 << 20
    assert opts["external"] == ["unix[1234]"]
    assert opts["log_level"] == 4 and opts["log_file"] == "dump.log"
    assert opts["notify_scripts"] is True
    assert "ext_unix_sk" not in opts  # unset options stay unset: CRIU's defaults apply
    assert [a["answer"] for a in answers] == [{"type": "NOTIFY", "notify_success": True}] * 3
    assert [n.script for n in result.notifications] == [
        "network-lock", "post-dump", "network-unlock"]
    assert seen == ["post-dump"]
    assert result.log == images / "dump.log" and result.log.exists()
    assert result.notified("post-dump") is not None
    assert fake.reaped()


def test_failure_shows_errno_errmsg_and_the_logs_last_errors(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [
        {"expect": "DUMP"},
        {"log": [
            "(00.001) Seizing 4242",
            "(00.002) Error (criu/sk-unix.c:1234): sk unix: Can't dump half of stream unix "
            "connection.",
            "(00.003) Unlock network",
            "(00.004) Error (criu/cr-dump.c:2093): Dumping FAILED.",
        ]},
        {"respond": {"type": "DUMP", "success": False, "cr_errno": 3,
                     "cr_errmsg": "Can't dump half of stream unix connection."}},
    ])
    with pytest.raises(CriuError) as caught:
        fake.client().dump(images, CriuOptions(pid=4242))
    err = caught.value
    text = err.format_message()
    assert text.startswith("criu dump failed: CRIU reported failure; errno 3 ESRCH")
    assert "Can't dump half of stream unix connection." in text.splitlines()[0]
    assert "Dumping FAILED." in text and "Seizing" not in text  # error lines only
    assert str(images / "dump.log") in text
    assert err.cr_errno == 3 and err.log == images / "dump.log"
    assert type(err) is CriuError and fake.reaped()


def test_peer_killed_mid_call_is_an_error_that_says_so(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [
        {"expect": "DUMP"},
        {"log": ["(00.001) Error (criu/cr-dump.c:1): something before the end"]},
        {"notify": "network-lock"},
        {"die": signal.SIGKILL},
    ])
    with pytest.raises(CriuDiedError) as caught:
        fake.client().dump(images, CriuOptions(pid=4242))
    assert "CRIU was killed by SIGKILL before it answered" in str(caught.value)
    assert "something before the end" in caught.value.format_message()
    assert fake.reaped()


def test_peer_exiting_without_answer(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [{"expect": "RESTORE"}, {"exit": 1}])
    with pytest.raises(CriuDiedError, match="CRIU exited with status 1 before it answered"):
        fake.client().restore(images)
    assert fake.reaped()


def test_silent_peer_times_out_and_is_killed(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [{"expect": "DUMP"}, {"sleep": 60}])
    start = time.monotonic()
    with pytest.raises(CriuTimeoutError, match="did not answer within 1 s and was killed"):
        fake.client(timeout=1).dump(images, CriuOptions(pid=1))
    assert time.monotonic() - start < 10
    assert fake.reaped()


def test_a_tree_held_by_our_handler_is_not_criu_s_time(tmp_path: Path, images: Path) -> None:
    """The dump's bound is CRIU's own work: a tree held at post-dump (until every other
    tree is dumped) does not run it out; a CRIU slow after that still does."""
    fake = Fake(tmp_path, [
        {"expect": "DUMP"},
        {"notify": "post-dump"},
        {"respond": {"type": "DUMP", "success": True}},
    ])
    result = fake.client(timeout=1).dump(images, CriuOptions(pid=1),
                                         {"post-dump": lambda n: time.sleep(2)})
    assert [n.script for n in result.notifications] == ["post-dump"]

    slow = Fake(tmp_path, [{"expect": "DUMP"}, {"notify": "post-dump"}, {"sleep": 60}])
    with pytest.raises(CriuTimeoutError, match="did not answer within 1 s"):
        slow.client(timeout=1).dump(images, CriuOptions(pid=1),
                                    {"post-dump": lambda n: time.sleep(2)})
    assert slow.reaped()


def test_failing_handler_tells_criu_to_stop(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [
        {"expect": "DUMP"},
        {"notify": "post-dump"},
        {"respond": {"type": "DUMP", "success": False, "cr_errmsg": "RPC client reported "
                     "script error"}},
    ])

    def refuse(n: Notification) -> None:
        raise RuntimeError("store full")

    with pytest.raises(CriuNotifyError) as caught:
        fake.client().dump(images, CriuOptions(pid=4242), on_notify={"post-dump": refuse})
    assert "the post-dump handler failed (store full)" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert fake.items()[1]["answer"] == {"type": "NOTIFY", "notify_success": False}


def test_restore_hands_over_inherit_fds_and_returns_the_root_pid(
    tmp_path: Path, images: Path
) -> None:
    fake = Fake(tmp_path, [
        {"expect": "RESTORE"},
        {"notify": "pre-restore"},
        {"notify": "setup-namespaces", "pid": 4242},
        {"notify": "post-restore", "pid": 4242},
        {"notify": "pre-resume"},
        {"notify": "post-resume"},
        {"respond": {"type": "RESTORE", "success": True, "restore": {"pid": 4242}}},
    ])
    r, w = os.pipe()  # not inheritable, as every fd Python opens
    try:
        options = CriuOptions(inherit_fd=(InheritFd("pipe:[77]", w),), rst_sibling=True)
        result = fake.client().restore(images, options)
    finally:
        os.close(r)
        os.close(w)
    request = fake.items()[0]
    assert request["inherited"] == {str(w): True}
    assert request["others"] == [w]  # the socket, stdio and inherit_fd: nothing else
    assert request["request"]["opts"]["inherit_fd"] == [{"key": "pipe:[77]", "fd": w}]
    assert request["request"]["opts"]["rst_sibling"] is True
    assert result.pid == 4242
    assert [(n.script, n.pid) for n in result.notifications] == [
        ("pre-restore", None), ("setup-namespaces", 4242), ("post-restore", 4242),
        ("pre-resume", None), ("post-resume", None)]
    assert result.log == images / "restore.log"


def test_orphan_pts_master_fd_reaches_the_handler(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [
        {"expect": "RESTORE"},
        {"notify": "orphan-pts-master", "send_fd_with": "the master side"},
        {"respond": {"type": "RESTORE", "success": True, "restore": {"pid": 7}}},
    ])
    got: list[bytes] = []

    def take(n: Notification) -> None:
        assert n.fd is not None
        got.append(os.read(n.fd, 100))

    before = set(os.listdir("/proc/self/fd"))
    fake.client().restore(images, CriuOptions(orphan_pts_master=True),
                          on_notify={"orphan-pts-master": take})
    assert got == [b"the master side"]
    assert set(os.listdir("/proc/self/fd")) <= before  # the received fd was closed


def test_pre_dump_hangs_up_after_the_answer(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [
        {"expect": "PRE_DUMP"},
        {"respond": {"type": "PRE_DUMP", "success": True}},
        {"await_eof": True},
    ])
    opts = CriuOptions(pid=4242, track_mem=True, parent_img="../1", leave_running=True)
    result = fake.client().pre_dump(images, opts)
    request, eof = fake.items()
    assert request["request"]["opts"]["parent_img"] == "../1"
    assert request["request"]["opts"]["track_mem"] is True
    assert eof == {"eof": True}
    assert result.operation == "pre-dump" and result.log == images / "pre-dump.log"


def test_check_and_version(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [
        {"expect": "CHECK"},
        {"log": ["(00.001) Looks good."]},
        {"respond": {"type": "CHECK", "success": True}},
    ])
    assert fake.client().check(images).log == images / "check.log"
    assert (images / "check.log").read_text() == "(00.001) Looks good.\n"

    fake = Fake(tmp_path, [
        {"expect": "VERSION"},
        {"respond": {"type": "VERSION", "success": True,
                     "version": {"major_number": 3, "minor_number": 17, "sublevel": 1}}},
    ])
    assert str(fake.client().version()) == "3.17.1"
    assert "opts" not in fake.items()[-1]["request"]


def test_rejected_request_and_garbage(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [
        {"expect": "DUMP"},
        {"respond": {"type": "EMPTY", "success": False, "cr_errno": 22,
                     "cr_errmsg": "Invalid req"}},
    ])
    with pytest.raises(CriuError, match="CRIU rejected the request; errno 22 EINVAL"):
        fake.client().dump(images, CriuOptions(pid=1))

    fake = Fake(tmp_path, [{"expect": "DUMP"}, {"raw": "ffffffff"}])
    with pytest.raises(CriuProtocolError, match="not a criu_resp"):
        fake.client().dump(images, CriuOptions(pid=1))

    fake = Fake(tmp_path, [{"expect": "DUMP"}, {"respond": {"type": "RESTORE", "success": True,
                                                            "restore": {"pid": 1}}}])
    with pytest.raises(CriuProtocolError, match="answer of type RESTORE to DUMP"):
        fake.client().dump(images, CriuOptions(pid=1))


def test_usage_errors_are_caught_before_criu_starts(tmp_path: Path, images: Path) -> None:
    fake = Fake(tmp_path, [])
    with pytest.raises(ValueError, match="post-dmup"):
        fake.client().dump(images, CriuOptions(pid=1), on_notify={"post-dmup": print})
    with pytest.raises(ValueError, match="PID"):
        fake.client().dump(images, CriuOptions())
    with pytest.raises(ValueError, match="a name, not a path"):
        fake.client().dump(images, CriuOptions(pid=1, log_file="sub/dump.log"))
    with pytest.raises(CriuError, match="cannot open"):
        fake.client().dump(tmp_path / "missing", CriuOptions(pid=1))
    assert fake.procs == []


def test_missing_criu_binary(images: Path) -> None:
    with pytest.raises(CriuError, match="not installed"):
        Criu(binary="/nonexistent/criu").check(images)


# -- the schema -------------------------------------------------------------------


#: (message, field) -> number in CRIU 3.17's images/rpc.proto.
CRIU_FIELD_NUMBERS = {
    ("criu_opts", "images_dir_fd"): 1, ("criu_opts", "pid"): 2,
    ("criu_opts", "leave_running"): 3, ("criu_opts", "ext_unix_sk"): 4,
    ("criu_opts", "tcp_established"): 5, ("criu_opts", "shell_job"): 7,
    ("criu_opts", "file_locks"): 8, ("criu_opts", "log_level"): 9, ("criu_opts", "log_file"): 10,
    ("criu_opts", "notify_scripts"): 12, ("criu_opts", "root"): 13,
    ("criu_opts", "parent_img"): 14, ("criu_opts", "track_mem"): 15,
    ("criu_opts", "rst_sibling"): 26, ("criu_opts", "inherit_fd"): 27,
    ("criu_opts", "manage_cgroups_mode"): 34, ("criu_opts", "ghost_limit"): 35,
    ("criu_opts", "external"): 37, ("criu_opts", "orphan_pts_master"): 50,
    ("criu_opts", "network_lock"): 64, ("criu_opts", "mntns_compat_mode"): 65,
    ("criu_req", "type"): 1, ("criu_req", "opts"): 2, ("criu_req", "notify_success"): 3,
    ("criu_resp", "notify"): 5, ("criu_resp", "cr_errno"): 7, ("criu_resp", "cr_errmsg"): 9,
    ("criu_resp", "version"): 10, ("criu_notify", "script"): 1, ("criu_notify", "pid"): 2,
    ("criu_restore_resp", "pid"): 1, ("inherit_fd", "key"): 1, ("inherit_fd", "fd"): 2,
}


def test_schema_has_criu_317_field_numbers() -> None:
    messages = wire.rpc.DESCRIPTOR.message_types_by_name
    for (message, name), number in CRIU_FIELD_NUMBERS.items():
        assert messages[message].fields_by_name[name].number == number, (message, name)
    # 3.17's criu_opts has no field above 65; a later one must not creep in.
    assert max(f.number for f in messages["criu_opts"].fields) == 65
    # The bytes libcriu sends for "dump PID 5 into fd 3".
    data = wire.request(ReqType.DUMP, options=CriuOptions(pid=5, log_level=2), images_dir_fd=3)
    assert data == bytes.fromhex("0801 1206 0803 1005 4802".replace(" ", ""))


def test_generated_module_is_what_protoc_makes(tmp_path: Path) -> None:
    if shutil.which("protoc") is None:
        pytest.skip("no protoc (apt-get install protobuf-compiler)")
    proto = "seamless/criu/rpc.proto"
    subprocess.run(["protoc", "-I", str(ROOT), f"--python_out={tmp_path}", str(ROOT / proto)],
                   check=True)
    generated = tmp_path / "seamless/criu/rpc_pb2.py"
    committed = ROOT / "seamless/criu/rpc_pb2.py"
    assert generated.read_bytes() == committed.read_bytes(), (
        "rpc_pb2.py is stale: protoc -I . --python_out=. " + proto)


def test_debian_python3_protobuf_round_trips_a_request() -> None:
    """The guest runs Debian's python3-protobuf 3.21 (the venv has protobuf 7)."""
    python = "/usr/bin/python3"
    if not Path(python).exists() or subprocess.run(
        [python, "-c", "import google.protobuf"], capture_output=True
    ).returncode != 0:
        pytest.skip(f"{python} has no google.protobuf (apt-get install python3-protobuf)")
    # The generated module alone: the guest has seamless's other dependencies, this host
    # python may not.
    script = (
        "import importlib.util, sys\n"
        "from google.protobuf import __version__\n"
        "spec = importlib.util.spec_from_file_location('rpc_pb2', sys.argv[1])\n"
        "rpc = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(rpc)\n"
        "req = rpc.criu_req(type=rpc.RESTORE)\n"
        "req.opts.images_dir_fd = 3\n"
        "req.opts.log_level = 4\n"
        "req.opts.rst_sibling = True\n"
        "req.opts.inherit_fd.add(key='socket:[9]', fd=5)\n"
        "data = req.SerializeToString()\n"
        "back = rpc.criu_req.FromString(data)\n"
        "assert back.opts.inherit_fd[0].key == 'socket:[9]', back\n"
        "resp = rpc.criu_resp.FromString(bytes.fromhex(sys.argv[2]))\n"
        "assert (resp.notify.script, resp.notify.pid) == ('post-dump', 7), resp\n"
        "sys.stdout.write(data.hex() + ' ' + __version__)\n"
    )
    notify = wire.response(ReqType.NOTIFY, True, notify={"script": "post-dump", "pid": 7})
    r = subprocess.run(
        [python, "-c", script, str(ROOT / "seamless/criu/rpc_pb2.py"), notify.hex()],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    data_hex, version = r.stdout.split()
    ours = wire.request(ReqType.RESTORE, images_dir_fd=3, options=CriuOptions(
        rst_sibling=True, inherit_fd=(InheritFd("socket:[9]", 5),)))
    assert bytes.fromhex(data_hex) == ours, version


def test_a_criu_too_old_for_the_target_kernel_is_named() -> None:
    """Debian 12's CRIU 3.17 cannot restore on 6.13 and later (vvar_vclock); 4.1 can."""
    from seamless.criu import Version, kernels

    assert kernels.unsupported(Version(3, 17, 1), "6.1.0-56-cloud-amd64") is None
    assert kernels.unsupported(Version(3, 17, 1), "6.12.118+deb13-cloud-amd64") is None
    why = kernels.unsupported(Version(3, 17, 1), "7.3.4+deb13-cloud-amd64")
    assert why is not None and why.startswith("CRIU 3.17.1 cannot restore on Linux 7.3.4")
    assert "4.1 or later" in why
    assert kernels.unsupported(Version(4, 1, 1), "7.3.4+deb13-cloud-amd64") is None
    assert kernels.unsupported(Version(3, 17), "vmlinuz") is None
