"""`virt-bitmapd run` against a real libvirtd and real OS-less QEMU VMs.

Known blocks are written into each layer at rest, before the VM starts (an OS-less guest writes
nothing); checkpoints are recording bitmaps continued in each overlay, as libvirt leaves them.
After the commit the VM is stopped cleanly and the base's dirty extents are read back over NBD.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.images import (
    K64,
    ChainBuilder,
    MiB,
    add_bitmap,
    bitmap_names,
    corrupt,
    create,
    dirty_extents,
    expected,
    filled,
    run,
    state,
    virtual_size,
    write,
)
from helpers.libvirt_env import (
    Domains,
    connect,
    start_libvirtd,
    stop_gracefully,
    virsh,
)
from helpers.scenarios import (
    assert_base_holds_the_data,
    build,
    commit_offline,
    commit_s1_live,
    is_for,
    tracked,
)

pytestmark = pytest.mark.real


def test_live_commit_is_verified_already_consistent(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    commit_s1_live(dom, c)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "already_consistent", entry
    assert entry["trigger"] == "event" and entry["job_type"] == "commit"
    assert entry["removed"] == [str(c.layers[1])] and entry["base"] == str(c.layers[0])
    assert sorted(entry["bitmaps"]) == ["cp1", "cp2"]
    stop_gracefully(dom)
    assert_base_holds_the_data(c)


def test_live_active_commit_with_pivot(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    virsh("blockcommit", dom.name(), "vda", "--active", "--pivot", "--wait")
    events = [
        daemon.wait_for(is_for(dom, "block_job_event", status=s), what=s)
        for s in ("ready", "completed")
    ]
    assert [e["job_type"] for e in events] == ["active_commit", "active_commit"]
    assert events[0]["action"] == "look at the disk before the pivot"
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "already_consistent", entry
    assert entry["removed"] == [str(c.layers[2]), str(c.layers[1])]
    # cp3 was created in the base by libvirt itself: verified too, not mistaken for a gap
    assert sorted(entry["bitmaps"]) == ["cp1", "cp2", "cp3"] and entry["skipped"] == []
    stop_gracefully(dom)
    base = c.layers[0]
    everything = [(0, K64), (2 * MiB, 2 * K64), (9 * MiB, K64)]
    assert dirty_extents(base, "cp1") == expected(everything)
    assert dirty_extents(base, "cp2") == expected(everything[1:])
    assert dirty_extents(base, "cp3") == expected(everything[2:])


def test_snapshot_just_before_an_active_commit_is_part_of_it(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """libvirt sends no event for a snapshot: the layer it made is learnt at the commit's READY,
    so the commit is seen whole and its bitmaps are verified, not skipped."""
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    overlay = tmp_path / "images" / "overlay.qcow2"
    virsh(
        "snapshot-create-as", dom.name(), "--disk-only", "--no-metadata",
        "--diskspec", f"vda,file={overlay}",
    )  # fmt: skip
    virsh("blockcommit", dom.name(), "vda", "--active", "--pivot", "--wait")
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "already_consistent", entry
    assert entry["removed"] == [str(overlay), str(c.layers[2]), str(c.layers[1])]
    assert sorted(entry["bitmaps"]) == ["cp1", "cp2", "cp3"] and entry["skipped"] == [], entry
    stop_gracefully(dom)
    everything = [(0, K64), (2 * MiB, 2 * K64), (9 * MiB, K64)]
    assert dirty_extents(c.layers[0], "cp3") == expected(everything[2:])


def test_snapshots_are_learnt_so_a_later_commit_of_them_is_seen_whole(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A non-active commit has no READY: the directory watch must have learnt its top before."""
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    first, second = tmp_path / "images" / "u1.qcow2", tmp_path / "images" / "u2.qcow2"
    virsh(
        "snapshot-create-as", dom.name(), "--disk-only", "--no-metadata",
        "--diskspec", f"vda,file={first}",
    )  # fmt: skip
    changed = daemon.wait_for(is_for(dom, "chain_changed"), what="snapshot learnt")
    assert changed["chain"][0] == str(first) and changed["trigger"] == "watch", changed
    virsh(
        "snapshot-create-as", dom.name(), "--disk-only", "--no-metadata",
        "--diskspec", f"vda,file={second}",
    )  # fmt: skip
    top, base = str(first), str(c.layers[0])
    virsh("blockcommit", dom.name(), "vda", "--top", top, "--base", base, "--wait")
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "already_consistent" and entry["job_type"] == "commit", entry
    assert entry["removed"] == [str(first), str(c.layers[2]), str(c.layers[1])]
    assert sorted(entry["bitmaps"]) == ["cp1", "cp2", "cp3"] and entry["skipped"] == []


