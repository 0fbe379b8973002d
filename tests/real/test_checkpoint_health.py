"""Checkpoints a backup can trust, on a real libvirtd with OS-less QEMU VMs, proved by libvirt's
own pull-mode backups: a quarantined checkpoint (the "disable" policy, or where filling fails;
filling itself is in test_fill.py) is refused, a full backup and a later checkpoint still work,
and `virt-bitmapd status` says so beforehand.

Checkpoints are libvirt's (virsh checkpoint-create-as); guest writes go through QEMU's device
backend, so the recording bitmaps mark them as they would a guest's.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from helpers.backups import backup_extents, backup_refusal, begin_backup
from helpers.images import (
    K64,
    MiB,
    add_bitmap,
    bitmaps,
    create,
    dirty_extents,
    expected,
    run,
    write,
)
from helpers.libvirt_env import Domains, stop_gracefully, virsh
from helpers.scenarios import (
    checkpoint_status as status,
)
from helpers.scenarios import (
    cp1_lost_at_rest,
    entry_after,
    guest_write,
    is_for,
    merged_while_down,
    redefine_checkpoint,
    redefine_on,
    rescan_now,
    snapshot,
)

pytestmark = pytest.mark.real

CLI = [sys.executable, "-m", "virt_bitmapd.cli"]


def flags(path: Path) -> dict[str, list[str]]:
    return {str(b["name"]): [str(flag) for flag in b["flags"]] for b in bitmaps(path)}  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(port: int, line_start: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_committed_layers_deleted_quarantine_the_checkpoint_and_libvirt_refuses_it(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A cold merge whose committed layer is deleted before its bits reach the base: the daemon
    cannot prove cp1 complete, so (policy "disable") it disables cp1 (at rest, one
    transaction).  libvirt then refuses an incremental backup from cp1, while a full backup and
    a checkpoint taken later still work, and the later one's backup holds every block written
    since."""
    port = free_port()
    options = (
        "--snapshot-watch-interval",
        "1",
        f"--metrics-listen=127.0.0.1:{port}",
        "--untrusted",
        "disable",
    )
    daemon = daemon_factory(roots=[tmp_path / "images"])
    dom, base = cp1_lost_at_rest(tmp_path, domains, daemon, options)
    s1 = tmp_path / "images" / "s1.qcow2"
    daemon.start(*options)

    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "unrecoverable" and "cp1" in entry["untrusted"], entry
    quarantined = daemon.wait_for(is_for(dom, "checkpoint_quarantined"), what="quarantine")
    assert quarantined["bitmaps"] == ["cp1"], quarantined
    health = daemon.wait_for(
        is_for(dom, "checkpoint_health", checkpoint="cp1", state="untrusted"), what="health"
    )
    assert health["next_backup"] == "refused by libvirt", health
    assert flags(base)["cp1"] == []  # disabled: no "auto" (recording) flag
    assert metric(port, f'virt_bitmapd_checkpoints{{domain="{dom.name()}",state="untrusted"}}')
    assert metric(port, 'virt_bitmapd_quarantines_total{result="disabled"}') == 1.0
    seen = status(daemon, dom.name())["cp1"]
    assert (seen["state"], seen["next_backup"]) == ("untrusted", "refused by libvirt")
    assert "quarantined" in seen["reason"] and str(s1) in seen["reason"]

    dom.create()
    refusal = backup_refusal(dom, tmp_path / "backup", "cp1")
    assert "checkpoint inconsistent" in refusal and "cp1" in refusal
    backup_extents(dom, tmp_path / "backup", None)  # a full backup still works
    virsh("checkpoint-create-as", dom.name(), "cp2", "--diskspec", "vda")
    guest_write(dom, 7 * MiB, 2 * K64, 0x33)
    assert backup_extents(dom, tmp_path / "backup", "cp2") == expected([(7 * MiB, 2 * K64)])
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(is_for(dom, "checkpoint_health", checkpoint="cp2", state="usable"))
    assert status(daemon, dom.name())["cp2"]["next_backup"] == "safe"
    stop_gracefully(dom)


