"""Debian's virtnbdbackup, the real tool, backing up OS-less QEMU VMs on a real libvirtd, each
backup restored with virtnbdrestore and compared with the disk (`qemu-img compare`).

virtnbdbackup backs a running domain up through libvirt's backup API, and a shut-off one by
exporting the top layer's copy of its last checkpoint's bitmap with `qemu-nbd`: a single-copy
reader, which misses whatever the copies below the top hold unless the top holds their union.
With the daemon, every restore equals the disk; without it, the same maintenance loses data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers.images import K64, MiB, create, run
from helpers.libvirt_env import DaemonProcess, Domains, stop_gracefully, virsh
from helpers.scenarios import checkpoint_status as status
from helpers.scenarios import entry_after, guest_write, is_for, redefine_on, rescan_now, snapshot
from helpers.virtnbdbackup import restored_equals, virtnbdbackup

pytestmark = pytest.mark.real


def maintained_chain(
    tmp_path: Path,
    domains: Domains,
    daemon: DaemonProcess | None,
    *,
    down_for_merge: bool,
    merge_top: bool = False,
) -> tuple[Any, Path, Path]:
    """A full backup of a running domain on base (checkpoint virtnbdbackup.0), then writes,
    two snapshots with writes after each, the domain shut off, and an oVirt-style cold merge
    of the middle layer (qemu-img commit, rebase, delete) or of the top one (``merge_top``:
    qemu-img commit, the domain moved down to s1, delete), with the daemon running (the layer
    deleted once it reconciled the merge) or stopped for it (``down_for_merge``: deleted at
    once).  Returns the shut-off domain, its top layer and the backup folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    base, s1, s2 = folder / "base.qcow2", folder / "s1.qcow2", folder / "s2.qcow2"
    create(base)
    dom = domains.define(base, start=True)
    if daemon is not None:
        daemon.start("--snapshot-watch-interval", "1")
        daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    guest_write(dom, 1 * MiB, K64, 0x10)
    output = tmp_path / "backup"
    virtnbdbackup(dom, "full", output)
    guest_write(dom, 2 * MiB, K64, 0x11)  # into base, after the checkpoint
    snapshot(dom, s1)
    guest_write(dom, 3 * MiB, K64, 0x22)  # into s1
    snapshot(dom, s2)
    guest_write(dom, 4 * MiB, K64, 0x33)  # into s2
    stop_gracefully(dom)
    if daemon is not None:
        rescan_now(daemon, "the shut-off chain seen")
        if down_for_merge:
            assert daemon.stop() == 0
    merged, top = (s2, s1) if merge_top else (s1, s2)
    run("qemu-img", "commit", "-q", str(merged))
    if not merge_top:
        run("qemu-img", "rebase", "-u", "-b", str(base), "-F", "qcow2", str(s2))
    dom = redefine_on(domains, dom, top)
    if daemon is not None and not down_for_merge:
        mark = len(daemon.entries())
        rescan_now(daemon, "the cold merge")
        done = entry_after(daemon, mark, is_for(dom, "reconciliation"), "the merge reconciled")
        # qemu-img commit wrote through the base's recording bitmaps: they may hold it all
        assert done["result"] in ("reconciled", "already_consistent"), done
    merged.unlink()
    return dom, top, output


@pytest.mark.parametrize("merge_top", [False, True], ids=["middle", "top"])
@pytest.mark.parametrize("with_daemon", [True, False], ids=["daemon", "no-daemon"])
def test_an_offline_incremental_after_snapshots_and_a_cold_merge_restores_the_disk(
    tmp_path: Path, domains: Domains, daemon_factory: Any, with_daemon: bool, merge_top: bool
) -> None:
    """Without the daemon the top's copy holds only what was written since the last snapshot
    (and, after a top merge, what qemu-img commit wrote through it), and the offline
    incremental misses the rest; with it, the restore equals the disk."""
    daemon = daemon_factory(roots=[tmp_path / "images"]) if with_daemon else None
    dom, top, output = maintained_chain(
        tmp_path, domains, daemon, down_for_merge=False, merge_top=merge_top
    )
    if daemon is not None:
        seen = status(daemon, dom.name())["virtnbdbackup.0"]
        assert (seen["state"], seen["next_backup"]) == ("usable", "safe"), seen
    virtnbdbackup(dom, "inc", output)
    assert restored_equals(output, top, tmp_path) == with_daemon


def test_a_checkpoint_lost_while_the_daemon_was_down_is_filled_and_restores_the_disk(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """The middle layer cold-merged and deleted while the daemon was down: its bits cannot be
    proven to be anywhere, so the checkpoint is filled and the next incremental, offline and
    then online, copies the whole disk: both restores equal the disk.  A full backup after it
    takes virtnbdbackup.0 again (it deletes its checkpoints first): a new checkpoint, exact
    again."""
    daemon = daemon_factory(roots=[tmp_path / "images"])
    dom, top, output = maintained_chain(tmp_path, domains, daemon, down_for_merge=True)
    daemon.start()
    daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    seen = status(daemon, dom.name())["virtnbdbackup.0"]
    assert seen["next_backup"] == "complete: the whole disk", seen
    virtnbdbackup(dom, "inc", output)  # offline: qemu-nbd exports the top's copy
    assert restored_equals(output, top, tmp_path)

    dom.create()
    guest_write(dom, 6 * MiB, K64, 0x66)
    online = tmp_path / "online"
    virtnbdbackup(dom, "full", online)  # deletes virtnbdbackup.* and takes .0 again
    guest_write(dom, 7 * MiB, K64, 0x77)
    rescan_now(daemon, "the new checkpoint seen")
    seen = status(daemon, dom.name())["virtnbdbackup.0"]
    assert (seen["state"], seen["next_backup"]) == ("usable", "safe"), seen
    virtnbdbackup(dom, "inc", online)
    stop_gracefully(dom)
    assert restored_equals(online, top, tmp_path)
    names = virsh("checkpoint-list", dom.name(), "--name").split()
    assert names == ["virtnbdbackup.0", "virtnbdbackup.1"], names


@pytest.mark.parametrize("with_daemon", [True, False], ids=["daemon", "no-daemon"])
def test_an_offline_incremental_after_an_overlay_made_without_bitmaps_restores_the_disk(
    tmp_path: Path, domains: Domains, daemon_factory: Any, with_daemon: bool
) -> None:
    """An overlay made with qemu-img (no bitmaps) and written to: qemu-nbd exports the base's
    copy of the checkpoint, which misses the overlay's writes, unless the daemon filled the
    checkpoint in the overlay (the whole disk, once)."""
    folder = tmp_path / "images"
    folder.mkdir()
    base, overlay = create(folder / "base.qcow2"), folder / "o.qcow2"
    dom = domains.define(base, start=True)
    daemon = daemon_factory(roots=[folder]) if with_daemon else None
    if daemon is not None:
        daemon.start()
        daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    output = tmp_path / "backup"
    virtnbdbackup(dom, "full", output)
    guest_write(dom, 2 * MiB, K64, 0x11)
    stop_gracefully(dom)
    create(overlay, backing=base)
    run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x22 5M 64k", str(overlay))
    dom = redefine_on(domains, dom, overlay)
    if daemon is not None:
        rescan_now(daemon, "the overlay seen")
        daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    virtnbdbackup(dom, "inc", output)
    assert restored_equals(output, overlay, tmp_path) == with_daemon