@pytest.mark.parametrize("trigger", ["manual", "rescan"])
def test_offline_commit_while_running_daemon(
    tmp_path: Path, domains: Domains, daemon_factory: Any, trigger: str
) -> None:
    c, dom, daemon = tracked(
        tmp_path,
        domains,
        daemon_factory,
        "--no-watch",  # the directory watch would see it first (test_watch.py)
        running=False,
        rescan_interval=2 if trigger == "rescan" else 3600,
    )
    commit_offline(c)
    if trigger == "manual":
        daemon.signal(signal.SIGHUP)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled", entry
    assert entry["trigger"] == trigger
    assert entry["removed"] == [str(c.layers[1])]
    assert_base_holds_the_data(c)


def test_offline_commit_while_daemon_stopped(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    assert daemon.stop() == 0
    commit_offline(c)
    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled" and entry["trigger"] == "startup", entry
    assert_base_holds_the_data(c)


def test_offline_commit_found_after_the_domain_started_is_repaired_live(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """A cold merge while the daemon was down, then the VM started: the base is held by QEMU
    now, so the missing bitmaps go in through it, with the committed layer attached read-only."""
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    assert daemon.stop() == 0
    commit_offline(c)
    dom.create()
    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled" and entry["trigger"] == "startup", entry
    assert entry["job_type"] == "live" and entry["removed"] == [str(c.layers[1])]
    stop_gracefully(dom)
    assert_base_holds_the_data(c)


@pytest.mark.parametrize("snapshot_first", [False, True], ids=["commit", "snapshot-then-commit"])
def test_live_commit_while_daemon_stopped_is_verified_at_startup(
    tmp_path: Path, domains: Domains, daemon_factory: Any, snapshot_first: bool
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    assert daemon.stop() == 0
    removed = [str(c.layers[2]), str(c.layers[1])]
    if snapshot_first:  # a layer the daemon never saw: found by its file, which backs onto ours
        overlay = tmp_path / "images" / "overlay.qcow2"
        virsh(
            "snapshot-create-as", dom.name(), "--disk-only", "--no-metadata",
            "--diskspec", f"vda,file={overlay}",
        )  # fmt: skip
        removed.insert(0, str(overlay))
    virsh("blockcommit", dom.name(), "vda", "--active", "--pivot", "--wait")
    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "already_consistent" and entry["trigger"] == "startup", entry
    assert entry["removed"] == removed
    assert sorted(entry["bitmaps"]) == ["cp1", "cp2", "cp3"] and entry["skipped"] == []
    stop_gracefully(dom)
    everything = [(0, K64), (2 * MiB, 2 * K64), (9 * MiB, K64)]
    assert dirty_extents(c.layers[0], "cp2") == expected(everything[1:])


def point_disk_at(domains: Domains, dom: Any, old: Path, new: Path) -> Any:
    return domains.conn.defineXML(dom.XMLDesc(0).replace(f"file='{old}'", f"file='{new}'"))


@pytest.mark.parametrize("into", ["s1", "base"])
def test_cold_merge_of_the_active_layer_then_domain_pointed_at_the_base(
    tmp_path: Path, domains: Domains, daemon_factory: Any, into: str
) -> None:
    """oVirt's cold merge of the top volume: qemu-img commit of the active layer, then the
    domain's disk redefined onto the base (the active layer still on disk)."""
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    base, s1, active = c.layers
    target = s1 if into == "s1" else base
    subprocess.run(
        ["qemu-img", "commit", "-q", "-b", str(target), str(active)], check=True, timeout=60
    )
    dom = point_disk_at(domains, dom, active, target)
    daemon.signal(signal.SIGHUP)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled" and entry["base"] == str(target), entry
    assert sorted(entry["bitmaps"]) == ["cp1", "cp2", "cp3"]
    everything = [(0, K64), (2 * MiB, 2 * K64), (9 * MiB, K64)]
    if into == "base":
        assert dirty_extents(base, "cp1") == expected(everything)
        assert dirty_extents(base, "cp2") == expected(everything[1:])
        assert dirty_extents(base, "cp3") == expected(everything[2:])
    else:  # the chain is s1 over base now: the union of the two is what a backup reads
        assert dirty_extents(s1, "cp2") == expected(everything[1:])
        assert dirty_extents(s1, "cp3") == expected(everything[2:])


def unseen_overlay(c: ChainBuilder, name: str, offset: int) -> Path:
    """A snapshot the daemon never saw: made on the active layer, its checkpoints continued as
    libvirt continues them, a new one begun, and a write."""
    overlay = create(c.folder / name, backing=c.layers[-1])
    for bitmap in ("cp1", "cp2", "cp3", "cp4"):
        add_bitmap(overlay, bitmap)
    write(overlay, offset, K64, 0xDD)
    return overlay


def test_unseen_snapshot_committed_while_daemon_stopped_joins_the_commit(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    assert daemon.stop() == 0
    _, s1, active = c.layers
    overlay = unseen_overlay(c, "unseen.qcow2", 20 * MiB)
    dom = point_disk_at(domains, dom, active, overlay)
    run("qemu-img", "commit", "-q", "-b", str(s1), str(overlay))  # overlay + active into s1
    dom = point_disk_at(domains, dom, overlay, s1)
    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled", entry
    assert entry["removed"] == [str(overlay), str(active)] and entry["base"] == str(s1)
    assert dirty_extents(s1, "cp3") == expected([(9 * MiB, K64), (20 * MiB, K64)])
    assert dirty_extents(s1, "cp4") == expected([(20 * MiB, K64)])


def test_two_unseen_snapshots_on_the_committed_top_are_reported_not_guessed(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    assert daemon.stop() == 0
    _, s1, active = c.layers
    first = unseen_overlay(c, "unseen-1.qcow2", 20 * MiB)
    second = unseen_overlay(c, "unseen-2.qcow2", 30 * MiB)
    run("qemu-img", "commit", "-q", "-b", str(s1), str(first))
    dom = point_disk_at(domains, dom, active, s1)
    before = state(s1)
    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "unrecoverable" and entry["level"] == "error", entry
    assert str(first) in entry["error"] and str(second) in entry["error"]
    assert "cp4" in entry["bitmaps"]
    # no bit was guessed into s1 from the layers: its untrusted bitmaps got every bit (filled)
    made_complete = daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    in_s1 = [name for name in entry["untrusted"] if name in before]  # cp3, cp4 went with first
    assert made_complete["bitmaps"] == in_s1 == ["cp1", "cp2"], made_complete
    assert state(s1) == filled(before, in_s1, virtual_size(s1))


def test_committed_layers_already_deleted_is_unrecoverable(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    commit_offline(c)
    c.layers[1].unlink()
    before = state(c.layers[0])
    daemon.signal(signal.SIGHUP)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["level"] == "error" and entry["result"] == "unrecoverable", entry
    # cp2 continues in the active layer and looks valid, but s1's bits of it are lost
    assert entry["disk"] == "vda" and entry["bitmaps"] == ["cp1", "cp2"]
    assert str(c.layers[1]) in entry["error"]
    assert state(c.layers[0]) == before


def test_disk_outside_storage_roots_is_left_alone(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c = build(tmp_path / "elsewhere")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    dom = domains.define(c.active)
    daemon = daemon_factory(roots=[allowed]).start()
    skipped = daemon.wait_for(is_for(dom, "disk_skipped"), what="disk skipped")
    assert "outside the storage roots" in skipped["reason"]
    commit_offline(c)
    before = state(c.layers[0])
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("rescan_requested")
    time.sleep(2)
    assert not [e for e in daemon.entries() if is_for(dom, "reconciliation")(e)]
    assert state(c.layers[0]) == before


def test_reconnects_after_libvirtd_restart(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    # a crash: the VM keeps running, libvirtd reattaches to it when it comes back
    subprocess.run(["pkill", "-KILL", "-x", "libvirtd"], check=True)
    daemon.wait_event("libvirt_connection_lost")
    start_libvirtd()
    daemon.wait_event("libvirt_connected", reconnect=True, timeout=90)
    domains.conn.close()
    conn = domains.conn = connect()
    commit_s1_live(dom, c)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "already_consistent" and entry["trigger"] == "event", entry
    stop_gracefully(conn.lookupByName(dom.name()))
    assert_base_holds_the_data(c)


def test_live_and_offline_commits_leave_identical_bases(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    live = build(tmp_path / "live")
    offline = build(tmp_path / "offline")
    live_dom = domains.define(live.active, start=True)
    offline_dom = domains.define(offline.active)
    daemon = daemon_factory().start()
    for dom in (live_dom, offline_dom):
        daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    commit_s1_live(live_dom, live)
    commit_offline(offline)
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_for(is_for(offline_dom, "reconciliation"))["result"] == "reconciled"
    stop_gracefully(live_dom)
    assert state(live.layers[0]) == state(offline.layers[0])
    assert_base_holds_the_data(offline)


def qmp(dom: Any, command: dict[str, Any]) -> Any:
    return json.loads(virsh("qemu-monitor-command", dom.name(), json.dumps(command)))["return"]


def damage_live_base_bitmap(dom: Any, base: Path, name: str, how: str) -> None:
    """What a failed (and ignored) libvirt bitmap transaction can leave: the base's bitmap
    ``name`` is missing ("remove") or holds none of the committed bits ("clear")."""
    nodes = qmp(dom, {"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    storage = next(n for n in nodes if n["drv"] == "file" and n["file"] == str(base))
    fmt = storage["node-name"].replace("-storage", "-format")
    entry = next(n for n in nodes if n["node-name"] == fmt)
    backing = entry.get("backing_file_depth", 0)
    assert backing == 0, "the test chain's base has no backing file"

    def reopen(read_only: bool) -> None:
        options = {
            "driver": "qcow2",
            "node-name": fmt,
            "read-only": read_only,
            "file": storage["node-name"],
            "backing": None,
        }
        qmp(dom, {"execute": "blockdev-reopen", "arguments": {"options": [options]}})

    if entry["ro"]:
        reopen(read_only=False)
    qmp(dom, {"execute": f"block-dirty-bitmap-{how}", "arguments": {"node": fmt, "name": name}})
    if entry["ro"]:
        reopen(read_only=True)


@pytest.mark.parametrize("how", ["remove", "clear"])
@pytest.mark.parametrize("active", [False, True], ids=["commit", "active-commit"])
def test_live_commit_with_missing_bits_is_repaired_through_qemu(
    tmp_path: Path, domains: Domains, daemon_factory: Any, active: bool, how: str
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    assert daemon.stop() == 0
    if active:
        virsh("blockcommit", dom.name(), "vda", "--active", "--pivot", "--wait")
    else:
        commit_s1_live(dom, c)
    damage_live_base_bitmap(dom, c.layers[0], "cp2", how)
    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    if active and how == "remove":
        # After the pivot the base is the guest's active layer: a cp2 created there now could
        # not know what the guest wrote since the pivot, so it is reported, never created.
        assert entry["result"] == "unrecoverable" and entry["untrusted"] == ["cp2"], entry
        assert "active layer since the commit's pivot" in entry["error"]
        stop_gracefully(dom)
        assert "cp2" not in bitmap_names(c.layers[0])
        return
    assert entry["result"] == "reconciled" and entry["trigger"] == "startup", entry
    stop_gracefully(dom)
    if active:
        everything = [(0, K64), (2 * MiB, 2 * K64), (9 * MiB, K64)]
        assert dirty_extents(c.layers[0], "cp2") == expected(everything[1:])
    else:
        assert_base_holds_the_data(c)


def test_a_repair_that_cannot_be_done_leaves_the_bitmaps_untrusted(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """libvirt's merge went missing and the committed layer cannot be read any more: nothing
    proves the base complete, so its bitmaps must not count as trustworthy."""
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    assert daemon.stop() == 0
    commit_s1_live(dom, c)
    damage_live_base_bitmap(dom, c.layers[0], "cp2", "remove")
    corrupt(c.layers[1])
    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "failed" and entry["level"] == "error", entry
    assert str(c.layers[1]) in entry["error"] and "cp2" in entry["untrusted"]
    # then made complete: every bit set in the running top
    made_complete = daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
    assert "cp2" in made_complete["bitmaps"], made_complete
    known = json.loads((daemon.state_dir / "domains" / f"{dom.UUIDString()}.json").read_text())
    assert "cp2" in known["filled"]["vda"]
    assert "cp2" not in known.get("untrusted", {}).get("vda", {})


@pytest.fixture
def unprivileged_qemu_images() -> Iterator[Path]:
    """A folder QEMU can reach when it runs as nobody (pytest's own tmp is root's alone)."""
    folder = Path(f"/var/lib/libvirt/images/vbd-test-{uuid.uuid4().hex[:8]}")
    folder.mkdir(mode=0o755, parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("libvirt_merged", [True, False], ids=["merged", "merge-missing"])
def test_committed_layer_qemu_may_not_open(
    tmp_path: Path,
    domains: Domains,
    daemon_factory: Any,
    unprivileged_qemu_images: Path,
    libvirt_merged: bool,
) -> None:
    """What libvirt's AppArmor/SELinux confinement does to a committed layer, made real with
    QEMU running as nobody and the layer left readable by root alone: when the base shows every
    bitmap, libvirt's merge is reported unverifiable (a warning, nothing untrusted); when one
    is missing, the commit failed and its bitmaps are untrusted."""
    c = build(unprivileged_qemu_images / "images")
    for layer in c.layers:
        layer.chmod(0o666)
    _, xml = domains.xml(c.active)
    as_nobody = "<seclabel type='static' model='dac' relabel='no'><label>+65534:+65534</label>"
    xml = xml.replace("</devices>", f"</devices>{as_nobody}</seclabel>")
    xml = xml.replace("type='kvm'", "type='qemu'")  # /dev/kvm is not nobody's
    dom = domains.conn.defineXML(xml)
    dom.create()
    daemon = daemon_factory(roots=[unprivileged_qemu_images]).start()
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    assert daemon.stop() == 0
    commit_s1_live(dom, c)
    if not libvirt_merged:
        damage_live_base_bitmap(dom, c.layers[0], "cp2", "remove")
    c.layers[1].chmod(0o600)  # root's alone now, as a revoked label leaves it to QEMU
    daemon.start()
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert "Permission denied" in entry["error"] and str(c.layers[1]) in entry["error"], entry
    known = json.loads((daemon.state_dir / "domains" / f"{dom.UUIDString()}.json").read_text())
    if libvirt_merged:
        assert entry["result"] == "skipped" and entry["level"] == "warning", entry
        assert entry["error_kind"] == "unverifiable"
        assert known.get("untrusted", {}).get("vda", []) == []
    else:
        assert entry["result"] == "failed" and entry["level"] == "error", entry
        made_complete = daemon.wait_for(is_for(dom, "checkpoint_filled"), what="the fill")
        assert "cp2" in made_complete["bitmaps"], made_complete
        known = json.loads((daemon.state_dir / "domains" / f"{dom.UUIDString()}.json").read_text())
        assert "cp2" in known["filled"]["vda"]


def test_live_commit_that_deletes_its_layers_is_reported_unprovable(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    top = str(c.layers[1])
    commit_s1_live(dom, c, "--delete")
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "unrecoverable" and entry["level"] == "error", entry
    assert top in entry["error"] and sorted(entry["bitmaps"]) == [
        "cp1",
        "cp2",
    ]  # cp3 began after s1


def test_undefined_domain_is_forgotten(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    _, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    state_file = daemon.state_dir / "domains" / f"{dom.UUIDString()}.json"
    assert state_file.exists()
    name = dom.name()
    dom.undefine()
    daemon.wait_event("domain_forgotten", domain=name, reason="undefined")
    assert not state_file.exists()


def test_transient_domain_keeps_its_chain_while_down_and_a_cold_merge_is_found(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """oVirt's way: VMs are transient domains, gone from libvirt while down, and cold merges
    happen then. The chain is kept across the absence, so the merge is found at the next start."""
    c = build(tmp_path / "images")
    name, xml = domains.xml(c.active)
    xml = xml.replace("<name>", f"<uuid>{uuid.uuid4()}</uuid><name>")
    dom = domains.conn.createXML(xml)
    daemon = daemon_factory().start()
    daemon.wait_for(is_for(dom, "disk_tracked"), what="disk tracked")
    state_file = daemon.state_dir / "domains" / f"{dom.UUIDString()}.json"
    stop_gracefully(dom)  # a transient domain vanishes: no UNDEFINED event
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("domain_absent", domain=name)
    assert state_file.exists()
    commit_offline(c)
    dom = domains.conn.createXML(xml)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled" and entry["removed"] == [str(c.layers[1])], entry
    stop_gracefully(dom)
    assert_base_holds_the_data(c)


def test_corrupt_image_is_named_and_left_alone(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c = build(tmp_path / "images")
    dom = domains.define(c.active)
    corrupt(c.layers[1])
    before = c.layers[1].read_bytes()
    daemon = daemon_factory().start()
    entry = daemon.wait_for(is_for(dom, "disk_check_failed"), what="disk check failed")
    assert entry["error_kind"] == "image_corrupt" and str(c.layers[1]) in entry["error"]
    assert entry["level"] == "error"
    assert c.layers[1].read_bytes() == before


def test_block_pull_keeps_the_union_on_the_next_rescan(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=True)
    virsh("blockpull", dom.name(), "vda", "--base", str(c.layers[0]), "--wait")
    event = daemon.wait_for(is_for(dom, "block_job_event", status="completed"), what="event")
    assert event["job_type"] == "pull" and event["action"] == "none"
    daemon.signal(signal.SIGHUP)
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["result"] == "reconciled" and entry["removed"] == [str(c.layers[1])], entry
    stop_gracefully(dom)
    assert_base_holds_the_data(c)


def test_disks_of_one_domain_are_tracked_apart(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    vda, vdb = build(tmp_path / "a"), build(tmp_path / "b")
    dom = domains.define(vda.active, vdb.active, start=True)
    daemon = daemon_factory().start()
    for disk in ("vda", "vdb"):
        daemon.wait_for(is_for(dom, "disk_tracked", disk=disk), what=f"{disk} tracked")
    top, base = str(vdb.layers[1]), str(vdb.layers[0])
    virsh("blockcommit", dom.name(), "vdb", "--top", top, "--base", base, "--wait")
    entry = daemon.wait_for(is_for(dom, "reconciliation"), what="reconciliation")
    assert entry["disk"] == "vdb" and entry["result"] == "already_consistent", entry
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("rescan_requested")
    time.sleep(1)
    state = json.loads((daemon.state_dir / "domains" / f"{dom.UUIDString()}.json").read_text())
    assert state["chains"]["vda"] == [str(p) for p in reversed(vda.layers)]
    assert state["chains"]["vdb"] == [str(vdb.layers[2]), str(vdb.layers[0])]
    assert not [e for e in daemon.entries() if is_for(dom, "reconciliation", disk="vda")(e)]
    stop_gracefully(dom)
    assert_base_holds_the_data(vdb)


def test_renamed_domain_keeps_its_known_chains(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    new_name = f"{dom.name()}-renamed"
    virsh("domrename", dom.name(), new_name)
    domains.adopt(new_name)
    commit_offline(c)
    daemon.signal(signal.SIGHUP)
    entry = daemon.wait_event("reconciliation", domain=new_name)
    assert entry["result"] == "reconciled", entry
