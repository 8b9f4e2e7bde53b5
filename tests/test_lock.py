"""One lock for everything that writes the store or loads a kernel (seamless.lock)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seamless import lock
from seamless.errors import SeamlessError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lock is root's (as seamless)")


def test_a_second_command_is_refused_with_who_holds_the_lock(lock_in_tmp: Path) -> None:
    calls: list[str] = []

    @lock.exclusive("seamless checkpoint")
    def checkpoint() -> str:
        calls.append("ran")
        return "done"

    with lock.held("seamless upgrade"):
        with pytest.raises(SeamlessError, match=rf"running: seamless upgrade \(PID {os.getpid()}\)"
                                                r"; seamless checkpoint would get in its way"):
            checkpoint()
        assert calls == []
    assert checkpoint() == "done" and calls == ["ran"]  # released when the first ended
    assert lock_in_tmp.stat().st_mode & 0o777 == 0o600


def test_the_lock_is_held_by_another_process_until_it_ends(lock_in_tmp: Path) -> None:
    """What a lazy restore's finisher does: it holds the lock as long as it runs."""
    code = (f"import sys; sys.path[:0] = {sys.path!r}\n"
            "from pathlib import Path\nfrom seamless import lock\n"
            f"lock.LOCK = Path({str(lock_in_tmp)!r})\n"
            "lock.hold('finishing the lazy restore'); print('held', flush=True)\n"
            "sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(SeamlessError, match="finishing the lazy restore"):
            lock.hold("seamless upgrade")
    finally:
        holder.communicate("")
    fd = lock.hold("seamless upgrade")
    assert fd is not None
    os.close(fd)


def test_the_hourly_expiry_takes_the_lock_only_when_something_is_due(
        lock_in_tmp: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An upgrade running when the timer fires is not disturbed (nothing due: no lock),
    and a due generation waits for the next run while one holds it."""
    import json
    import time

    from click.testing import CliRunner

    from seamless.cli import cli
    from seamless.memstore import cli as store_cli
    from seamless.memstore.generation import Generation
    from seamless.memstore.records import Manifest
    from seamless.memstore.region import Region
    from seamless.memstore.store import GENERATIONS, Store

    store = Store(tmp_path / "store")
    (store.root / GENERATIONS).mkdir(parents=True)
    gen = Generation(store.generations_dir / "gen-1")
    gen.create()
    gen.seal(Manifest(generation=1))
    region = Region(start=1 << 30, size=256 << 20, memmap="memmap=256M!1G",
                    reserved_now=True, device=Path("/dev/pmem0"))
    monkeypatch.setattr(store_cli, "find_region", lambda: region)
    monkeypatch.setattr(store_cli, "open_store", lambda r: store)
    store.report_path(1).write_text(json.dumps({"generation": 1,
                                                "kept_until": time.time() + 3600}))
    with lock.held("seamless upgrade"):
        result = CliRunner().invoke(cli, ["store", "expire", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {"expired": []}
        store.report_path(1).write_text(json.dumps({"generation": 1, "kept_until": 1.0}))
        result = CliRunner().invoke(cli, ["store", "expire", "--json"])
        assert result.exit_code == 0 and "not now" in result.stderr
        assert gen.sealed
    result = CliRunner().invoke(cli, ["store", "expire", "--json"])
    assert json.loads(result.stdout) == {"expired": [1]} and not gen.final.exists()
