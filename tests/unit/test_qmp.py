"""A plan rendered as one QMP transaction, and node data read back."""

from __future__ import annotations

from typing import Any

from virt_bitmapd.model import BitmapMerge, Plan
from virt_bitmapd.qmp import blockdev_reopen, disable_bitmaps, probe_transaction, transaction
from virt_bitmapd.qmp_nodes import leftovers, node_bitmaps

PLAN = Plan(
    top="/i/top",
    base="/i/base",
    merges=(
        BitmapMerge(bitmap="new", granularity=1 << 20, create_in_base=True, sources=("/i/top",)),
        BitmapMerge(
            bitmap="old", granularity=65536, create_in_base=False, sources=("/i/top", "/i/mid")
        ),
    ),
)
NODES = {"/i/top": "src0", "/i/mid": "src1"}


def test_one_transaction_adds_then_merges() -> None:
    command = transaction(PLAN, base_node="base", source_nodes=NODES)
    assert command["execute"] == "transaction"
    assert command["arguments"]["actions"] == [
        {
            "type": "block-dirty-bitmap-add",
            "data": {
                "node": "base",
                "name": "new",
                "granularity": 1 << 20,
                "persistent": True,
                "disabled": False,
            },
        },
        {
            "type": "block-dirty-bitmap-merge",
            "data": {"node": "base", "target": "new", "bitmaps": [{"node": "src0", "name": "new"}]},
        },
        {
            "type": "block-dirty-bitmap-merge",
            "data": {
                "node": "base",
                "target": "old",
                "bitmaps": [{"node": "src0", "name": "old"}, {"node": "src1", "name": "old"}],
            },
        },
    ]


def test_probe_copies_the_base_bitmap_and_adds_sources_without_persisting() -> None:
    command = probe_transaction(
        PLAN, base_node="base", source_nodes=NODES, probes={"old": ("p1", 65536)}
    )
    add, merge = command["arguments"]["actions"]
    assert add["data"] == {
        "node": "base",
        "name": "p1",
        "granularity": 65536,
        "persistent": False,
        "disabled": False,
    }
    assert merge["data"]["target"] == "p1"
    assert merge["data"]["bitmaps"][0] == {"node": "base", "name": "old"}


def test_reopen_keeps_cache_and_zero_detection() -> None:
    current = {
        "cache": {"direct": True, "no-flush": False, "writeback": True},
        "detect_zeroes": "unmap",
    }
    options = blockdev_reopen(
        node="libvirt-2-format",
        file_node="libvirt-2-storage",
        backing_node=None,
        read_only=False,
        current=current,
    )["arguments"]["options"][0]
    assert options["read-only"] is False and options["backing"] is None
    assert options["cache"] == {"direct": True, "no-flush": False}
    assert options["detect-zeroes"] == "unmap"


def test_node_bitmaps_reads_flags_and_counts() -> None:
    nodes: list[dict[str, Any]] = [
        {"node-name": "other"},
        {
            "node-name": "base",
            "dirty-bitmaps": [
                {
                    "name": "a",
                    "granularity": 65536,
                    "recording": True,
                    "persistent": True,
                    "count": 131072,
                },
                {
                    "name": "b",
                    "granularity": 65536,
                    "recording": False,
                    "persistent": True,
                    "inconsistent": True,
                    "count": 0,
                },
            ],
        },
    ]
    data = node_bitmaps(nodes, "base")
    assert data.dirty_bytes == {"a": 131072, "b": 0}
    a, b = data.bitmaps
    assert a.usable and not b.usable and b.inconsistent


def test_leftovers_are_only_our_own_nodes_and_probes() -> None:
    nodes: list[dict[str, Any]] = [
        {"node-name": "libvirt-1-format", "dirty-bitmaps": [{"name": "cp1"}]},
        {
            "node-name": "libvirt-2-format",
            "dirty-bitmaps": [{"name": "vbd-probe-00aa"}, {"name": "vbd-probe"}, {"name": "cp2"}],
        },
        {"node-name": "vbd-src-0-abc", "dirty-bitmaps": [{"name": "vbd-probe-1"}]},
        {"node-name": "vbdx"},
    ]
    found = leftovers(nodes)
    assert found.nodes == ("vbd-src-0-abc",)
    assert found.bitmaps == (("libvirt-2-format", "vbd-probe-00aa"),)


def test_a_quarantine_disables_every_bitmap_in_one_transaction() -> None:
    assert disable_bitmaps("libvirt-2-format", ["cp1", "cp2"]) == {
        "execute": "transaction",
        "arguments": {
            "actions": [
                {
                    "type": "block-dirty-bitmap-disable",
                    "data": {"node": "libvirt-2-format", "name": n},
                }
                for n in ("cp1", "cp2")
            ]
        },
    }
