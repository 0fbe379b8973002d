"""Reconcile a commit base inside a running QEMU, through its QMP monitor.

How this works:

* The chain is assembled from two sources: the committed layers, which QEMU has closed, are read
  from disk; the base and everything below it come from QEMU's own node data, which is the truth
  while QEMU holds those images (their on-disk flags are stale).
* The committed layers the plan reads are attached read-only under node names of our own.
* Current libvirt merges the bitmaps itself before it reports the commit, so first we *verify*:
  each bitmap the base already has gets a temporary, non-persistent probe = base bitmap OR its
  sources; if the probe's dirty count equals the base bitmap's, the base already holds every bit.
  Only when something is missing is the plan applied, as one transaction, the base reopened
  read-write around it when it is a read-only backing node (as libvirt does).
* Probes and attached layers are removed whatever happens.
* Under libvirt's AppArmor or SELinux confinement QEMU may not open the committed layers any
  more.  If the base then shows every bitmap concerned, recording, that is reported as
  unverifiable (libvirt merged, nobody can check the bits); otherwise the commit failed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from . import images
from .domain_xml import Disk
from .errors import ChainError, LayersOutOfQemuReach, ReconcileFailed, image_error_from_qemu
from .model import Chain, Image, Outcome, Plan, Reconciliation, Result
from .planner import plan as make_plan
from .qmp import (
    NodeBitmaps,
    blockdev_add_readonly_source,
    blockdev_del,
    blockdev_reopen,
    find_node,
    node_bitmaps,
    probe_transaction,
    query_nodes,
    remove_bitmaps,
    transaction,
)
from .storage_roots import require_inside
from .tracking import Commit
from .transports.qmp_stream import QMPError

__all__ = ["Monitor", "reconcile_live"]

JSON = dict[str, Any]


class Monitor(Protocol):
    """Runs one QMP command in a running QEMU; raises QMPError when QEMU answers an error."""

    def execute(self, command: JSON) -> Any: ...


def reconcile_live(
    monitor: Monitor,
    disk: Disk,
    commit: Commit,
    *,
    storage_roots: Sequence[str],
    base_before: Image | None = None,
    read_image: Callable[[str], Image] = lambda path: images.read_image(path, force_share=True),
) -> Reconciliation:
    """Make ``commit.base`` (a layer of ``disk``, the live chain after the commit) hold every
    valid bitmap of the committed layers.  ``base_before``: the base's bitmaps as last seen
    before the commit, so that bitmaps libvirt created there are not mistaken for gaps."""
    nodes = monitor.execute(query_nodes())
    base_node, live_images = _live_images(disk, commit.base, nodes)
    # keep libvirt's spelling of each path: the plan speaks of the chain as libvirt names it
    removed = tuple(replace(read_image(path), path=path) for path in commit.removed)
    chain = Chain(removed + live_images)
    plan = make_plan(chain, commit.top, commit.base, base_before=base_before)
    if plan.is_empty:
        return Reconciliation(plan=plan, result=Result.NOTHING_TO_DO)

    source_nodes = {
        path: f"vbd-src-{i}-{secrets.token_hex(3)}" for i, path in enumerate(plan.source_images)
    }
    attached: list[str] = []
    try:
        base_now = node_bitmaps(nodes, base_node)
        for path, node in source_nodes.items():
            try:
                monitor.execute(blockdev_add_readonly_source(node, path))
            except QMPError as error:
                if "permission denied" in error.description.lower() and _holds_every_bitmap(
                    plan, base_now
                ):
                    raise LayersOutOfQemuReach(
                        path,
                        "QEMU may not open this committed layer (confined by libvirt's "
                        "security driver?), so the merge libvirt made cannot be verified; the "
                        f"base holds every bitmap concerned: {error.description}",
                    ) from error
                raise image_error_from_qemu(path, error.description) from error
            attached.append(node)
        # attaching layers changed nothing of the base: the first look at the nodes still holds
        if _already_consistent(monitor, plan, base_now, source_nodes):
            return Reconciliation(plan=plan, result=Result.ALREADY_CONSISTENT)
        require_inside(commit.base, storage_roots)
        outcome = _apply(monitor, plan, disk, find_node(nodes, base_node), source_nodes)
    finally:
        for node in reversed(attached):
            # QEMU closes it with the domain at the latest; nothing of ours depends on it
            with contextlib.suppress(QMPError):
                monitor.execute(blockdev_del(node))
    return Reconciliation(plan=plan, result=Result.RECONCILED, outcome=outcome)


def _live_images(disk: Disk, base: str, nodes: list[JSON]) -> tuple[str, tuple[Image, ...]]:
    """The base's format node name, and the images from the base down as QEMU holds them."""
    layer_index = next((i for i, layer in enumerate(disk.layers) if layer.path == base), None)
    if layer_index is None:
        raise ChainError(f"{base}: not in the live chain of disk {disk.target}")
    result = []
    for layer in disk.layers[layer_index:]:
        if layer.format_node is None or layer.storage_node is None:
            raise ChainError(f"{layer.path}: libvirt gave it no node index (is -blockdev in use?)")
        try:
            storage = find_node(nodes, layer.storage_node)
            entry = find_node(nodes, layer.format_node)
        except KeyError as error:
            raise ChainError(f"{layer.path}: QEMU has no node {error.args[0]}") from error
        if os.path.realpath(str(storage.get("file"))) != os.path.realpath(layer.path):
            raise ChainError(
                f"{layer.path}: QEMU node {layer.storage_node} holds {storage.get('file')}"
            )
        result.append(
            Image(
                path=layer.path,
                format=str(entry.get("drv")),
                bitmaps=node_bitmaps(nodes, layer.format_node).bitmaps,
            )
        )
    base_node = disk.layers[layer_index].format_node
    assert base_node is not None
    return base_node, tuple(result)


