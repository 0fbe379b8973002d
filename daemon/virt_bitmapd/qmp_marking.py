"""QMP as data for setting bits QEMU has no command for.  Pure: no I/O.

QEMU can only merge bitmaps; nothing sets a bitmap from an allocation map, or sets every bit.
So the bits are recorded: a ``blockdev-backup`` job copies to a ``null-co`` node (it discards
what it is given) on which a temporary bitmap records every write, and that bitmap is merged
into the checkpoint bitmaps.  Healing copies what an overlay allocates (``copy_allocated``);
filling copies the whole of a ``null-co`` source of the disk's size (``copy_everything``), which
reads and writes no image: 100 GiB are marked in about a second.
"""

from __future__ import annotations

from collections.abc import Sequence

from .filling import FillStep
from .healing import HealStep
from .qmp import JSON

__all__ = [
    "copy_allocated",
    "copy_everything",
    "fill_transaction",
    "heal_transaction",
    "null_sink",
    "null_source",
    "recording_bitmap",
]


def null_sink(node: str, size: int) -> JSON:
    """A node of ``size`` bytes that discards what is written to it (its bitmaps still record
    where), for learning which clusters an image allocates."""
    return {
        "execute": "blockdev-add",
        "arguments": {"driver": "null-co", "node-name": node, "size": size},
    }


def copy_allocated(job: str, source: str, sink: str) -> JSON:
    """Copy exactly the clusters ``source`` itself allocates (``sync=top``; zero clusters
    included) to ``sink``; the job stays until dismissed, so its end can be read."""
    return {
        "execute": "blockdev-backup",
        "arguments": {
            "job-id": job,
            "device": source,
            "target": sink,
            "sync": "top",
            "auto-dismiss": False,
        },
    }


def heal_transaction(node: str, steps: Sequence[HealStep], *, source: tuple[str, str]) -> JSON:
    """Add each step's bitmap to ``node`` (persistent, recording) holding the bits of
    ``source`` (node, bitmap): all of them, or none."""
    source_node, source_bitmap = source
    actions: list[JSON] = []
    for step in steps:
        actions.append(
            {
                "type": "block-dirty-bitmap-add",
                "data": {
                    "node": node,
                    "name": step.bitmap,
                    "granularity": step.granularity,
                    "persistent": True,
                    "disabled": False,
                },
            }
        )
        actions.append(
            {
                "type": "block-dirty-bitmap-merge",
                "data": {
                    "node": node,
                    "target": step.bitmap,
                    "bitmaps": [{"node": source_node, "name": source_bitmap}],
                },
            }
        )
    return {"execute": "transaction", "arguments": {"actions": actions}}


def null_source(node: str, size: int) -> JSON:
    """A node of ``size`` bytes to copy from: it reads nothing (its data is undefined, and
    nobody looks at it)."""
    return {
        "execute": "blockdev-add",
        "arguments": {"driver": "null-co", "node-name": node, "size": size, "read-zeroes": False},
    }


def recording_bitmap(node: str, name: str, granularity: int) -> JSON:
    """A temporary bitmap on a helper node, recording what a copy job writes there."""
    return {
        "execute": "block-dirty-bitmap-add",
        "arguments": {"node": node, "name": name, "granularity": granularity, "persistent": False},
    }


def copy_everything(job: str, source: str, sink: str) -> JSON:
    """Copy every cluster of ``source`` to ``sink`` (``sync=full``); the job stays until
    dismissed, so its end can be read."""
    return {
        "execute": "blockdev-backup",
        "arguments": {
            "job-id": job,
            "device": source,
            "target": sink,
            "sync": "full",
            "auto-dismiss": False,
        },
    }


def fill_transaction(node: str, steps: Sequence[FillStep], *, source: tuple[str, str]) -> JSON:
    """Each step's bitmap on ``node`` made to hold every bit of ``source`` (node, bitmap):
    created first where missing (persistent, recording), made to record again where it was
    disabled; all of them, or none."""
    source_node, source_bitmap = source
    actions: list[JSON] = []
    for step in steps:
        if step.create:
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {
                        "node": node,
                        "name": step.bitmap,
                        "granularity": step.granularity,
                        "persistent": True,
                        "disabled": False,
                    },
                }
            )
        elif step.enable:
            actions.append(
                {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": step.bitmap}}
            )
        actions.append(
            {
                "type": "block-dirty-bitmap-merge",
                "data": {
                    "node": node,
                    "target": step.bitmap,
                    "bitmaps": [{"node": source_node, "name": source_bitmap}],
                },
            }
        )
    return {"execute": "transaction", "arguments": {"actions": actions}}
