"""A checkpoint whose bits cannot be proven complete gets every bit set, on a real libvirtd with
OS-less QEMU VMs: libvirt's incremental backup and the offline export (`qemu-nbd --bitmap`) both
copy the whole disk, nobody is refused, and the checkpoint stays usable afterwards.  At rest
through qemu-storage-daemon, live through the domain's QEMU; a bitmap an earlier version
disabled is filled and records again; where filling fails, it is disabled (libvirt refuses it).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from helpers.backups import backup_extents, backup_refusal
from helpers.images import K64, MiB, bitmaps, create, dirty_extents, expected, run
from helpers.libvirt_env import DaemonProcess, Domains, stop_gracefully, virsh
from helpers.scenarios import checkpoint_status as status
from helpers.scenarios import cp1_lost_at_rest, entry_after, guest_write, is_for, redefine_on
from helpers.stand_ins import crashing_path

pytestmark = pytest.mark.real

DISK = 64 * MiB  # helpers.images.create's default size
WHOLE_DISK = [(0, DISK)]


def recording(path: Path) -> dict[str, bool]:
    """Each bitmap of ``path``: whether it records (its "auto" flag)."""
    return {str(b["name"]): "auto" in b["flags"] for b in bitmaps(path)}  # type: ignore[operator]


def new_images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return create(folder / "base.qcow2")


def test_a_checkpoint_that_cannot_be_proved_is_filled_at_rest_and_every_reader_gets_it_all(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    daemon = daemon_factory(roots=[tmp_path / "images"])
    dom, base = cp1_lost_at_rest(tmp_path, domains, daemon)
    daemon.start()
    filled = daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    assert filled["bitmaps"] == ["cp1"] and filled["image"] == str(base), filled
    assert "s1.qcow2" in filled["reasons"]["cp1"], filled
    assert recording(base)["cp1"]
    # the offline reader (virtnbdbackup, OpenNebula) and libvirt's backup: the whole disk
    assert dirty_extents(base, "cp1") == WHOLE_DISK
    seen = status(daemon, dom.name())["cp1"]
    assert (seen["state"], seen["next_backup"]) == ("usable", "complete: the whole disk"), seen
    assert seen["reason"].startswith("filled because ") and "s1.qcow2" in seen["reason"]
    dom.create()
    assert backup_extents(dom, tmp_path / "backup", "cp1") == WHOLE_DISK
    # the checkpoint records on: a later checkpoint is exact, the filled one still complete
    virsh("checkpoint-create-as", dom.name(), "cp2", "--diskspec", "vda")
    guest_write(dom, 7 * MiB, K64, 0x33)
    assert backup_extents(dom, tmp_path / "backup", "cp2") == expected([(7 * MiB, K64)])
    assert backup_extents(dom, tmp_path / "backup", "cp1") == WHOLE_DISK
    stop_gracefully(dom)
    # filled once: a restarted daemon remembers it and says it is complete
    daemon.stop()
    mark = len(daemon.entries())
    daemon.start()
    entry_after(daemon, mark, is_for(dom, "look_done"), "the restarted daemon's look")
    after = daemon.entries()[mark:]
    assert not [e for e in after if e.get("event") in ("checkpoint_filled", "fill_failed")]
    assert status(daemon, dom.name())["cp1"]["next_backup"] == "complete: the whole disk"


def test_a_bitmap_an_earlier_version_disabled_is_filled_live_and_records_again(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """Quarantined the old way (disabled: libvirt refuses it, qemu-nbd exports it short), then
    the domain runs and a daemon that fills starts: the bitmap is filled through the domain's
    QEMU and records again, and libvirt's backup from it holds the whole disk."""
    daemon = daemon_factory(roots=[tmp_path / "images"])
    dom, base = cp1_lost_at_rest(tmp_path, domains, daemon, ("--untrusted", "disable"))
    daemon.start("--untrusted", "disable")
    daemon.wait_for(is_for(dom, "checkpoint_quarantined"), what="the quarantine")
    daemon.stop()
    assert not recording(base)["cp1"]
    dom.create()
    assert "checkpoint inconsistent" in backup_refusal(dom, tmp_path / "backup", "cp1")
    mark = len(daemon.entries())
    daemon.start()
    filled = daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    assert filled["bitmaps"] == ["cp1"] and filled["image"] == str(base), filled
    assert not [e for e in daemon.entries()[mark:] if e.get("event") == "fill_failed"]
    nodes = json.loads(
        virsh("qemu-monitor-command", dom.name(), '{"execute": "query-named-block-nodes"}')
    )["return"]
    copies = [b for n in nodes for b in n.get("dirty-bitmaps", []) if b.get("name") == "cp1"]
    assert copies and all(b["recording"] and b["count"] == DISK for b in copies), copies
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("vbd-")]
    assert backup_extents(dom, tmp_path / "backup", "cp1") == WHOLE_DISK
    seen = status(daemon, dom.name())["cp1"]
    assert (seen["state"], seen["next_backup"]) == ("usable", "complete: the whole disk"), seen
    stop_gracefully(dom)
    assert recording(base)["cp1"] and dirty_extents(base, "cp1") == WHOLE_DISK


