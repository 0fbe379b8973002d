"""A QEMU tool that dies half-way: named, with how it ended, and the damage it did reported.

qemu-storage-daemon is replaced on PATH by a stand-in that kills the real one when a chosen QMP
command arrives (``helpers/crashing_tool.py``): before the transaction, during it, and after it
before QEMU closes the base.  In each case QEMU had the base open read-write, which flags its
bitmaps in-use until it stores them at close: the checkpoints that were good before are now
unusable, and must be named, never left looking fine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers.images import K64, ChainBuilder, MiB, bitmaps, run
from helpers.libvirt_env import Domains
from helpers.scenarios import build, commit_offline, is_for
from helpers.stand_ins import crashing_path

pytestmark = pytest.mark.real

CLI = [sys.executable, "-m", "virt_bitmapd.cli"]


def committed(folder: Path) -> ChainBuilder:
    """base (cp1, old) <- s1 (cp1, cp2), committed with qemu-img commit -d."""
    c = ChainBuilder(folder)
    c.start()
    c.checkpoint("old")
    c.checkpoint("cp1")
    c.write(0, K64)
    c.snapshot("s1.qcow2")
    c.checkpoint("cp2")
    c.write(5 * MiB, K64, 0xBB)
    run("qemu-img", "commit", "-q", "-d", "-b", str(c.layers[0]), str(c.layers[1]))
    return c


@pytest.mark.parametrize("signal_name", ["ABRT", "KILL"])
@pytest.mark.parametrize(
    "at",
    ["before:transaction", "after:transaction", "before:blockdev-del"],
    ids=["before-the-transaction", "during-the-transaction", "before-the-base-is-closed"],
)
def test_a_crash_names_the_tool_how_it_ended_and_the_checkpoints_it_broke(
    tmp_path: Path, at: str, signal_name: str
) -> None:
    c = committed(tmp_path)
    base, s1 = c.layers
    result = subprocess.run(
        [*CLI, "reconcile", "--top", str(s1), "--base", str(base), "--json"],
        capture_output=True,
        text=True,
        check=False,
        env=crashing_path(tmp_path, at, signal_name),
        timeout=120,
    )
    assert result.returncode == 1, result
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "crash_damaged_bitmaps", error
    assert f"qemu-storage-daemon was killed by SIG{signal_name}" in error["message"], error
    # the base's own checkpoints, good before, are flagged in-use now: named, never hidden
    assert (
        "'cp1', 'old'" in error["message"]
        and "next backup of each must be full" in (error["message"])
    )
    flags = {str(b["name"]): b["flags"] for b in bitmaps(base)}
    assert "in-use" in flags["old"] and "in-use" in flags["cp1"]  # type: ignore[operator]
    assert str(base) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_tool_that_fails_without_crashing_says_why(tmp_path: Path) -> None:
    """No damage, no crash: the tool's exit status and its own words are in the error."""
    c = committed(tmp_path)
    base, s1 = c.layers
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-storage-daemon"
    fake.write_text(
        "#!/bin/sh\necho 'qemu-storage-daemon: cannot start: out of luck' >&2\nexit 3\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(
        [*CLI, "reconcile", "--top", str(s1), "--base", str(base)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "exited with status 3" in result.stderr and "out of luck" in result.stderr
    flags = {str(b["name"]): b["flags"] for b in bitmaps(base)}
    assert flags["cp1"] == ["auto"] and flags["old"] == ["auto"]


def test_the_daemon_reports_the_checkpoints_a_crash_broke(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A cold merge found by the daemon, whose qemu-storage-daemon aborts mid-transaction: the
    reconciliation is unrecoverable and names the broken checkpoints as untrusted."""
    c = build(tmp_path / "images")
    dom = domains.define(c.active)
    daemon = daemon_factory(roots=[tmp_path / "images"])
    daemon.start(env=crashing_path(tmp_path, "after:transaction", "ABRT"))
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    commit_offline(c)
    daemon.signal(signal.SIGHUP)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "unrecoverable", entry
    assert entry["error_kind"] == "crash_damaged_bitmaps" and entry["untrusted"] == ["cp1"]
    assert "killed by SIGABRT" in entry["error"]
    # `status` shows them too, with the reason, before anyone tries a backup from them
    shown = subprocess.run(
        [*CLI, "status", dom.name(), "--json", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        check=True,
    )
    (disk,) = json.loads(shown.stdout)["domains"][0]["disks"]
    damaged = {e["bitmap"]: e for e in disk["checkpoints"]}["cp1"]
    assert damaged["state"] == "untrusted" and "crash_damaged_bitmaps" in damaged["reason"]
