"""Commits the daemon did not see happen, on a real libvirtd with OS-less QEMU VMs.

Guest writes go through QEMU's device backend (HMP qemu-io), so the recording bitmaps mark them
as they would a guest's; what the base holds afterwards is read back over NBD.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers.images import K64, MiB, add_bitmap, bitmap_names, dirty_extents, expected, run, write
from helpers.libvirt_env import Domains, stop_gracefully, virsh
from helpers.scenarios import build, guest_write, is_for, snapshot

pytestmark = pytest.mark.real

CLI = [sys.executable, "-m", "virt_bitmapd.cli"]


def test_maintenance_while_the_daemon_was_stopped_loses_no_block(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """The daemon knows [T, ...] and is stopped.  Meanwhile: a live snapshot s1 on T; checkpoint
    cp2 (its bitmap only in s1 and what follows); guest writes; a snapshot s2; the domain shut
    off; `qemu-img commit -d -b T s1`, `qemu-img rebase -u -b T s2`, the domain on [s2, T, ...].
    The chain only seems to have grown; s1's file shows what was committed into T."""
    c = build(tmp_path / "images")
    t = c.active  # T: the active layer the daemon knows, over s1-of-the-fixture and base
    dom = domains.define(t, start=True)
    daemon = daemon_factory().start()
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    assert daemon.stop() == 0

    s1, s2 = c.folder / "m-s1.qcow2", c.folder / "m-s2.qcow2"
    snapshot(dom, s1)
    virsh("checkpoint-create-as", dom.name(), "cp-maint", "--diskspec", "vda")
    guest_write(dom, 30 * MiB, 2 * K64, 0x5A)
    guest_write(dom, 40 * MiB, K64, 0x5B)
    snapshot(dom, s2)
    guest_write(dom, 50 * MiB, K64, 0x5C)
    stop_gracefully(dom)
    assert "cp-maint" in bitmap_names(s1) and "cp-maint" not in bitmap_names(t)
    run("qemu-img", "commit", "-q", "-d", "-b", str(t), str(s1))
    run("qemu-img", "rebase", "-q", "-u", "-b", str(t), "-F", "qcow2", str(s2))
    dom = domains.conn.defineXML(dom.XMLDesc(0).replace(f"file='{s1}'", f"file='{s2}'"))

    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled" and entry["found_by"] == "files", entry
    assert entry["removed"] == [str(s1)] and entry["base"] == str(t), entry
    assert "cp-maint" in entry["bitmaps"]
    # What a backup from cp-maint reads is the union over [s2, T]: s1's writes are in T now,
    # and in s2's copy too, for a reader that exports the top's copy alone.
    assert dirty_extents(t, "cp-maint") == expected([(30 * MiB, 2 * K64), (40 * MiB, K64)])
    every = [(30 * MiB, 2 * K64), (40 * MiB, K64), (50 * MiB, K64)]
    assert dirty_extents(s2, "cp-maint") == expected(every)
    # cp3 (recording since before s1) gets s1's blocks too
    assert set(expected([(30 * MiB, 2 * K64), (40 * MiB, K64)])) <= set(dirty_extents(t, "cp3"))


@pytest.mark.parametrize("layers", ["kept", "deleted"])
def test_two_commit_events_within_a_minute_each_get_one_line(
    tmp_path: Path, domains: Domains, daemon_factory: Any, layers: str
) -> None:
    """The second commit takes only layers no look saw (made and committed between two looks).
    Its event still gets its own line, never hidden by the first: verified from the committed
    file when it is still there, else skipped with the reason."""
    c = build(tmp_path / "images")
    dom = domains.define(c.active, start=True)
    daemon = daemon_factory().start("--snapshot-watch-interval", "0")
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    base, s1, active = c.layers
    virsh("blockcommit", dom.name(), "vda", "--top", str(s1), "--base", str(base), "--wait")
    first = daemon.wait_for(is_for(dom, "reconciliation"), what="first reconciliation")
    assert first["result"] == "already_consistent" and first["removed"] == [str(s1)], first
    o1, o2 = c.folder / "o1.qcow2", c.folder / "o2.qcow2"
    snapshot(dom, o1)
    snapshot(dom, o2)
    delete = ["--delete"] if layers == "deleted" else []
    virsh(
        "blockcommit", dom.name(), "vda", "--top", str(o1), "--base", str(active), "--wait",
        *delete,
    )  # fmt: skip
    second = daemon.wait_for(is_for(dom, "reconciliation"), what="second reconciliation")
    if layers == "kept":
        assert second["result"] == "already_consistent" and second["found_by"] == "files"
        assert second["removed"] == [str(o1)] and second["base"] == str(active), second
    else:
        assert second["result"] == "skipped" and "not verified" in second["reason"], second
    stop_gracefully(dom)
    daemon.stop()
    lines = [e for e in daemon.entries() if is_for(dom, "reconciliation")(e)]
    assert [e["result"] for e in lines] == ["already_consistent", second["result"]], lines


