"""A day of a host's life, backed up by contrib/virtnbdbackup-checked (Debian's virtnbdbackup
behind ``virt-bitmapd check``) on a real libvirtd: snapshots, a live merge, a merge made while
the daemon was down, a cold merge, online and offline backups.  Every restore equals the disk,
and a full backup is taken only where check said one was needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers.images import K64, MiB, create, run
from helpers.libvirt_env import DaemonProcess, Domains, stop_gracefully, virsh
from helpers.scenarios import guest_write, is_for, merged_while_down, redefine_on, snapshot
from helpers.virtnbdbackup import checked_backup, current_set, restored_equals

pytestmark = pytest.mark.real


def seen(daemon: DaemonProcess, dom: Any, layer: Path) -> None:
    """Wait until a look of the daemon has seen ``layer`` on top of the chain."""
    daemon.wait_for(
        lambda e: is_for(dom, "chain_changed")(e) and e["chain"][0] == str(layer),
        what=f"{layer.name} seen",
    )


def test_a_day_of_snapshots_merges_and_backups_restores_the_disk_every_time(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    base, s1, s2, s3 = (folder / f"{name}.qcow2" for name in ("base", "s1", "s2", "s3"))
    create(base)
    dom = domains.define(base, start=True)
    # quarantine rather than fill what cannot be proved: the day then needs a full backup once
    options = ("--snapshot-watch-interval", "1", "--untrusted", "disable")
    daemon = daemon_factory(roots=[folder]).start(*options)
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    root = tmp_path / "backups"
    taken = []

    def backup() -> None:
        taken.append(checked_backup(dom, root, daemon.config))

    # morning: the first backup (no checkpoint yet), a snapshot with writes on both sides
    guest_write(dom, 1 * MiB, K64, 0x10)
    backup()
    guest_write(dom, 2 * MiB, K64, 0x11)
    snapshot(dom, s1)
    guest_write(dom, 3 * MiB, K64, 0x12)
    backup()
    # noon: the snapshot merged live, and a backup right after it
    virsh("blockcommit", dom.name(), "vda", "--active", "--pivot", "--wait")
    guest_write(dom, 4 * MiB, K64, 0x13)
    backup()
    stop_gracefully(dom)
    assert restored_equals(current_set(root), base, tmp_path)
    first_set = current_set(root)

    # afternoon: a snapshot, then, the daemon down, its layer committed and deleted: what it
    # held since the last checkpoint can no longer be proved to be anywhere
    dom.create()
    snapshot(dom, s2)
    seen(daemon, dom, s2)
    guest_write(dom, 5 * MiB, K64, 0x14)
    dom = merged_while_down(domains, dom, daemon, base, s2)
    daemon.start(*options)
    dom.create()
    backup()  # refused: a full one, a new set, virtnbdbackup.0 taken again
    guest_write(dom, 6 * MiB, K64, 0x15)

    # evening: a snapshot, the domain shut off, the snapshot cold-merged (qemu-img commit, the
    # domain moved down), and an offline backup at once: check must see the merge
    snapshot(dom, s3)
    seen(daemon, dom, s3)  # a cold merge of a layer no look saw cannot be proved
    guest_write(dom, 7 * MiB, K64, 0x16)
    stop_gracefully(dom)
    run("qemu-img", "commit", "-q", str(s3))
    dom = redefine_on(domains, dom, base)
    backup()
    s3.unlink()
    assert current_set(root) != first_set
    assert restored_equals(current_set(root), base, tmp_path)

    assert taken == [(1, "full"), (0, "inc"), (0, "inc"), (1, "full"), (0, "inc")], taken
    # the full deleted the morning's checkpoints; an offline backup takes none
    names = virsh("checkpoint-list", dom.name(), "--name").split()
    assert names == ["virtnbdbackup.0"], names
