"""What changes is noticed at once, and what does not change costs no read: the directory watch
(inotify) and the rescans that stat before they read, on a real libvirtd and real images."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.images import create
from helpers.libvirt_env import Domains
from helpers.scenarios import assert_base_holds_the_data, commit_offline, is_for, snapshot, tracked
from virt_bitmapd.service.inotify import Inotify

pytestmark = pytest.mark.real

IN_OPEN = 0x00000020
SAFETY_NET_OFF = ("--snapshot-watch-interval", "0")


def assert_known_soon(daemon: Any, dom: Any, overlay: Path, started: float) -> None:
    """The daemon learnt of ``overlay`` as the disk's new top through the watch, in time."""
    changed = daemon.wait_for(is_for(dom, "chain_changed"), timeout=5, what="overlay known")
    assert changed["chain"][0] == str(overlay) and changed["trigger"] == "watch", changed
    assert time.monotonic() - started < 2.5


def test_a_libvirt_snapshot_is_known_within_seconds(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    _, dom, daemon = tracked(tmp_path, domains, daemon_factory, *SAFETY_NET_OFF, running=True)
    overlay = tmp_path / "images" / "snap1.qcow2"
    snapshot(dom, overlay)
    assert_known_soon(daemon, dom, overlay, time.monotonic())


def test_an_overlay_made_by_qemu_img_in_a_watched_directory_is_known_within_seconds(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, *SAFETY_NET_OFF, running=True)
    overlay = create(tmp_path / "images" / "made-by-hand.qcow2", backing=c.active)
    time.sleep(1)  # its creation alone changes no chain
    snapshot(dom, overlay, "--reuse-external")
    assert_known_soon(daemon, dom, overlay, time.monotonic())


def test_without_the_watch_a_snapshot_is_found_by_the_safety_net(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    """Without the watch (--no-watch), snapshots are found by the XML comparison alone.
    (With it, a snapshot anywhere is seen too: QEMU reopens the old top read-only, a close
    after writing in a watched directory.)"""
    elsewhere = tmp_path / "elsewhere" / "below"
    elsewhere.mkdir(parents=True)
    _, dom, daemon = tracked(
        tmp_path,
        domains,
        daemon_factory,
        "--no-watch",
        "--snapshot-watch-interval",
        "3",
        running=True,
    )
    overlay = elsewhere / "snap.qcow2"
    snapshot(dom, overlay)
    changed = daemon.wait_for(is_for(dom, "chain_changed"), timeout=10, what="overlay found")
    assert changed["chain"][0] == str(overlay) and changed["trigger"] == "rescan", changed
    second = elsewhere / "snap2.qcow2"
    snapshot(dom, second)
    changed = daemon.wait_for(is_for(dom, "chain_changed"), timeout=10, what="second overlay")
    assert changed["chain"][0] == str(second), changed


def test_a_cold_merge_is_found_by_the_watch_without_a_rescan(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, dom, daemon = tracked(tmp_path, domains, daemon_factory, running=False)
    images = str(tmp_path / "images")
    daemon.wait_for(lambda e: e.get("event") == "watch_changed" and images in e["added"])
    commit_offline(c)  # qemu-img commit, then rebase: the rescan is an hour away
    entry = daemon.wait_for(is_for(dom, "reconciliation"), timeout=10, what="reconciliation")
    assert entry["result"] == "reconciled" and entry["trigger"] == "watch", entry
    daemon.stop()
    assert_base_holds_the_data(c)


def opened(watcher: Inotify, layers: set[str]) -> set[str]:
    return {event.name for event in watcher.read() if event.name in layers}


def test_a_rescan_reopens_no_unchanged_image(
    tmp_path: Path, domains: Domains, daemon_factory: Any
) -> None:
    c, _, daemon = tracked(tmp_path, domains, daemon_factory, running=False, rescan_interval=1)
    layers = {layer.name for layer in c.layers}
    watcher = Inotify()
    try:
        watcher.add(str(tmp_path / "images"), IN_OPEN)
        # the first looks read the chain (and stat every layer before reading it) ...
        daemon.wait_for(unread_one, timeout=15, what="a rescan that read nothing")
        opened(watcher, layers)
        # ... from then on, a rescan only stats them
        for _ in range(3):
            daemon.wait_for(unread_one, timeout=10, what="a rescan that read nothing")
        assert opened(watcher, layers) == set()
        # a change, even one that keeps size and modification time, is read again
        stat = os.stat(c.layers[1])
        os.utime(c.layers[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
        deadline = time.monotonic() + 10
        seen: set[str] = set()
        while not seen and time.monotonic() < deadline:
            time.sleep(0.2)
            seen = opened(watcher, layers)
        assert seen, "the touched chain was not read again"
    finally:
        watcher.close()


def unread_one(entry: dict[str, Any]) -> bool:
    """A periodic rescan that left the one disk unread."""
    return (
        entry.get("event") == "rescan_done"
        and entry.get("trigger") == "rescan"
        and entry.get("unread_disks") == 1
    )
