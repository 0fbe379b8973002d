"""The directory watch over a real inotify instance (the kernel's, on temporary directories),
and the stat comparison a rescan makes before it reads."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

from virt_bitmapd.fingerprints import (
    Fingerprint,
    change_time_ns,
    stat_fields,
    stat_layers,
    unchanged,
)
from virt_bitmapd.model import Image
from virt_bitmapd.service.chain_watch import may_be_own_write
from virt_bitmapd.service.inotify import IN_CREATE, Event, parse_events
from virt_bitmapd.service.layer_watch import LayerWatch, layer_directories
from virt_bitmapd.service.scheduler import LookRequest
from virt_bitmapd.state import StateStore


def record(wd: int, mask: int, name: bytes, padded: int) -> bytes:
    return struct.pack("=iIII", wd, mask, 0, padded) + name.ljust(padded, b"\0")


def test_records_are_parsed_with_their_padding() -> None:
    data = record(1, IN_CREATE, b"s1.qcow2", 16) + record(2, 0x8, b"", 0)
    assert parse_events(data) == [Event(1, IN_CREATE, "s1.qcow2"), Event(2, 0x8, "")]


def test_a_truncated_record_is_not_invented() -> None:
    assert parse_events(record(1, IN_CREATE, b"a", 16)[:10]) == []


def collect(watch_dirs: list[Path], act: object, settle: float = 0.05) -> list[dict[str, set[str]]]:
    """Run the watch on ``watch_dirs`` while ``act()`` changes files; what it handed over."""
    handed: list[dict[str, set[str]]] = []

    async def main() -> None:
        watch = LayerWatch(handed.append, settle=settle)
        assert watch.start()
        watch.watch(str(d) for d in watch_dirs)
        try:
            act()  # type: ignore[operator]
            await asyncio.sleep(settle * 6)
        finally:
            watch.close()

    asyncio.run(main())
    return handed


def test_a_burst_of_changes_is_handed_over_once_per_quiet_period(tmp_path: Path) -> None:
    images, other = tmp_path / "images", tmp_path / "other"
    images.mkdir()
    other.mkdir()

    def act() -> None:
        (images / "s1.qcow2").write_bytes(b"x")  # create + close after writing
        os.chmod(images / "s1.qcow2", 0o600)  # attribute change (libvirt's labelling)
        (other / "unwatched").write_bytes(b"x")

    assert collect([images], act) == [{str(images): {"s1.qcow2"}}]


def test_plain_writes_and_reads_wake_nothing(tmp_path: Path) -> None:
    layer = tmp_path / "active.qcow2"
    layer.write_bytes(b"x")
    handed: list[dict[str, set[str]]] = []

    async def main() -> None:
        watch = LayerWatch(handed.append, settle=0.02)
        assert watch.start()
        watch.watch([str(tmp_path)])
        with layer.open("r+b") as writer:  # a guest writing its active layer all day
            writer.write(b"y")
            writer.flush()
            assert layer.read_bytes() == b"y"  # and the daemon reading it
            await asyncio.sleep(0.2)
            assert handed == []
        await asyncio.sleep(0.2)  # closing after writing is a change (qemu-img's end)
        watch.close()

    asyncio.run(main())
    assert handed == [{str(tmp_path): {"active.qcow2"}}]


def test_watching_follows_the_wanted_directories(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    handed: list[dict[str, set[str]]] = []

    async def main() -> None:
        watch = LayerWatch(handed.append, settle=0.02)
        assert watch.start()
        watch.watch([str(first), str(tmp_path / "missing")])
        assert watch.directories == {str(first)}  # the missing one is logged, not watched
        watch.watch([str(second)])
        assert watch.directories == {str(second)}
        (first / "x").write_bytes(b"")
        (second / "y").write_bytes(b"")
        await asyncio.sleep(0.2)
        watch.close()

    asyncio.run(main())
    assert handed == [{str(second): {"y"}}]


def test_layer_directories_are_the_chains_and_the_roots(tmp_path: Path) -> None:
    chains = [("/srv/a/top.qcow2", "/srv/b/base.qcow2"), ("/srv/a/other.qcow2",)]
    assert layer_directories(chains, [str(tmp_path)]) == {"/srv/a", "/srv/b", str(tmp_path)}


def test_a_rescan_skips_only_what_nothing_says_changed(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    base.write_bytes(b"b")
    top.write_bytes(b"t")
    chain = (str(top), str(base))
    images = [Image(path=path, format="qcow2") for path in chain]
    seen = Fingerprint.of(images, stat_layers(chain), ("cp1",))
    assert seen is not None
    assert unchanged(seen, chain=chain, checkpoints=("cp1",), stats=stat_layers(chain))
    assert unchanged(seen, chain=None, checkpoints=None, stats=stat_layers(chain))
    assert not unchanged(seen, chain=chain[1:], checkpoints=None, stats=stat_layers(chain))
    assert not unchanged(seen, chain=None, checkpoints=("cp1", "cp2"), stats=stat_layers(chain))
    os.utime(base)  # any touch changes the change time, whatever the modification time says
    assert not unchanged(seen, chain=None, checkpoints=None, stats=stat_layers(chain))
    top.unlink()
    assert not unchanged(seen, chain=None, checkpoints=None, stats=stat_layers(chain))


def test_a_layer_not_stated_before_the_read_proves_nothing(tmp_path: Path) -> None:
    layer = tmp_path / "new.qcow2"
    image = Image(path=str(layer), format="qcow2")
    assert Fingerprint.of([image], {}, None) is None
    assert Fingerprint.of([image], stat_layers([str(layer)]), None) is None  # it does not exist


def test_what_a_look_saw_survives_a_restart_exactly(tmp_path: Path) -> None:
    layer = tmp_path / "base.qcow2"
    layer.write_bytes(b"b")
    stats = stat_layers([str(layer)])
    image = Image(path=str(layer), format="qcow2", virtual_size=1 << 40)
    seen = Fingerprint.of([image], stats, ("cp1",))
    assert seen is not None
    st = layer.stat()
    assert stat_fields(stats[str(layer)] or b"") == (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    assert change_time_ns(stats[str(layer)] or b"") == st.st_ctime_ns
    store = StateStore(tmp_path / "state")
    store.put_disk(
        "u1", name="vm1", disk="vda", chain=seen.chain, untrusted={}, bitmaps={}, fingerprint=seen
    )
    state = StateStore(tmp_path / "state").load("u1")
    assert state is not None and state.fingerprints["vda"] == seen
    saved = json.loads((tmp_path / "state" / "domains" / "u1.json").read_text())
    assert saved["seen"]["vda"]["stats"] == [list(stat_fields(stats[str(layer)] or b""))]


def test_only_a_watch_request_for_a_shut_off_disk_may_be_the_daemons_own_write() -> None:
    watch = LookRequest.because("watch")
    assert may_be_own_write(watch, running=False)
    assert not may_be_own_write(watch, running=True)  # a snapshot: its XML is the news
    assert not may_be_own_write(watch, running=None)  # never looked at
    assert not may_be_own_write(LookRequest(("watch", "event")), running=False)
    assert not may_be_own_write(LookRequest.because("rescan"), running=False)
