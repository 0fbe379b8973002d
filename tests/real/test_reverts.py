"""Layers that leave a chain without being committed, on a real libvirtd with OS-less QEMU VMs: a
revert to the base, and a commit after which the domain ran on the base before the daemon
looked. Nothing proves those were commits whose bits the base can be given, so the checkpoints
are untrusted: filled where a copy is left (both readers, libvirt's backup and an offline export
with ``qemu-nbd --bitmap``, copy the whole disk), refused by both where none is. Before, the
daemon took both for commits and left the checkpoint "usable" while libvirt's incremental backup
from it missed clusters whose content had changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers.backups import backup_extents, backup_refusal
from helpers.images import K64, ExportRefused, MiB, bitmap_names, dirty_extents, run
from helpers.libvirt_env import Domains, stop_gracefully, virsh
from helpers.scenarios import (
    checkpoint_status as status,
)
from helpers.scenarios import (
    entry_after,
    guest_write,
    is_for,
    redefine_on,
    rescan_now,
    running_on_new_image,
    snapshot,
)

pytestmark = pytest.mark.real

WHOLE_DISK = [(0, 64 * MiB)]  # helpers.images.create's default size


def refused_offline(image: Path, bitmap: str) -> bool:
    """Whether `qemu-nbd --bitmap` refuses to export ``bitmap`` of ``image``."""
    try:
        dirty_extents(image, bitmap)
    except ExportRefused:
        return True
    return False


def reverted(
    tmp_path: Path,
    domains: Domains,
    daemon_factory: Any,
    options: tuple[str, ...] = (),
    **settings: Any,
) -> tuple[Any, Any, Path]:
    """[D, L], cp0 taken on L and cp1 on D, D written before cp1 and after; the domain shut
    off, the daemon's look at rest taken, then the domain pointed back at L (D discarded, its
    file left).  Returns the domain, the daemon and L."""
    folder, base, dom, daemon = running_on_new_image(
        tmp_path, domains, daemon_factory, "l.qcow2", options, **settings
    )
    top = folder / "d.qcow2"
    virsh("checkpoint-create-as", dom.name(), "cp0", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    snapshot(dom, top)
    daemon.wait_for(is_for(dom, "chain_changed"), what="the snapshot seen")
    guest_write(dom, 5 * MiB, K64, 0x22)  # before cp1: in no bitmap of cp1
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 9 * MiB, K64, 0x33)
    stop_gracefully(dom)
    rescan_now(daemon, "a look at rest")
    return redefine_on(domains, dom, base), daemon, base


def test_a_revert_to_the_base_is_no_commit(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """Every cluster D held changed with the revert: a backup from cp0 or cp1 must copy them
    all.  L was not written since the daemon's last look, so nothing proves a commit: no
    bitmap is made in L from D's bits, cp0 and cp1 are untrusted.  cp0 (a copy in L) is filled:
    both readers copy the whole disk; cp1 (no copy left) is refused by both."""
    dom, daemon, base = reverted(tmp_path, domains, daemon_factory)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="the chain change")
    assert entry["result"] == "unproven", entry
    assert f"{base} was not written since the last look" in entry["error"], entry
    assert set(entry["untrusted"]) == {"cp0", "cp1"}, entry
    filled = daemon.wait_for(is_for(dom, "checkpoint_filled"), what="cp0 filled")
    assert filled["bitmaps"] == ["cp0"], filled
    assert "cp1" not in bitmap_names(base)  # nothing made from D's bits
    seen = status(daemon, dom.name())
    assert (seen["cp0"]["state"], seen["cp0"]["next_backup"]) == (
        "usable",
        "complete: the whole disk",
    ), seen["cp0"]
    assert "nothing proves" in seen["cp0"]["reason"], seen["cp0"]
    assert seen["cp1"]["state"] == "missing", seen["cp1"]  # nowhere in the chain now
    assert seen["cp1"]["next_backup"] == "refused by libvirt"
    assert dirty_extents(base, "cp0") == WHOLE_DISK
    assert refused_offline(base, "cp1")

    dom.create()
    assert backup_extents(dom, tmp_path / "b", "cp0") == WHOLE_DISK
    assert "cp1" in backup_refusal(dom, tmp_path / "b", "cp1")
    stop_gracefully(dom)


def qmp(dom: Any, command: str, **arguments: Any) -> Any:
    message = {"execute": command, "arguments": arguments} if arguments else {"execute": command}
    return json.loads(virsh("qemu-monitor-command", dom.name(), json.dumps(message)))["return"]


def test_a_quarantined_bitmap_made_recording_again_is_disabled_at_the_next_rescan(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """cp0, quarantined after the revert, is made recording again in the running domain's
    QEMU (`block-dirty-bitmap-enable`: no event, nothing in the image file or the XML).  The
    next periodic rescan reads the disk anyway, as it does every running disk holding a
    bitmap the daemon distrusts, and disables it again: libvirt refuses cp0 once more.  (With
    the default policy cp0 is filled instead, and stays complete whatever records it.)"""
    disable = ("--untrusted", "disable")
    dom, daemon, _ = reverted(tmp_path, domains, daemon_factory, disable, rescan_interval=2)
    daemon.wait_for(is_for(dom, "checkpoint_quarantined"), what="cp0 quarantined")
    dom.create()
    rescan_now(daemon, "the running domain seen")
    node = qmp(dom, "query-block")[0]["inserted"]["node-name"]
    qmp(dom, "block-dirty-bitmap-enable", node=node, name="cp0")
    mark = len(daemon.entries())
    again = entry_after(
        daemon, mark, is_for(dom, "checkpoint_quarantined"), "cp0 quarantined again", timeout=20
    )
    assert again["bitmaps"] == ["cp0"], again
    assert "checkpoint inconsistent" in backup_refusal(dom, tmp_path / "b", "cp0")
    stop_gracefully(dom)


def test_a_commit_after_which_the_domain_ran_on_the_base_is_not_trusted(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """While the daemon is down: `qemu-img commit -d` of the active top T into B, the domain
    pointed at B, booted, written into B (which lacks cp1), shut off.  The daemon starts: B was
    written, but the domain also started since its last look, and B was its top, so what it
    wrote is in no bitmap.  cp1 is untrusted; libvirt and qemu-nbd refuse it."""
    folder, base, dom, daemon = running_on_new_image(tmp_path, domains, daemon_factory, "b.qcow2")
    top = folder / "t.qcow2"
    snapshot(dom, top)
    daemon.wait_for(is_for(dom, "chain_changed"), what="the snapshot seen")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 3 * MiB, K64, 0x44)
    stop_gracefully(dom)
    rescan_now(daemon, "a look at rest")
    assert daemon.stop() == 0

    run("qemu-img", "commit", "-q", "-d", "-b", str(base), str(top))
    dom = redefine_on(domains, dom, base)
    dom.create()
    guest_write(dom, 20 * MiB, K64, 0x55)  # into B: in no bitmap
    stop_gracefully(dom)
    daemon.start("--snapshot-watch-interval", "1")

    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="the commit found")
    assert entry["result"] == "unproven", entry
    assert "the domain started since the last look" in entry["error"], entry
    assert "cp1" in entry["untrusted"], entry
    assert status(daemon, dom.name())["cp1"]["next_backup"] == "refused by libvirt"
    assert refused_offline(base, "cp1")
    dom.create()
    assert "cp1" in backup_refusal(dom, tmp_path / "b", "cp1")
    stop_gracefully(dom)