def test_where_filling_fails_the_bitmap_is_disabled_and_libvirt_refuses_it(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """qemu-storage-daemon refuses the fill's copy job: nothing is half-filled, the bitmap is
    disabled instead (libvirt refuses it; an offline export of it would be short, and the error
    says so), and a later look fills it once the tool works."""
    daemon = daemon_factory(roots=[tmp_path / "images"])
    dom, base = cp1_lost_at_rest(tmp_path, domains, daemon)
    daemon.start(env=crashing_path(tmp_path, "refuse:blockdev-backup", "KILL"))
    failed = daemon.wait_for(is_for(dom, "fill_failed"), what="the failed fill")
    assert failed["error_kind"] == "fill_failed" and str(base) in failed["error"], failed
    quarantined = daemon.wait_for(is_for(dom, "checkpoint_quarantined"), what="the quarantine")
    assert quarantined["bitmaps"] == ["cp1"]
    assert not recording(base)["cp1"]
    assert dirty_extents(base, "cp1") != WHOLE_DISK  # what an offline reader would still get
    daemon.stop()
    dom.create()
    assert "checkpoint inconsistent" in backup_refusal(dom, tmp_path / "backup", "cp1")
    stop_gracefully(dom)
    daemon.start()  # the real tool again: the next look fills it
    daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    assert recording(base)["cp1"] and dirty_extents(base, "cp1") == WHOLE_DISK


def overlay_without_bitmaps(
    tmp_path: Path, domains: Domains, daemon: DaemonProcess, *options: str
) -> tuple[Any, Path]:
    """cp1 taken on base and written after; the domain shut off, an overlay made with qemu-img
    (no bitmaps), written to and made the disk's top; the daemon (started with ``options``)
    asked to look.  Returns the domain and the overlay."""
    base = new_images(tmp_path)
    overlay = tmp_path / "images" / "o.qcow2"
    dom = domains.define(base, start=True)
    daemon.start(*options)
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    stop_gracefully(dom)
    create(overlay, backing=base)
    run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x22 5M 64k", str(overlay))
    dom = redefine_on(domains, dom, overlay)
    daemon.signal(signal.SIGHUP)
    return dom, overlay


def test_an_overlay_made_without_the_bitmaps_gets_them_filled_for_single_copy_readers(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """An overlay made with qemu-img (no bitmaps) under a shut-off domain: libvirt refuses cp1,
    but qemu-nbd exports the base's copy, which misses the overlay's writes.  The daemon fills
    cp1 in the overlay: the offline export and libvirt's backup copy the whole disk."""
    daemon = daemon_factory(roots=[tmp_path / "images"])
    dom, overlay = overlay_without_bitmaps(tmp_path, domains, daemon)
    filled = daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    assert filled["bitmaps"] == ["cp1"] and filled["image"] == str(overlay), filled
    assert "holds no copy" in filled["reasons"]["cp1"], filled
    assert dirty_extents(overlay, "cp1") == WHOLE_DISK
    dom.create()
    assert backup_extents(dom, tmp_path / "backup", "cp1") == WHOLE_DISK
    stop_gracefully(dom)


def test_with_healing_on_an_overlay_made_without_the_bitmaps_is_healed_not_filled(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """The same overlay at rest with `--heal`: healing is provable, so cp1 is rebuilt from what
    the overlay allocates (a few blocks more than written, never fewer), not the whole disk."""
    daemon = daemon_factory(roots=[tmp_path / "images"])
    dom, overlay = overlay_without_bitmaps(tmp_path, domains, daemon, "--heal")
    healed = daemon.wait_for(is_for(dom, "checkpoint_healed"), what="the heal")
    assert healed["bitmaps"] == ["cp1"], healed
    assert dirty_extents(overlay, "cp1") == expected([(1 * MiB, K64), (5 * MiB, K64)])
    assert not [e for e in daemon.entries() if e.get("event") == "checkpoint_filled"]


def test_a_fill_left_running_by_a_killed_daemon_is_ended_at_the_next_start(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """What a daemon killed mid-fill leaves in the domain's QEMU: its null nodes and its copy
    job between them (here slowed to a crawl, so it is still running).  The next daemon cancels
    and dismisses the job and deletes the nodes before it looks at anything."""
    dom = domains.define(new_images(tmp_path), start=True)

    def qmp(command: dict[str, Any]) -> Any:
        return json.loads(virsh("qemu-monitor-command", dom.name(), json.dumps(command)))["return"]

    for node in ("vbd-null-dead01", "vbd-sink-dead01"):
        null = {"driver": "null-co", "node-name": node, "size": DISK, "read-zeroes": False}
        qmp({"execute": "blockdev-add", "arguments": null})
    copy = {"job-id": "vbd-fill-dead01", "device": "vbd-null-dead01", "target": "vbd-sink-dead01"}
    slowed = {"sync": "full", "auto-dismiss": False, "speed": 1}  # as the daemon starts it
    qmp({"execute": "blockdev-backup", "arguments": {**copy, **slowed}})
    assert [job["status"] for job in qmp({"execute": "query-jobs"})] == ["running"]
    daemon = daemon_factory(roots=[tmp_path / "images"]).start()
    entry = daemon.wait_for(is_for(dom, "leftovers_removed"), what="the leftovers removed")
    assert entry["jobs"] == ["vbd-fill-dead01"] and entry["failures"] == [], entry
    assert sorted(entry["nodes"]) == ["vbd-null-dead01", "vbd-sink-dead01"], entry
    assert qmp({"execute": "query-jobs"}) == []
    nodes = qmp({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("vbd-")]
    stop_gracefully(dom)
