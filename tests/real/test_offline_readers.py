"""Readers that export one copy of a bitmap, on a real libvirtd with OS-less QEMU VMs.

Offline backup tools (virtnbdbackup, OpenNebula) run `qemu-nbd -r --bitmap=NAME TOP` on a
shut-off domain's disk: QEMU exports the top-most copy of the bitmap, never the union of its
copies over the chain, which is what libvirt's backup API merges.  After a snapshot the top's
copy holds only what was written since, so the daemon merges the copies below into the top's
after every chain change, live or at rest; then every reader gets every bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers.backups import backup_extents
from helpers.images import K64, MiB, dirty_extents, expected
from helpers.libvirt_env import Domains, stop_gracefully, virsh
from helpers.scenarios import entry_after, guest_write, is_for, running_on_new_image, snapshot

pytestmark = pytest.mark.real

WRITES = [(1 * MiB, K64), (6 * MiB, 2 * K64), (12 * MiB, K64)]


def test_a_snapshot_of_a_running_domain_leaves_the_top_holding_every_bit(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """cp1 on base, written, a snapshot s1 (libvirt makes an empty cp1 in s1), written again,
    shut off: `qemu-nbd --bitmap=cp1 s1` exports both writes, as libvirt's backup does."""
    folder, _, dom, daemon = running_on_new_image(tmp_path, domains, daemon_factory, "base.qcow2")
    s1 = folder / "s1.qcow2"
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, *WRITES[0], 0x11)
    mark = len(daemon.entries())
    snapshot(dom, s1)
    entry_after(daemon, mark, is_for(dom, "checkpoints_united"), "cp1 united in s1")
    guest_write(dom, *WRITES[1], 0x22)
    assert backup_extents(dom, tmp_path / "b", "cp1") == expected(WRITES[:2])
    stop_gracefully(dom)
    assert dirty_extents(s1, "cp1") == expected(WRITES[:2])


def test_a_chain_grown_while_the_daemon_was_down_is_united_at_rest(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """The daemon stopped; two snapshots with writes between; the domain shut off.  At its
    start the daemon finds the chain grown and merges the copies below into the top's, in one
    qemu-storage-daemon transaction: the offline export of cp1 and cp2 holds every write."""
    folder, _, dom, daemon = running_on_new_image(tmp_path, domains, daemon_factory, "base.qcow2")
    s1, s2 = folder / "s1.qcow2", folder / "s2.qcow2"
    assert daemon.stop() == 0
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, *WRITES[0], 0x11)
    snapshot(dom, s1)
    virsh("checkpoint-create-as", dom.name(), "cp2", "--diskspec", "vda")
    guest_write(dom, *WRITES[1], 0x22)
    snapshot(dom, s2)
    guest_write(dom, *WRITES[2], 0x33)
    stop_gracefully(dom)
    assert dirty_extents(s2, "cp1") == expected(WRITES[2:])  # what a reader got before

    daemon.start("--snapshot-watch-interval", "1")
    united = daemon.wait_for(is_for(dom, "checkpoints_united"), what="the chain united")
    assert sorted(united["bitmaps"]) == ["cp1", "cp2"] and united["image"] == str(s2)
    assert dirty_extents(s2, "cp1") == expected(WRITES)
    assert dirty_extents(s2, "cp2") == expected(WRITES[1:])
    dom.create()  # libvirt's view is unchanged: the same blocks, no more
    assert backup_extents(dom, tmp_path / "b", "cp1") == expected(WRITES)
    assert backup_extents(dom, tmp_path / "b", "cp2") == expected(WRITES[1:])
    stop_gracefully(dom)
