"""QMP as data for setting bits QEMU has no command for.  Pure: no I/O.

QEMU can only merge bitmaps; nothing sets a bitmap from an allocation map, or sets every bit.
So the bits are recorded: a ``blockdev-backup`` job copies to a ``null-co`` node (it discards
what it is given) on which a temporary bitmap records every write, and that bitmap is merged
into the checkpoint bitmaps (``copy_job``).  Healing copies what an overlay allocates; filling
copies the whole of a ``null-co`` source of the disk's size, which reads and writes no image:
100 GiB are marked in about a second.
"""

from __future__ import annotations

from collections.abc import Sequence

from .filling import FillStep
from .healing import HealStep
from .qmp import JSON, add_action, merge_action

__all__ = [
    "copy_job",
    "fill_transaction",
    "heal_transaction",
    "null_node",
    "recording_bitmap",
]


def null_node(node: str, size: int) -> JSON:
    """A ``null-co`` node of ``size`` bytes: what is written to it is discarded (its bitmaps
    still record where), and reading it reads nothing (its data is undefined; nobody looks)."""
    return {
        "execute": "blockdev-add",
        "arguments": {"driver": "null-co", "node-name": node, "size": size, "read-zeroes": False},
    }


def copy_job(job: str, source: str, sink: str, *, only_allocated: bool) -> JSON:
    """Copy ``source`` to ``sink``: exactly the clusters ``source`` itself allocates (zero
    clusters included; ``sync=top``), or every cluster (``sync=full``).  The job stays until
    dismissed, so its end can be read."""
    return {
        "execute": "blockdev-backup",
        "arguments": {
            "job-id": job,
            "device": source,
            "target": sink,
            "sync": "top" if only_allocated else "full",
            "auto-dismiss": False,
        },
    }


def heal_transaction(node: str, steps: Sequence[HealStep], *, source: tuple[str, str]) -> JSON:
    """Add each step's bitmap to ``node`` (persistent, recording) holding the bits of
    ``source`` (node, bitmap): all of them, or none."""
    actions: list[JSON] = []
    for step in steps:
        actions.append(add_action(node, step.bitmap, step.granularity))
        actions.append(merge_action(node, step.bitmap, [source]))
    return {"execute": "transaction", "arguments": {"actions": actions}}


def recording_bitmap(node: str, name: str, granularity: int) -> JSON:
    """A temporary bitmap on a helper node, recording what a copy job writes there."""
    return {
        "execute": "block-dirty-bitmap-add",
        "arguments": {"node": node, "name": name, "granularity": granularity, "persistent": False},
    }


def fill_transaction(node: str, steps: Sequence[FillStep], *, source: tuple[str, str]) -> JSON:
    """Each step's bitmap on ``node`` made to hold every bit of ``source`` (node, bitmap):
    created first where missing (persistent, recording), made to record again where it was
    disabled; all of them, or none."""
    actions: list[JSON] = []
    for step in steps:
        if step.create:
            actions.append(add_action(node, step.bitmap, step.granularity))
        elif step.enable:
            actions.append(
                {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": step.bitmap}}
            )
        actions.append(merge_action(node, step.bitmap, [source]))
    return {"execute": "transaction", "arguments": {"actions": actions}}
