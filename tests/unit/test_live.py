"""The live engine's refusals, with a scripted monitor (the real QEMU paths are in
tests/real/test_daemon.py)."""

from __future__ import annotations

from typing import Any

import pytest

from virt_bitmapd.domain_xml import Disk, Layer
from virt_bitmapd.errors import (
    BitmapUnusableAfter,
    ChainError,
    CleanupFailed,
    LibvirtFailed,
    RepairRefused,
)
from virt_bitmapd.live import reconcile_live
from virt_bitmapd.model import Bitmap, Image, Result
from virt_bitmapd.tracking import Commit

DISK = Disk(
    target="vda",
    layers=(
        Layer(path="/i/active", format="qcow2", index=1),
        Layer(path="/i/base", format="qcow2", index=3),
    ),
    complete=True,
)
COMMIT = Commit(removed=("/i/s1",), base="/i/base")


class ScriptedMonitor:
    def __init__(self, nodes: list[dict[str, Any]]) -> None:
        self.nodes = nodes
        self.sent: list[str] = []

    def execute(self, command: dict[str, Any]) -> Any:
        self.sent.append(str(command["execute"]))
        if command["execute"] == "query-named-block-nodes":
            return self.nodes
        return {}


def nodes(base_file: str, bitmaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"node-name": "libvirt-3-storage", "drv": "file", "file": base_file},
        {"node-name": "libvirt-3-format", "drv": "qcow2", "ro": True, "dirty-bitmaps": bitmaps},
    ]


def removed(path: str) -> Image:
    return Image(path=path, format="qcow2", bitmaps=())


def test_a_node_holding_another_file_is_refused_before_anything_is_sent() -> None:
    monitor = ScriptedMonitor(nodes("/elsewhere/base", []))
    with pytest.raises(ChainError, match="libvirt-3-storage holds /elsewhere/base"):
        reconcile_live(monitor, DISK, COMMIT, storage_roots=["/i"], read_image=removed)
    assert monitor.sent == ["query-named-block-nodes"]


def test_a_base_missing_from_the_live_chain_is_refused() -> None:
    monitor = ScriptedMonitor(nodes("/i/base", []))
    other = Commit(removed=("/i/s1",), base="/i/unknown")
    with pytest.raises(ChainError, match="not in the live chain"):
        reconcile_live(monitor, DISK, other, storage_roots=["/i"], read_image=removed)


def test_committed_layers_without_bitmaps_need_nothing() -> None:
    live = [{"name": "cp1", "granularity": 65536, "recording": True, "persistent": True}]
    monitor = ScriptedMonitor(nodes("/i/base", live))
    result = reconcile_live(monitor, DISK, COMMIT, storage_roots=["/i"], read_image=removed)
    assert result.result is Result.NOTHING_TO_DO
    assert monitor.sent == ["query-named-block-nodes"]  # nothing attached, nothing changed


def test_a_base_outside_the_roots_is_verified_but_never_changed() -> None:
    monitor = ScriptedMonitor(nodes("/i/base", []))
    top = Image(
        path="/i/s1",
        format="qcow2",
        bitmaps=(Bitmap(name="cp1", granularity=65536, recording=True),),
    )
    with pytest.raises(Exception, match="outside the storage roots"):
        reconcile_live(monitor, DISK, COMMIT, storage_roots=["/other"], read_image=lambda _: top)
    assert "transaction" not in monitor.sent and "blockdev-reopen" not in monitor.sent
    assert monitor.sent[-1] == "blockdev-del"  # the attached layer is detached again


CP1 = {"name": "cp1", "granularity": 65536, "recording": True, "persistent": True, "count": 0}
TOP_WITH_CP1 = Image(
    path="/i/s1", format="qcow2", bitmaps=(Bitmap(name="cp1", granularity=65536, recording=True),)
)


class FailingMonitor(ScriptedMonitor):
    """Answers like QEMU until the command named ``fail_on``, where libvirt gives up."""

    def __init__(self, nodes: list[dict[str, Any]], fail_on: str) -> None:
        super().__init__(nodes)
        self.fail_on = fail_on
        self.commands: list[dict[str, Any]] = []

    def execute(self, command: dict[str, Any]) -> Any:
        self.commands.append(command)
        if command["execute"] == self.fail_on:
            self.sent.append(str(command["execute"]))
            raise LibvirtFailed("vm: QMP: cannot send monitor command: connection reset")
        if command["execute"] == "transaction":  # probes appear, empty like their sources
            for action in command["arguments"]["actions"]:
                data = action["data"]
                if action["type"] == "block-dirty-bitmap-add" and not data["persistent"]:
                    base = next(n for n in self.nodes if n["node-name"] == data["node"])
                    base["dirty-bitmaps"].append({**CP1, "name": data["name"]})
        return super().execute(command)


