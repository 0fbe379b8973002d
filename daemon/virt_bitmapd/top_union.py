"""The top layer's copy of each checkpoint bitmap holds every bit of the chain.

libvirt's backup API merges a checkpoint's copies over the whole chain.  An offline reader
(``qemu-nbd --bitmap=NAME TOP``, as virtnbdbackup and OpenNebula run it) exports only the
top-most copy: after a snapshot, that copy holds only what was written since.  So the copies
below the top are ORed into the top's (``planner.plan_union``): bits are only added, and what
libvirt merges is unchanged.  Once the top holds the union, every write adds to it, so the
union holds until the chain changes again: a look after a chain change establishes it.

Live through the domain's QEMU (the top is its active node, the layers below its backing
nodes), at rest through qemu-storage-daemon; one transaction either way, only a top under the
storage roots changed, and each merged copy checked recording and consistent afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence

from .domain_xml import Disk
from .errors import BitmapUnusableAfter
from .live import live_images
from .model import QCOW2, Image, Outcome
from .monitor_steps import Monitor, run_plan
from .planner import plan_union
from .qmp import transaction
from .qmp_nodes import node_bitmaps, query_nodes
from .storage_roots import require_inside
from .transports.storage_daemon import TOP_NODE, Session, run_transaction

__all__ = ["unite_at_rest", "unite_live"]


def unite_live(monitor: Monitor, disk: Disk, *, storage_roots: Sequence[str]) -> Outcome:
    """Merge each valid bitmap's copies below the running disk's top into the top's."""
    top = disk.layers[0]
    require_inside(top.path, storage_roots)
    nodes = monitor.execute(query_nodes())
    top_node, chain = live_images(disk, top.path, nodes)
    plan = plan_union(chain)
    if plan.is_empty:
        return Outcome(plan=plan, merges=())
    source_nodes = {layer.path: str(layer.format_node) for layer in disk.layers[1:]}
    before = node_bitmaps(nodes, top_node).dirty_bytes
    return run_plan(monitor, plan, top_node, source_nodes=source_nodes, before=before)


def unite_at_rest(
    paths: Sequence[str],
    *,
    storage_roots: Sequence[str],
    binary: str = "qemu-storage-daemon",
    timeout: float = 60.0,
) -> Outcome:
    """Merge each valid bitmap's copies below the top of chain ``paths`` (top first; no process
    holds them) into the top's: each image opened by itself, the layers below read-only."""
    top = paths[0]
    require_inside(top, storage_roots)
    below = {path: f"vbd-below-{index}" for index, path in enumerate(paths[1:])}
    with Session(binary, timeout) as session:
        for path, node in below.items():
            session.open(node, path, read_only=True)
        session.open(TOP_NODE, top, read_only=False)
        nodes = session.qmp.execute(query_nodes())
        named = {top: TOP_NODE, **below}
        chain = tuple(
            Image(path=path, format=QCOW2, bitmaps=node_bitmaps(nodes, node).bitmaps)
            for path, node in named.items()
        )
        plan = plan_union(chain)
        if plan.is_empty:
            return Outcome(plan=plan, merges=())
        before = node_bitmaps(nodes, TOP_NODE).dirty_bytes
        run_transaction(session.qmp, transaction(plan, base_node=TOP_NODE, source_nodes=below), top)
        after = node_bitmaps(session.qmp.execute(query_nodes()), TOP_NODE)
    unusable = plan.first_unusable(after.bitmaps)
    if unusable is not None:
        raise BitmapUnusableAfter(top, unusable)
    return Outcome.from_counts(plan, before, after.dirty_bytes)
