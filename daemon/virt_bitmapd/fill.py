"""Fill: every bit set in the disk's top layer's copy of bitmaps whose bits cannot be proven
complete (``filling`` says why and which).

QEMU has no command that sets every bit, so QEMU records them (``qmp_marking``): a backup job
copies a ``null-co`` node of the disk's size to another, on which a temporary bitmap records
every write; that bitmap is merged into the bitmaps in one transaction, which also creates the
ones the top lacks and makes disabled ones record again.  No image is read or written but the
top's bitmaps.  While the domain runs this goes through its QEMU, the only process that may
change an image it holds; at rest through qemu-storage-daemon.  Only a top under the storage
roots is changed, and each bitmap is checked afterwards: recording, consistent, every byte set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .domain_xml import Disk
from .errors import BaseChanged, CleanupFailed, FillFailed, QMPError, VirtBitmapdError
from .filling import FillStep
from .live import live_images
from .model import Bitmap
from .monitor_steps import Monitor, Undo
from .qmp import blockdev_del
from .qmp_marking import (
    copy_job,
    fill_transaction,
    null_node,
    recording_bitmap,
)
from .qmp_nodes import find_node, node_bitmaps, query_nodes
from .storage_roots import require_inside
from .transports.job_wait import wait_for_job
from .transports.storage_daemon import TOOL, TOP_NODE, Session

__all__ = ["fill", "fill_node"]

FILL_JOB = "vbd-fill"
SOURCE_NODE = "vbd-fill-source"
SINK_NODE = "vbd-fill-sink"
EVERY_BIT = "vbd-fill-every-bit"
#: A job that reads and writes nothing: 100 GiB take about a second.
FILL_TIMEOUT = 600.0


def fill(
    disk: Disk,
    steps: Sequence[FillStep],
    *,
    running: bool,
    monitor: Callable[[], Monitor],
    storage_roots: Sequence[str],
) -> None:
    """Carry out ``steps`` in the top layer of ``disk`` (paths resolved).  Raises FillFailed,
    naming the image, when any bitmap is not complete afterwards; CleanupFailed when every one
    is, but a helper node of ours is left in the domain's QEMU."""
    if not steps:
        return
    top = disk.layers[0]
    require_inside(top.path, storage_roots)
    try:
        if running:
            live = monitor()
            node, _ = live_images(disk, top.path, live.execute(query_nodes()))
            fill_node(live, node, steps, top.path)
        else:
            with Session(TOOL, 60.0) as session:
                session.open(TOP_NODE, top.path, read_only=False)
                fill_node(session.qmp, TOP_NODE, steps, top.path)
    except (FillFailed, CleanupFailed):
        raise
    except VirtBitmapdError as error:
        names = ", ".join(step.bitmap for step in steps)
        raise FillFailed(top.path, f"bitmaps {names} could not be filled: {error}") from error


def fill_node(monitor: Monitor, node: str, steps: Sequence[FillStep], path: str) -> None:
    """Carry out ``steps`` on the qcow2 format node ``node`` (of image ``path``) of a QEMU
    (see ``fill`` for what it raises)."""
    nodes = monitor.execute(query_nodes())
    try:
        size = int(find_node(nodes, node)["image"]["virtual-size"])
    except (KeyError, TypeError, ValueError):
        raise FillFailed(path, f"QEMU shows no size for node {node}") from None
    _check_still_fits(steps, node_bitmaps(nodes, node).bitmaps, path)
    undo = Undo(monitor)
    try:
        monitor.execute(null_node(SOURCE_NODE, size))
        undo.push("delete the fill's source", blockdev_del(SOURCE_NODE))
        monitor.execute(null_node(SINK_NODE, size))
        undo.push("delete the fill's sink", blockdev_del(SINK_NODE))
        granularity = min(step.granularity for step in steps)
        monitor.execute(recording_bitmap(SINK_NODE, EVERY_BIT, granularity))
        monitor.execute(copy_job(FILL_JOB, SOURCE_NODE, SINK_NODE, only_allocated=False))
        wait_for_job(
            monitor.execute, FILL_JOB, path, timeout=FILL_TIMEOUT, what="marking every cluster"
        )
        try:
            monitor.execute(fill_transaction(node, steps, source=(SINK_NODE, EVERY_BIT)))
        except QMPError as error:
            raise FillFailed(path, f"QEMU refused the transaction: {error.description}") from error
    finally:
        failures = undo.run()
    after = node_bitmaps(monitor.execute(query_nodes()), node)
    for step in steps:
        copy = next((b for b in after.bitmaps if b.name == step.bitmap), None)
        if copy is None or not copy.recording or copy.inconsistent:
            raise FillFailed(path, f"bitmap {step.bitmap!r} is not recording and consistent after")
        if after.dirty_bytes.get(step.bitmap, 0) < size:
            raise FillFailed(path, f"bitmap {step.bitmap!r} does not mark every byte after")
    if failures:  # complete: what is left over goes when the daemon next connects
        raise CleanupFailed(path, failures)


def _check_still_fits(steps: Sequence[FillStep], present: Sequence[Bitmap], path: str) -> None:
    """The node's bitmaps as the steps were planned on: none to create exists, every other
    one does."""
    names = {bitmap.name for bitmap in present}
    for step in steps:
        if step.create and step.bitmap in names:
            raise BaseChanged(path, step.bitmap, "appeared")
        if not step.create and step.bitmap not in names:
            raise BaseChanged(path, step.bitmap, "disappeared")
