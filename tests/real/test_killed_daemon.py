"""A daemon killed in the middle of a reconciliation at rest leaves no tool of its own holding an
image, and a daemon that starts after a killed one ends what that one left, and nothing else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.libvirt_env import Domains, virsh
from helpers.scenarios import build, commit_offline, entry_after, is_for
from helpers.stand_ins import crashing_path, holding_mark

pytestmark = pytest.mark.real


#: The byte QEMU locks in an image it has opened with the permission to write (its byte 100
#: plus the permission's bit).
WRITE_LOCK_BYTE = 101


def held(image: Path) -> bool:
    """Whether a process holds ``image`` open for writing, read from the kernel's list of
    locks: asking QEMU (``qemu-img info``) would take a lock itself, and a daemon opening the
    image at that moment would fail and retry later."""
    st = image.stat()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        where, start, end = fields[-3:]
        if where == device and int(start) <= WRITE_LOCK_BYTE <= (
            2**63 if end == "EOF" else int(end)
        ):
            return True
    return False


def wait(condition: Any, what: str, timeout: float = 10) -> float:
    """Seconds until ``condition()`` held."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_daemon_killed_mid_reconcile_leaves_no_tool_holding_the_base(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c = build(tmp_path / "images")
    base = c.layers[0]
    dom = domains.define(c.active)
    daemon = daemon_factory(roots=[tmp_path / "images"])
    daemon.start()  # its first look writes the top (the copies below merged into it)
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    daemon.stop()
    mark = len(daemon.entries())
    daemon.start(env=crashing_path(tmp_path, "hold:transaction", "KILL"))
    entry_after(
        daemon,
        mark,
        lambda e: e.get("event") == "rescan_finished" and e["trigger"] == "startup",
        "the startup rescan",
    )
    commit_offline(c)
    daemon.signal(signal.SIGHUP)
    wait(holding_mark(tmp_path).exists, "the daemon's qemu-storage-daemon at its transaction")
    assert held(base)
    daemon.signal(signal.SIGKILL)
    assert daemon.process is not None
    daemon.process.wait()
    wait(lambda: not held(base), "the base to be free after the daemon died", timeout=5)
    # the restarted daemon looks again (the killed tool had the base open read-write, which
    # leaves its bitmaps flagged in-use: QEMU's own mark of a crash), and the domain starts
    daemon.stop()
    mark = len(daemon.entries())
    daemon.start()
    entry_after(daemon, mark, is_for(dom, "look_done"), "the restarted daemon's first look")
    started = time.monotonic()
    virsh("start", dom.name())
    assert time.monotonic() - started < 10
    assert dom.isActive()
    # its failed attempt opened the base for writing: that is no news, and the next attempt
    # waits its turn (5 s), not chased by its own write
    attempts = [e for e in daemon.entries()[mark:] if is_for(dom, "reconciliation_deferred")(e)]
    assert [e["attempt"] for e in attempts] == [1], attempts


def test_a_restarted_daemon_ends_the_tools_a_killed_one_left_and_nothing_else(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A tool that outlived its daemon (recorded in the state directory) is ended at the next
    start; a record whose pid now names another process is only forgotten."""
    c = build(tmp_path / "images")
    base = c.layers[0]
    dom = domains.define(c.active)
    daemon = daemon_factory(roots=[tmp_path / "images"])
    leftover = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={base}",
         "--blockdev", "driver=qcow2,node-name=q,file=f"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        wait(lambda: held(base), "the leftover to hold the base")
        tools = daemon.state_dir / "tools"
        tools.mkdir(parents=True)
        for process, tool, start in (
            (leftover, "qemu-storage-daemon", start_ticks(leftover.pid)),
            (bystander, "qemu-storage-daemon", start_ticks(bystander.pid) + 1),  # pid reused
        ):
            record = {"pid": process.pid, "start": start, "tool": tool}
            (tools / f"{process.pid}.json").write_text(json.dumps(record))
        daemon.start()
        entry = daemon.wait_for(lambda e: e.get("event") == "leftovers_removed", what="ended")
        assert entry["processes"] == [f"qemu-storage-daemon (pid {leftover.pid})"], entry
        assert leftover.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None, "a process the records do not name was ended"
        # its first look's own tool (the top united at rest) is recorded while it runs
        daemon.wait_for(is_for(dom, "disk_tracked"), what="the first look")
        assert not held(base)
        assert list(tools.iterdir()) == []
    finally:
        for process in (leftover, bystander):
            process.kill()
            process.wait()


def start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
