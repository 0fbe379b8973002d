"""Quarantine: stop untrusted checkpoint bitmaps recording, so that libvirt refuses to start an
incremental backup from them (a loud refusal, and a full backup, instead of a silent hole).

The copy in the disk's top layer is disabled: libvirt requires every copy of a checkpoint's
bitmap to record, and copies no disabled bitmap into a new overlay.  Lower layers are left as they
are (they may back other disks).  While the domain runs this goes through its QEMU, the only
process that may change an image it holds; at rest through qemu-storage-daemon.  Either way it is
one transaction, and only an image under the storage roots is changed.  It is undone only by
deleting the checkpoint (or taking it again under its name): libvirt then removes every copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import images
from .domain_xml import Disk
from .errors import QMPError, QuarantineFailed, VirtBitmapdError
from .model import Bitmap
from .monitor_steps import Monitor
from .qmp import disable_bitmaps
from .qmp_nodes import node_bitmaps, query_nodes
from .storage_roots import require_inside
from .transports.storage_daemon import disable_at_rest

__all__ = ["quarantine"]


def quarantine(
    disk: Disk,
    names: tuple[str, ...],
    *,
    running: bool,
    monitor: Callable[[], Monitor],
    storage_roots: Sequence[str],
) -> None:
    """Disable ``names`` in the top layer of ``disk`` (paths resolved).  Raises
    QuarantineFailed (naming the image) when they still record afterwards."""
    top = disk.layers[0]
    if not names:
        return
    require_inside(top.path, storage_roots)
    try:
        if running:
            after = _disable_live(monitor(), top.format_node, names, top.path)
        else:
            disable_at_rest(top.path, names)
            after = images.read_image(top.path).bitmaps
    except VirtBitmapdError as error:
        raise QuarantineFailed(
            top.path, f"bitmaps {', '.join(names)} may still record: {error}"
        ) from error
    still = [b.name for b in after if b.name in names and b.recording]
    if still:
        raise QuarantineFailed(top.path, f"bitmaps {', '.join(still)} still record")


def _disable_live(
    monitor: Monitor, node: str | None, names: tuple[str, ...], path: str
) -> tuple[Bitmap, ...]:
    if node is None:
        raise QuarantineFailed(path, "libvirt names no QEMU node for the active layer")
    try:
        present = node_bitmaps(monitor.execute(query_nodes()), node).bitmaps
    except KeyError:
        raise QuarantineFailed(path, f"QEMU shows no node {node}") from None
    recording = tuple(b.name for b in present if b.name in names and b.recording)
    if recording:
        try:
            monitor.execute(disable_bitmaps(node, recording))
        except QMPError as error:
            raise QuarantineFailed(path, f"QEMU refused: {error.description}") from error
    try:
        return node_bitmaps(monitor.execute(query_nodes()), node).bitmaps
    except KeyError:
        raise QuarantineFailed(path, f"QEMU shows no node {node} any more") from None
