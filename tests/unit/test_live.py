"""The live engine's refusals, with a scripted monitor (the real QEMU paths are in
tests/real/test_daemon.py)."""

from __future__ import annotations

from typing import Any

import pytest

from virt_bitmapd.domain_xml import Disk, Layer
from virt_bitmapd.errors import ChainError
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