def _holds_every_bitmap(plan: Plan, base: NodeBitmaps) -> bool:
    """The base has each bitmap of the plan, recording and consistent: what libvirt's merge
    leaves, though it says nothing of the bits."""
    for merge in plan.merges:
        copy = base.bitmap(merge.bitmap)
        if copy is None or not copy.recording or copy.inconsistent:
            return False
    return True


def _already_consistent(
    monitor: Monitor, plan: Plan, base: NodeBitmaps, source_nodes: dict[str, str]
) -> bool:
    if any(merge.create_in_base for merge in plan.merges):
        return False
    base_node = base.node
    probes = {}
    for merge in plan.merges:
        copy = base.bitmap(merge.bitmap)
        if copy is None:
            return False
        probes[merge.bitmap] = (f"vbd-probe-{secrets.token_hex(6)}", copy.granularity)
    monitor.execute(
        probe_transaction(plan, base_node=base_node, source_nodes=source_nodes, probes=probes)
    )
    try:
        after = node_bitmaps(monitor.execute(query_nodes()), base_node)
    finally:
        monitor.execute(remove_bitmaps(base_node, [probe for probe, _ in probes.values()]))
    return all(
        after.dirty_bytes[probe] == after.dirty_bytes[bitmap]
        for bitmap, (probe, _) in probes.items()
    )


def _apply(
    monitor: Monitor, plan: Plan, disk: Disk, entry: JSON, source_nodes: dict[str, str]
) -> Outcome:
    """Apply ``plan`` to the base, whose ``query-named-block-nodes`` entry is ``entry``."""
    base_node = str(entry["node-name"])
    before = node_bitmaps([entry], base_node).dirty_bytes
    base_layer = disk.layer(plan.base)
    assert base_layer is not None and base_layer.storage_node is not None
    below = disk.layers[disk.layers.index(base_layer) + 1 :]

    def reopen(read_only: bool) -> None:
        monitor.execute(
            blockdev_reopen(
                node=base_node,
                file_node=str(base_layer.storage_node),
                backing_node=below[0].format_node if below else None,
                read_only=read_only,
                current=entry,
            )
        )

    read_only = bool(entry.get("ro"))
    if read_only:  # a backing node: its bitmaps cannot be changed until it is writable
        reopen(read_only=False)
    try:
        monitor.execute(transaction(plan, base_node=base_node, source_nodes=source_nodes))
    except QMPError as error:
        raise ReconcileFailed.transaction_refused(plan.base, error.description) from error
    finally:
        if read_only:
            reopen(read_only=True)
    after = node_bitmaps(monitor.execute(query_nodes()), base_node)
    unusable = plan.first_unusable(after.bitmaps)
    if unusable is not None:
        raise ReconcileFailed.not_usable_after(plan.base, unusable)
    return Outcome.from_counts(plan, before, after.dirty_bytes)
