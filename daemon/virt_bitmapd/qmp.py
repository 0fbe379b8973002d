"""QMP as data: a Plan rendered as one ``transaction``, and node data read back.  Pure: no I/O.

Every transport (qemu-storage-daemon for images at rest, libvirt's monitor passthrough for a
running domain) sends exactly what these functions return, so a plan means the same thing
whatever carries it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .model import Bitmap, Plan

__all__ = [
    "NodeBitmaps",
    "blockdev_add_readonly_source",
    "blockdev_add_writable_base",
    "node_bitmaps",
    "transaction",
]

JSON = dict[str, Any]


def transaction(plan: Plan, *, base_node: str, source_nodes: Mapping[str, str]) -> JSON:
    """The one QMP ``transaction`` that applies ``plan``.

    ``source_nodes`` maps each source image path of the plan to the node name it is opened as.
    """
    actions: list[JSON] = []
    for merge in plan.merges:
        if merge.create_in_base:
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {
                        "node": base_node,
                        "name": merge.bitmap,
                        "granularity": merge.granularity,
                        "persistent": True,
                        "disabled": False,
                    },
                }
            )
        actions.append(
            {
                "type": "block-dirty-bitmap-merge",
                "data": {
                    "node": base_node,
                    "target": merge.bitmap,
                    "bitmaps": [
                        {"node": source_nodes[source], "name": merge.bitmap}
                        for source in merge.sources
                    ],
                },
            }
        )
    return {"execute": "transaction", "arguments": {"actions": actions}}


def blockdev_add_readonly_source(node: str, path: str) -> JSON:
    """Open a committed layer by itself, read-only: its bitmaps are all we need from it."""
    return {
        "execute": "blockdev-add",
        "arguments": {
            "driver": "qcow2",
            "node-name": node,
            "read-only": True,
            "file": {"driver": "file", "filename": path, "read-only": True},
            "backing": None,
        },
    }


def blockdev_add_writable_base(node: str, path: str) -> JSON:
    """Open the commit base read-write without its backing chain (bitmaps need no backing)."""
    return {
        "execute": "blockdev-add",
        "arguments": {
            "driver": "qcow2",
            "node-name": node,
            "read-only": False,
            "file": {"driver": "file", "filename": path},
            "backing": None,
        },
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeBitmaps:
    """A node's bitmaps as QEMU holds them in memory, with each one's dirty byte count."""

    node: str
    bitmaps: tuple[Bitmap, ...]
    dirty_bytes: Mapping[str, int]

    def bitmap(self, name: str) -> Bitmap | None:
        for bitmap in self.bitmaps:
            if bitmap.name == name:
                return bitmap
        return None


def node_bitmaps(named_block_nodes: Sequence[JSON], node: str) -> NodeBitmaps:
    """Pick ``node`` out of a ``query-named-block-nodes`` answer.  Raises KeyError if absent."""
    for entry in named_block_nodes:
        if entry.get("node-name") != node:
            continue
        bitmaps = []
        dirty: dict[str, int] = {}
        for raw in entry.get("dirty-bitmaps", []):
            name = raw["name"]
            bitmaps.append(
                Bitmap(
                    name=name,
                    granularity=int(raw["granularity"]),
                    recording=bool(raw.get("recording", False)),
                    persistent=bool(raw.get("persistent", False)),
                    inconsistent=bool(raw.get("inconsistent", False)),
                )
            )
            dirty[name] = int(raw.get("count", 0))
        return NodeBitmaps(node=node, bitmaps=tuple(bitmaps), dirty_bytes=dirty)
    raise KeyError(node)
