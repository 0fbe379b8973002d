"""QMP as data: a Plan rendered as one ``transaction``, and the commands around it.  Pure: no
I/O.  Node data read back is ``qmp_nodes``; bits QEMU has no command to set, ``qmp_marking``.

Every transport (qemu-storage-daemon for images at rest, libvirt's monitor passthrough for a
running domain) sends exactly what these functions return, so a plan means the same thing
whatever carries it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .model import Plan

__all__ = [
    "JSON",
    "OWN_PREFIX",
    "PROBE_PREFIX",
    "add_action",
    "blockdev_add",
    "blockdev_del",
    "blockdev_reopen",
    "disable_bitmaps",
    "merge_action",
    "probe_transaction",
    "remove_bitmaps",
    "transaction",
]

#: Node names and temporary bitmaps of our own start with these, never with libvirt's.
OWN_PREFIX = "vbd-"
PROBE_PREFIX = "vbd-probe-"

JSON = dict[str, Any]


def transaction(plan: Plan, *, base_node: str, source_nodes: Mapping[str, str]) -> JSON:
    """The one QMP ``transaction`` that applies ``plan``.

    ``source_nodes`` maps each source image path of the plan to the node name it is opened as.
    """
    actions: list[JSON] = []
    for merge in plan.merges:
        if merge.create_in_base:
            actions.append(add_action(base_node, merge.bitmap, merge.granularity))
        sources = [(source_nodes[source], merge.bitmap) for source in merge.sources]
        actions.append(merge_action(base_node, merge.bitmap, sources))
    return {"execute": "transaction", "arguments": {"actions": actions}}


def add_action(node: str, name: str, granularity: int) -> JSON:
    """A transaction action adding a persistent, recording bitmap ``name`` to ``node``."""
    return {
        "type": "block-dirty-bitmap-add",
        "data": {
            "node": node,
            "name": name,
            "granularity": granularity,
            "persistent": True,
            "disabled": False,
        },
    }


def merge_action(node: str, target: str, sources: Sequence[tuple[str, str]]) -> JSON:
    """A transaction action ORing the bitmaps ``sources`` ((node, name) each) into ``target``
    on ``node``."""
    bitmaps = [{"node": source_node, "name": name} for source_node, name in sources]
    return {
        "type": "block-dirty-bitmap-merge",
        "data": {"node": node, "target": target, "bitmaps": bitmaps},
    }


def probe_transaction(
    plan: Plan,
    *,
    base_node: str,
    source_nodes: Mapping[str, str],
    probes: Mapping[str, tuple[str, int]],
) -> JSON:
    """Check, without changing the base, whether its bitmaps already hold their sources' bits.

    ``probes`` maps each bitmap to check (one the base already has) to a temporary bitmap name
    and the base copy's granularity.  Each probe starts as a copy of the base's bitmap and gets
    the sources merged in; a probe whose dirty count then equals the base bitmap's adds nothing,
    so the base already holds every source bit.  Probes record like the base bitmap does, so guest
    writes landing meanwhile count on both sides.  They are not persistent: remove them after.
    """
    actions: list[JSON] = []
    for merge in plan.merges:
        if merge.bitmap not in probes:
            continue
        probe, granularity = probes[merge.bitmap]
        actions.append(
            {
                "type": "block-dirty-bitmap-add",
                "data": {
                    "node": base_node,
                    "name": probe,
                    "granularity": granularity,
                    "persistent": False,
                    "disabled": False,
                },
            }
        )
        sources = [{"node": base_node, "name": merge.bitmap}]
        sources += [{"node": source_nodes[path], "name": merge.bitmap} for path in merge.sources]
        actions.append(
            {
                "type": "block-dirty-bitmap-merge",
                "data": {"node": base_node, "target": probe, "bitmaps": sources},
            }
        )
    return {"execute": "transaction", "arguments": {"actions": actions}}


def remove_bitmaps(node: str, names: Sequence[str]) -> JSON:
    actions = [
        {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": name}}
        for name in names
    ]
    return {"execute": "transaction", "arguments": {"actions": actions}}


def disable_bitmaps(node: str, names: Sequence[str]) -> JSON:
    """Stop ``names`` recording on ``node``, all or none: a quarantine (libvirt refuses an
    incremental backup from a checkpoint whose bitmap is disabled)."""
    actions = [
        {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": name}}
        for name in names
    ]
    return {"execute": "transaction", "arguments": {"actions": actions}}


def blockdev_reopen(
    *,
    node: str,
    file_node: str,
    backing_node: str | None,
    read_only: bool,
    current: JSON,
    discard: str | None = None,
) -> JSON:
    """Reopen a qcow2 format node read-write or read-only, changing nothing else.

    ``blockdev-reopen`` resets every option it is not given, so the caller names the node's
    backing exactly (``None`` only for a node that has none), and the options libvirt gave the
    node are passed again: ``discard`` from the domain XML (QEMU does not show it), cache and
    zero detection from the node's ``query-named-block-nodes`` entry ``current``.
    """
    options: JSON = {
        "driver": "qcow2",
        "node-name": node,
        "read-only": read_only,
        "file": file_node,
        "backing": backing_node,
    }
    if discard in ("unmap", "ignore"):
        options["discard"] = discard
    cache = current.get("cache")
    if isinstance(cache, dict):
        options["cache"] = {
            "direct": bool(cache.get("direct")),
            "no-flush": bool(cache.get("no-flush")),
        }
    if current.get("detect_zeroes") in ("on", "unmap"):
        options["detect-zeroes"] = current["detect_zeroes"]
    return {"execute": "blockdev-reopen", "arguments": {"options": [options]}}


def blockdev_del(node: str) -> JSON:
    return {"execute": "blockdev-del", "arguments": {"node-name": node}}


def blockdev_add(node: str, path: str, *, read_only: bool) -> JSON:
    """Open the qcow2 image ``path`` by itself as ``node``: without its backing chain (bitmaps
    need none) and through the file driver named explicitly (a path is never read as a
    protocol).  Committed layers are opened read-only, a base at rest read-write."""
    file: JSON = {"driver": "file", "filename": path}
    if read_only:
        file["read-only"] = True
    return {
        "execute": "blockdev-add",
        "arguments": {
            "driver": "qcow2",
            "node-name": node,
            "read-only": read_only,
            "file": file,
            "backing": None,
        },
    }