def test_the_layer_a_checkpoint_was_taken_on_gone_without_its_bits_is_never_safe(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """Issue 12's maintenance while the daemon is stopped, with the committed file deleted:
    cp2 is taken on s1, s1 is committed into T without its bitmap and deleted, s2 rebased onto
    T.  cp2 then lives only in s2, which libvirt accepts: a backup from it misses s1's writes.
    With `--untrusted report` the daemon and `status` say so ("would miss data", and libvirt
    does start that backup); with the policy "disable" the running domain's cp2 is disabled
    through its QEMU and libvirt refuses it.  Taking cp2 again under its name trusts it anew."""
    folder = tmp_path / "images"
    folder.mkdir()
    t, s1, s2 = folder / "t.qcow2", folder / "s1.qcow2", folder / "s2.qcow2"
    create(t)
    dom = domains.define(t, start=True)
    daemon = daemon_factory(roots=[folder]).start("--snapshot-watch-interval", "0")
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    assert daemon.stop() == 0

    snapshot(dom, s1)
    virsh("checkpoint-create-as", dom.name(), "cp2", "--diskspec", "vda")
    guest_write(dom, 30 * MiB, 2 * K64, 0x5A)  # only in s1: lost with it
    snapshot(dom, s2)
    guest_write(dom, 50 * MiB, K64, 0x5C)
    stop_gracefully(dom)
    run("qemu-img", "commit", "-q", "-d", "-b", str(t), str(s1))
    run("qemu-img", "rebase", "-q", "-u", "-b", str(t), "-F", "qcow2", str(s2))
    s1.unlink()
    dom = redefine_on(domains, dom, s2)
    dom.create()

    daemon.start("--untrusted", "report", "--snapshot-watch-interval", "0")
    health = daemon.wait_for(is_for(dom, "checkpoint_health", checkpoint="cp2"), what="health")
    assert (health["state"], health["next_backup"]) == ("untrusted", "would miss data"), health
    assert str(s1) in health["reason"]
    seen = status(daemon, dom.name())["cp2"]
    assert (seen["state"], seen["next_backup"]) == ("untrusted", "would miss data")
    # The hole is real: libvirt starts that backup, and it lacks s1's blocks.
    hole = backup_extents(dom, tmp_path / "backup", "cp2")
    assert hole == expected([(50 * MiB, K64)])
    assert daemon.stop() == 0
    assert not any(e.get("event") == "checkpoint_quarantined" for e in daemon.entries())

    daemon.start("--untrusted", "disable", "--snapshot-watch-interval", "0")
    quarantined = daemon.wait_for(is_for(dom, "checkpoint_quarantined"), what="quarantine")
    assert quarantined["bitmaps"] == ["cp2"]
    refusal = backup_refusal(dom, tmp_path / "backup", "cp2")
    assert "checkpoint inconsistent" in refusal
    assert status(daemon, dom.name())["cp2"]["next_backup"] == "refused by libvirt"

    # Deleting the checkpoint and taking it again ends the quarantine, and is not undone.
    virsh("checkpoint-delete", dom.name(), "cp2")
    virsh("checkpoint-create-as", dom.name(), "cp2", "--diskspec", "vda")
    guest_write(dom, 60 * MiB, K64, 0x66)
    daemon.signal(signal.SIGHUP)
    again = daemon.wait_for(
        is_for(dom, "checkpoint_health", checkpoint="cp2", state="usable"), what="cp2 trusted"
    )
    assert again["previous_state"] == "untrusted"
    assert backup_extents(dom, tmp_path / "backup", "cp2") == expected([(60 * MiB, K64)])
    stop_gracefully(dom)
    daemon.stop()
    assert [
        e["bitmaps"] for e in daemon.entries() if e.get("event") == "checkpoint_quarantined"
    ] == [["cp2"]]


def overlay_without_bitmaps(
    tmp_path: Path, domains: Domains, daemon_factory: Any, *extra: str
) -> tuple[Any, Any, Path, list[tuple[int, int]]]:
    """A domain with checkpoint cp1 on base, then (shut off) an overlay made with qemu-img,
    which copies no bitmap, written to by the guest: libvirt refuses cp1 ("not in the top").
    The daemon disables what it distrusts rather than filling it (by default the running top
    would get cp1 filled, see test_fill.py).  Returns the domain (shut off), the daemon, the
    overlay and every write since cp1."""
    folder = tmp_path / "images"
    folder.mkdir()
    base, overlay = folder / "base.qcow2", folder / "o.qcow2"
    create(base)
    dom = domains.define(base, start=True)
    daemon = daemon_factory(roots=[folder]).start(
        "--snapshot-watch-interval", "0", "--untrusted", "disable", *extra
    )
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    writes = [(1 * MiB, K64)]
    guest_write(dom, 1 * MiB, K64, 0x11)
    stop_gracefully(dom)
    create(overlay, backing=base)
    dom = redefine_on(domains, dom, overlay)
    dom.create()
    for offset, length, pattern in [(5 * MiB, 3 * K64 + 512, 0x22), (40 * MiB, 4096, 0x33)]:
        guest_write(dom, offset, length, pattern)
        writes.append((offset, length))
    refusal = backup_refusal(dom, tmp_path / "backup", "cp1")
    assert "missing or broken bitmap" in refusal
    stop_gracefully(dom)
    return dom, daemon, overlay, writes


def test_heal_rebuilds_a_missing_copy_and_libvirt_backs_up_every_written_block(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    dom, daemon, overlay, writes = overlay_without_bitmaps(tmp_path, domains, daemon_factory)
    assert daemon.stop() == 0  # a look of its own could hold the image while heal opens it
    seen = status(daemon, dom.name())["cp1"]
    assert (seen["state"], seen["next_backup"]) == ("broken", "refused by libvirt")
    assert f"healable at rest: virt-bitmapd heal {overlay}" in seen["reason"]
    heal = [*CLI, "heal", str(overlay), "--config", str(daemon.config)]
    dry = subprocess.run([*heal, "--dry-run"], capture_output=True, text=True, check=False)
    assert dry.returncode == 0 and "planned" in dry.stdout and "cp1" not in flags(overlay)
    done = subprocess.run([*heal, "--json"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["healed"] == [
        {"image": str(overlay), "bitmap": "cp1", "granularity": K64}
    ]
    assert status(daemon, dom.name())["cp1"]["next_backup"] == "safe"
    # the healed copy holds what its own layer allocates; the daemon's next look merges the
    # base's copy into it, for an offline export that takes the top's copy alone
    daemon.start()
    daemon.wait_for(is_for(dom, "checkpoints_united"), what="the healed top united")
    assert dirty_extents(overlay, "cp1") == expected(writes)
    assert daemon.stop() == 0
    dom.create()
    assert backup_extents(dom, tmp_path / "backup", "cp1") == expected(writes)
    stop_gracefully(dom)


def test_the_daemon_heals_at_rest_by_policy(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    dom, daemon, overlay, writes = overlay_without_bitmaps(
        tmp_path, domains, daemon_factory, "--heal"
    )
    daemon.signal(signal.SIGHUP)
    healed = daemon.wait_for(is_for(dom, "checkpoint_healed"), what="healed")
    assert healed["bitmaps"] == ["cp1"] and healed["images"] == [str(overlay)]
    daemon.wait_for(is_for(dom, "checkpoints_united"), what="the healed top united")
    assert dirty_extents(overlay, "cp1") == expected(writes)  # in the same look
    dom.create()
    assert backup_extents(dom, tmp_path / "backup", "cp1") == expected(writes)
    stop_gracefully(dom)
    daemon.stop()
    assert not [e for e in daemon.entries() if e.get("event") == "heal_failed"]


def test_a_block_copy_keeps_its_checkpoints_trusted(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """`virsh blockcopy --shallow --pivot` replaces the top (the layer cp2 was taken on) by a
    copy to which libvirt gives its bitmaps: no checkpoint is distrusted or quarantined, and
    libvirt's backups from both checkpoints still hold every block written since."""
    folder = tmp_path / "images"
    folder.mkdir()
    base, s1, dest = folder / "base.qcow2", folder / "s1.qcow2", folder / "dest.qcow2"
    create(base)
    dom = domains.define(base, start=True)
    daemon = daemon_factory(roots=[folder]).start("--snapshot-watch-interval", "1")
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    snapshot(dom, s1)
    daemon.wait_for(is_for(dom, "chain_changed"), what="the snapshot seen")
    virsh("checkpoint-create-as", dom.name(), "cp2", "--diskspec", "vda")
    guest_write(dom, 2 * MiB, K64, 0x22)
    virsh(
        "blockcopy", dom.name(), "vda", str(dest), "--shallow", "--wait", "--pivot",
        "--transient-job",
    )  # fmt: skip
    copied = daemon.wait_for(is_for(dom, "chain_changed"), what="the copy seen")
    assert copied["chain"] == [str(dest), str(base)], copied
    guest_write(dom, 3 * MiB, K64, 0x33)
    seen = status(daemon, dom.name())
    assert (seen["cp1"]["next_backup"], seen["cp2"]["next_backup"]) == ("safe", "safe"), seen
    backups = tmp_path / "backup"
    assert backup_extents(dom, backups, "cp2") == expected([(2 * MiB, K64), (3 * MiB, K64)])
    assert backup_extents(dom, backups, "cp1") == expected(
        [(1 * MiB, K64), (2 * MiB, K64), (3 * MiB, K64)]
    )
    stop_gracefully(dom)
    daemon.stop()
    unwanted = ("checkpoint_quarantined", "reconciliation")
    assert not [
        e for e in daemon.entries() if is_for(dom, e.get("event", ""))(e) and e["event"] in unwanted
    ]
    assert not [e for e in daemon.entries() if e.get("state") == "untrusted"]


def lose_s1(t: Path, s1: Path, s2: Path) -> None:
    """s1 committed into t, which lacks the checkpoint's bitmap, and deleted; s2 onto t."""
    run("qemu-img", "commit", "-q", "-d", "-b", str(t), str(s1))
    run("qemu-img", "rebase", "-q", "-u", "-b", str(t), "-F", "qcow2", str(s2))
    s1.unlink()


def taken_on_s1(folder: Path) -> tuple[Path, Path, Path]:
    """t <- s1 (cp9 born here, a write after it) <- s2 (cp9 continued, a write)."""
    t, s1, s2 = folder / "t.qcow2", folder / "s1.qcow2", folder / "s2.qcow2"
    create(t)
    create(s1, backing=t)
    add_bitmap(s1, "cp9")
    write(s1, 30 * MiB, K64, 0x5A)  # after the checkpoint: only in s1's copy
    create(s2, backing=s1)
    add_bitmap(s2, "cp9")
    write(s2, 50 * MiB, K64, 0x5C)
    return t, s1, s2


def test_a_checkpoint_nothing_says_where_it_was_taken_is_not_trusted(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """Redefined without <domain>, and the daemon never saw where it was taken: its birth
    layer may be gone without its bits (here it is), so it is not trusted, nor healed."""
    folder = tmp_path / "images"
    folder.mkdir()
    t, s1, s2 = taken_on_s1(folder)
    lose_s1(t, s1, s2)
    dom = domains.define(s2)
    redefine_checkpoint(dom, tmp_path, "cp9", 1_700_000_000)
    # the hole is real: the one copy left (what an offline backup exports) lacks s1's write
    assert dirty_extents(s2, "cp9") == expected([(50 * MiB, K64)])
    daemon = daemon_factory(roots=[folder]).start("--untrusted", "report", "--heal")
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    seen = status(daemon, dom.name())["cp9"]
    assert (seen["state"], seen["next_backup"]) == ("untrusted", "would miss data"), seen
    assert "<domain>" in seen["reason"]
    assert not any(e.get("event") == "checkpoint_healed" for e in daemon.entries())


def test_where_a_checkpoint_was_taken_is_remembered_through_a_redefinition(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """oVirt redefines its checkpoints without <domain> whenever a VM starts.  The daemon
    remembers where each was taken while libvirt said it, so a redefined checkpoint is not
    distrusted for want of proof; and once its birth layer is lost while the daemon is
    stopped, it is untrusted all the same."""
    folder = tmp_path / "images"
    folder.mkdir()
    t, s1, s2 = taken_on_s1(folder)
    dom = redefine_on(domains, domains.define(s2), s2)
    on_s1 = redefine_on(domains, dom, s1).XMLDesc(0)  # the domain as the checkpoint saw it
    dom = redefine_on(domains, dom, s2)
    redefine_checkpoint(dom, tmp_path, "cp9", 1_700_000_000, domain=on_s1)
    daemon = daemon_factory(roots=[folder]).start("--untrusted", "report")
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    assert status(daemon, dom.name())["cp9"]["state"] == "usable"
    redefine_checkpoint(dom, tmp_path, "cp9", 1_700_000_000)  # the VM started again
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("rescan_finished", trigger="manual")
    assert status(daemon, dom.name())["cp9"]["state"] == "usable"
    assert daemon.stop() == 0
    lose_s1(t, s1, s2)
    daemon.start("--untrusted", "report")
    health = daemon.wait_for(is_for(dom, "checkpoint_health", checkpoint="cp9"), what="health")
    assert (health["state"], health["next_backup"]) == ("untrusted", "would miss data"), health
    assert str(s1) in health["reason"]


def untrusted_cp1(
    tmp_path: Path, domains: Domains, daemon_factory: Any, *options: str
) -> tuple[Any, Any, Path]:
    """A running domain on base whose cp1 the daemon distrusts: cp1 was continued in s1, which
    was committed into base without its bits and deleted while the daemon was stopped."""
    folder = tmp_path / "images"
    folder.mkdir()
    base, s1 = folder / "base.qcow2", folder / "s1.qcow2"
    create(base)
    dom = domains.define(base, start=True)
    daemon = daemon_factory(roots=[folder]).start(*options)
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    snapshot(dom, s1)
    daemon.wait_for(is_for(dom, "chain_changed"), what="the snapshot seen")
    guest_write(dom, 3 * MiB, K64, 0x22)  # only in s1, lost with it
    dom = merged_while_down(domains, dom, daemon, base, s1)
    daemon.start(*options)
    daemon.wait_for(is_for(dom, "checkpoint_health", state="untrusted"), what="distrust")
    dom.create()
    return dom, daemon, folder


def test_distrust_survives_a_restart_while_a_copy_job_mirrors(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A daemon that starts while a block copy mirrors sees the job's own (unnamed) bitmap on
    the top layer: that is no reason to take the layer for one holding no bitmaps and forgive
    what it distrusts.  After the pivot, libvirt's copy of the checkpoint's bitmap is still
    untrusted (reported here, not quarantined, so that libvirt copies it).  Nothing but a new
    checkpoint or its deletion ends distrust."""
    report = ("--untrusted", "report", "--snapshot-watch-interval", "1")
    dom, daemon, folder = untrusted_cp1(tmp_path, domains, daemon_factory, *report)
    dest = folder / "dest.qcow2"
    virsh("blockcopy", dom.name(), "vda", str(dest), "--wait", "--transient-job")  # mirroring
    assert daemon.stop() == 0
    mark = len(daemon.entries())
    daemon.start(*report)
    entry_after(
        daemon,
        mark,
        lambda e: e.get("event") == "rescan_finished" and e["trigger"] == "startup",
        "the looks while the copy mirrors",
    )
    virsh("blockjob", dom.name(), "vda", "--pivot")
    entry_after(
        daemon,
        mark,
        lambda e: is_for(dom, "chain_changed")(e) and e["chain"][0] == str(dest),
        "the copy seen",
    )
    seen = status(daemon, dom.name())["cp1"]
    assert (seen["state"], seen["next_backup"]) == ("untrusted", "would miss data"), seen
    stop_gracefully(dom)


def test_distrust_survives_a_look_during_a_backup(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """During a backup job the bitmaps may look gone (libvirt rearranges the disk's nodes):
    a look then forgives nothing, and the quarantined checkpoint is still refused after."""
    dom, daemon, _ = untrusted_cp1(tmp_path, domains, daemon_factory, "--untrusted", "disable")
    virsh("checkpoint-create-as", dom.name(), "cp0", "--diskspec", "vda")  # a good one
    begin_backup(dom, tmp_path / "backup", "cp0", "cp2")
    try:
        rescan_now(daemon, "a look during the backup")
        assert status(daemon, dom.name())["cp1"]["state"] == "busy"
    finally:
        virsh("domjobabort", dom.name())
    rescan_now(daemon, "a look after the backup")
    seen = status(daemon, dom.name())["cp1"]
    assert (seen["state"], seen["next_backup"]) == ("untrusted", "refused by libvirt"), seen
    stop_gracefully(dom)


def test_a_checkpoint_is_busy_while_a_backup_job_runs_and_nothing_is_said(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A pull-mode backup is a block job on the disk: while it runs, `status` says busy (the
    job named) and the daemon's looks log no health warning and no hint; once it has ended,
    the checkpoint is what it was, and no change is told."""
    folder = tmp_path / "images"
    folder.mkdir()
    base = folder / "base.qcow2"
    create(base)
    dom = domains.define(base, start=True)
    daemon = daemon_factory(roots=[folder]).start()
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    virsh("checkpoint-create-as", dom.name(), "cp1", "--diskspec", "vda")
    guest_write(dom, 1 * MiB, K64, 0x11)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(is_for(dom, "checkpoint_health", checkpoint="cp1"), what="cp1 seen")
    mark = len(daemon.entries())
    begin_backup(dom, tmp_path / "backup", "cp1", "cp2")
    try:
        rescan_now(daemon, "the looks during the backup")  # a look while the job runs
        during = status(daemon, dom.name())
        assert {name: entry["state"] for name, entry in during.items()} == {
            "cp1": "busy",
            "cp2": "busy",
        }, during
        assert during["cp1"]["next_backup"] == "judged when the job ends"
        assert "backup job" in during["cp1"]["reason"]
    finally:
        virsh("domjobabort", dom.name())
    daemon.signal(signal.SIGHUP)
    entry_after(
        daemon,
        mark,
        lambda e: e.get("event") == "block_job_event" and e["job_type"] == "backup",
        "the backup's end",
    )
    rescan_now(daemon, "a look after the backup")
    assert status(daemon, dom.name())["cp1"]["state"] == "usable"
    told = [
        e
        for e in daemon.entries()[mark:]
        if e.get("event") == "checkpoint_health" and e.get("checkpoint") == "cp1"
    ]
    assert told == [], [(e.get("state"), e.get("previous_state"), e.get("reason")) for e in told]
    assert not [e for e in daemon.entries()[mark:] if e.get("level") == "warning"]
    stop_gracefully(dom)