def chain_nodes(base_bitmaps: list[dict[str, Any]], *, base_ro: bool = True) -> list[Any]:
    return [
        {"node-name": "libvirt-3-storage", "drv": "file", "file": "/i/base"},
        {
            "node-name": "libvirt-3-format",
            "drv": "qcow2",
            "ro": base_ro,
            "cache": {"direct": True, "no-flush": False, "writeback": True},
            "detect_zeroes": "unmap",
            "dirty-bitmaps": base_bitmaps,
        },
        {"node-name": "libvirt-5-storage", "drv": "file", "file": "/i/below"},
        {"node-name": "libvirt-5-format", "drv": "qcow2", "ro": True, "dirty-bitmaps": []},
    ]


THREE_LAYERS = Disk(
    target="vda",
    layers=(
        Layer(path="/i/active", format="qcow2", index=1),
        Layer(path="/i/base", format="qcow2", index=3),
        Layer(path="/i/below", format="qcow2", index=5),
    ),
    complete=True,
    discard="unmap",
)


@pytest.mark.parametrize("fail_on", ["transaction", "query-named-block-nodes#2"])
def test_everything_attached_is_removed_when_libvirt_fails_half_way(fail_on: str) -> None:
    name, _, nth = fail_on.partition("#")
    monitor = FailingMonitor(chain_nodes([]), fail_on="never")
    calls = {"n": 0}
    base_execute = monitor.execute

    def execute(command: dict[str, Any]) -> Any:
        if command["execute"] == name:
            calls["n"] += 1
            if calls["n"] == int(nth or 1):
                monitor.fail_on = name
        result = base_execute(command)
        monitor.fail_on = "never"
        return result

    monitor.execute = execute  # type: ignore[method-assign]
    with pytest.raises(LibvirtFailed):
        reconcile_live(
            monitor, THREE_LAYERS, COMMIT, storage_roots=["/i"], read_image=lambda _: TOP_WITH_CP1
        )
    sent = monitor.sent
    assert sent.count("blockdev-add") == sent.count("blockdev-del") == 1
    assert sent.count("blockdev-reopen") == 2  # read-write, then read-only again
    assert sent[-1] == "blockdev-del"


def test_the_reopen_gives_the_base_its_backing_and_options_exactly() -> None:
    monitor = FailingMonitor(chain_nodes([]), fail_on="never")
    with pytest.raises(BitmapUnusableAfter, match="not recording"):  # a script creates no bitmap
        reconcile_live(
            monitor, THREE_LAYERS, COMMIT, storage_roots=["/i"], read_image=lambda _: TOP_WITH_CP1
        )
    reopens = [c["arguments"]["options"][0] for c in monitor.commands if "reopen" in c["execute"]]
    assert [options["read-only"] for options in reopens] == [False, True]
    for options in reopens:
        assert options["backing"] == "libvirt-5-format" and options["file"] == "libvirt-3-storage"
        assert options["discard"] == "unmap" and options["detect-zeroes"] == "unmap"
        assert options["cache"] == {"direct": True, "no-flush": False}


def test_a_base_whose_backing_libvirt_does_not_describe_is_not_reopened() -> None:
    incomplete = Disk(target="vda", layers=THREE_LAYERS.layers[:2], complete=False)
    monitor = FailingMonitor(chain_nodes([]), fail_on="never")
    with pytest.raises(RepairRefused, match="does not describe the chain below this base"):
        reconcile_live(
            monitor, incomplete, COMMIT, storage_roots=["/i"], read_image=lambda _: TOP_WITH_CP1
        )
    assert "blockdev-reopen" not in monitor.sent and "transaction" not in monitor.sent
    assert monitor.sent.count("blockdev-add") == monitor.sent.count("blockdev-del")


def test_a_base_opened_with_encryption_is_not_reopened() -> None:
    layers = list(THREE_LAYERS.layers)
    layers[1] = Layer(path="/i/base", format="qcow2", index=3, unreproducible=("encryption",))
    disk = Disk(target="vda", layers=tuple(layers), complete=True)
    monitor = FailingMonitor(chain_nodes([]), fail_on="never")
    with pytest.raises(RepairRefused, match="options a reopen cannot repeat"):
        reconcile_live(
            monitor, disk, COMMIT, storage_roots=["/i"], read_image=lambda _: TOP_WITH_CP1
        )
    assert "blockdev-reopen" not in monitor.sent


def test_no_bitmap_is_created_in_the_active_layer_after_a_pivot() -> None:
    pivoted = Disk(target="vda", layers=THREE_LAYERS.layers[1:], complete=True)
    monitor = FailingMonitor(chain_nodes([], base_ro=False), fail_on="never")
    result = reconcile_live(
        monitor, pivoted, COMMIT, storage_roots=["/i"], read_image=lambda _: TOP_WITH_CP1
    )
    assert result.untrusted == ("cp1",) and "pivot" in result.why_untrusted
    assert result.result is Result.NOTHING_TO_DO
    assert "transaction" not in monitor.sent and "blockdev-add" not in monitor.sent


def test_a_cleanup_that_fails_after_a_good_check_is_reported() -> None:
    monitor = FailingMonitor(chain_nodes([CP1]), fail_on="blockdev-del")
    with pytest.raises(CleanupFailed, match="detach vbd-src-0"):
        reconcile_live(
            monitor,
            THREE_LAYERS,
            COMMIT,
            storage_roots=["/i"],
            read_image=lambda _: TOP_WITH_CP1,
            domain="vm",
        )