def cold_merged(tmp_path: Path, domains: Domains, daemon_factory: Any) -> tuple[Any, Any, Any]:
    """A shut-off domain the daemon tracks, whose s1 was just committed with
    `qemu-img commit -d` by a tool (the files are all still there)."""
    c = build(tmp_path / "images")
    dom = domains.define(c.active)
    daemon = daemon_factory(roots=[tmp_path / "images"]).start()
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    base, s1, _ = c.layers
    run("qemu-img", "commit", "-q", "-d", "-b", str(base), str(s1))
    return c, dom, daemon


def reconcile_cli(c: Any, daemon: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    base, s1, _ = c.layers
    command = ["reconcile", "--top", str(s1), "--base", str(base), "--config", str(daemon.config)]
    return subprocess.run([*CLI, *command, *extra], capture_output=True, text=True, check=False)


def delete_committed_layer(c: Any, daemon: Any) -> None:
    base, s1, active = c.layers
    run("qemu-img", "rebase", "-q", "-u", "-b", str(base), "-F", "qcow2", str(active))
    s1.unlink()
    daemon.signal(signal.SIGHUP)


def test_a_cold_merge_tool_may_delete_once_reconcile_exits_0(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """oVirt-style: `qemu-img commit -d`, then `virt-bitmapd reconcile` (exit 0), then the
    committed file is deleted before the daemon looks.  The daemon is told by the command and
    reports the commit reconciled, not its bits lost."""
    c, dom, daemon = cold_merged(tmp_path, domains, daemon_factory)
    reconcile = reconcile_cli(c, daemon)
    assert reconcile.returncode == 0, reconcile.stderr
    delete_committed_layer(c, daemon)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "already_consistent", entry
    assert "reconciled by virt-bitmapd reconcile" in entry["reason"]
    assert "untrusted" not in entry
    assert dirty_extents(c.layers[0], "cp2") == expected([(2 * MiB, 2 * K64)])


def test_a_tool_that_deletes_without_reconcile_is_told_unrecoverable(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = cold_merged(tmp_path, domains, daemon_factory)
    assert reconcile_cli(c, daemon, "--dry-run").returncode == 0  # a dry run tells nothing
    delete_committed_layer(c, daemon)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "unrecoverable" and "cp2" in entry["untrusted"], entry


def test_a_record_of_reconcile_speaks_for_its_files_once(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A tool reconciles a cold merge with the command line but keeps the file; the daemon
    reconciles the same commit itself.  Later a new layer is made at the same path, written,
    cold-merged without the command line and deleted: the old record must not vouch for it."""
    c, dom, daemon = cold_merged(tmp_path, domains, daemon_factory)
    base, s1, active = c.layers
    assert reconcile_cli(c, daemon).returncode == 0
    run("qemu-img", "rebase", "-q", "-u", "-b", str(base), "-F", "qcow2", str(active))
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="the daemon's own reconciliation")
    assert entry["result"] == "already_consistent" and "reason" not in entry, entry
    # a new layer at the reused path (the old file kept elsewhere, so it is surely another
    # file), with a bitmap the base lacks
    s1.rename(s1.with_suffix(".old"))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(s1))
    for name in ("cp1", "cp2", "cp4"):
        add_bitmap(s1, name)
    add_bitmap(active, "cp4")
    run("qemu-img", "rebase", "-q", "-u", "-b", str(s1), "-F", "qcow2", str(active))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(
        lambda e: is_for(dom, "chain_changed")(e) and str(s1) in e["chain"],
        what="the new layer seen",
    )
    write(s1, 20 * MiB, K64, 0x44)  # in s1's cp4, and nowhere else once s1 is gone
    run("qemu-img", "commit", "-q", "-d", "-b", str(base), str(s1))
    delete_committed_layer(c, daemon)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="the second commit")
    assert entry["result"] == "unrecoverable", entry
    assert entry["error_kind"] == "committed_layers_gone" and "cp4" in entry["untrusted"], entry
