"""QEMU's node data read: the bitmaps a node holds, and what a run of ours left behind.  Pure:
no I/O (the answers of ``query-named-block-nodes`` are passed in).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .model import Bitmap
from .qmp import JSON, OWN_PREFIX, PROBE_PREFIX

__all__ = ["Leftovers", "NodeBitmaps", "find_node", "leftovers", "node_bitmaps", "query_nodes"]


def query_nodes() -> JSON:
    return {"execute": "query-named-block-nodes", "arguments": {"flat": True}}


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeBitmaps:
    """A node's bitmaps as QEMU holds them in memory, with each one's dirty byte count."""

    node: str
    bitmaps: tuple[Bitmap, ...]
    dirty_bytes: Mapping[str, int]


def find_node(named_block_nodes: Sequence[JSON], node: str) -> JSON:
    """Pick ``node`` out of a ``query-named-block-nodes`` answer.  Raises KeyError if absent."""
    for entry in named_block_nodes:
        if entry.get("node-name") == node:
            return entry
    raise KeyError(node)


def node_bitmaps(named_block_nodes: Sequence[JSON], node: str) -> NodeBitmaps:
    """The named bitmaps of ``node`` in a ``query-named-block-nodes`` answer (a block job's own
    bitmap has no name, and is no checkpoint's).  KeyError if the node is absent."""
    entry = find_node(named_block_nodes, node)
    bitmaps = []
    dirty: dict[str, int] = {}
    for raw in entry.get("dirty-bitmaps", []):
        name = raw.get("name")
        if not name:
            continue
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Leftovers:
    """What an interrupted run of ours left in a QEMU: attached nodes and probe bitmaps."""

    nodes: tuple[str, ...] = ()
    #: (node, bitmap name)
    bitmaps: tuple[tuple[str, str], ...] = ()


def leftovers(named_block_nodes: Sequence[JSON]) -> Leftovers:
    """Our own nodes and probe bitmaps in a ``query-named-block-nodes`` answer."""
    nodes = []
    bitmaps = []
    for entry in named_block_nodes:
        name = str(entry.get("node-name", ""))
        if name.startswith(OWN_PREFIX):
            nodes.append(name)
            continue  # deleting the node removes its bitmaps
        for raw in entry.get("dirty-bitmaps", []):
            if str(raw.get("name", "")).startswith(PROBE_PREFIX):
                bitmaps.append((name, str(raw["name"])))
    return Leftovers(nodes=tuple(nodes), bitmaps=tuple(bitmaps))
