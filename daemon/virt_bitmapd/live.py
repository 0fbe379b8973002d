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
  read-write around it when it is a read-only backing node (as libvirt does).  The reopen gives
  the base exactly its backing node and the options libvirt gave it; when the chain below the
  base is not fully known, or libvirt gave it options a reopen cannot repeat, the repair is
  refused rather than risk changing what the guest reads.
* After an active commit's pivot the base is the guest's active layer.  A bitmap created there
  now would miss whatever the guest wrote since the pivot, so it is not created: it is reported
  untrusted.  Merging into a bitmap that was recording all along is safe.
* Every step that leaves something behind (an attached layer, a probe, a base opened read-write)
  registers its undo first; the undos all run whatever happens, each on its own.
* Under libvirt's AppArmor or SELinux confinement QEMU may not open the committed layers any
  more.  If the base then shows every bitmap concerned, recording, that is reported as
  unverifiable (libvirt merged, nobody can check the bits); otherwise the commit failed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from . import images
from .domain_xml import Disk, Layer
from .errors import (
    BitmapUnusableAfter,
    ChainError,
    CleanupFailed,
    CommitUnverifiable,
    QMPError,
    RepairRefused,
    TransactionRefused,
    VirtBitmapdError,
)
from .model import Chain, Image, Outcome, Plan, Reconciliation, Result, find_bitmap
from .planner import plan as make_plan
from .qemu_messages import image_error_from_qemu
from .qmp import (
    JSON,
    OWN_PREFIX,
    PROBE_PREFIX,
    NodeBitmaps,
    blockdev_add,
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

__all__ = ["Monitor", "reconcile_live"]


CREATED_AFTER_PIVOT = (
    "the base is the guest's active layer since the commit's pivot: a bitmap created there now "
    "cannot know what the guest wrote since, so it was not created"
)


class Monitor(Protocol):
    """Runs one QMP command in a running QEMU; raises QMPError when QEMU answers an error and
    LibvirtFailed when libvirt cannot pass it on."""

    def execute(self, command: JSON) -> Any: ...


class _Undo:
    """Steps to run at the end, last registered first, each whatever the others do."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor
        self._steps: list[tuple[str, JSON]] = []

    def push(self, what: str, command: JSON) -> None:
        self._steps.append((what, command))

    def pop(self) -> None:
        """Drop the last step: it was done on the main path already."""
        self._steps.pop()

    def run(self) -> list[str]:
        failures = []
        while self._steps:
            what, command = self._steps.pop()
            try:
                self._monitor.execute(command)
            except VirtBitmapdError as error:
                failures.append(f"{what}: {error}")
        return failures


def reconcile_live(
    monitor: Monitor,
    disk: Disk,
    commit: Commit,
    *,
    storage_roots: Sequence[str],
    base_before: Image | None = None,
    read_image: Callable[[str], Image] = lambda path: images.read_image(path, force_share=True),
    domain: str = "",
) -> Reconciliation:
    """Make ``commit.base`` (a layer of ``disk``, the live chain after the commit) hold every
    valid bitmap of the committed layers.  ``base_before``: the base's bitmaps as last seen
    before the commit, so that bitmaps libvirt created there are not mistaken for gaps."""
    nodes = monitor.execute(query_nodes())
    base_node, live_images = _live_images(disk, commit.base, nodes)
    # keep libvirt's spelling of each path: the plan speaks of the chain as libvirt names it
    removed = tuple(replace(read_image(path), path=path) for path in commit.removed)
    plan = make_plan(Chain(removed + live_images), commit.top, commit.base, base_before=base_before)
    untrusted: tuple[str, ...] = ()
    if disk.layers[0].path == commit.base:
        untrusted = tuple(m.bitmap for m in plan.merges if m.create_in_base)
        plan = replace(plan, merges=tuple(m for m in plan.merges if not m.create_in_base))
    why = CREATED_AFTER_PIVOT if untrusted else ""
    if plan.is_empty:
        return Reconciliation(
            plan=plan, result=Result.NOTHING_TO_DO, untrusted=untrusted, why_untrusted=why
        )

    source_nodes = {
        path: f"{OWN_PREFIX}src-{i}-{secrets.token_hex(3)}"
        for i, path in enumerate(plan.source_images)
    }
    undo = _Undo(monitor)
    failed = False
    try:
        base_now = node_bitmaps(nodes, base_node)
        for path, node in source_nodes.items():
            _attach(monitor, undo, plan, base_now, path=path, node=node)
        # attaching layers changed nothing of the base: the first look at the nodes still holds
        if _already_consistent(monitor, undo, plan, base_now, source_nodes):
            result, outcome = Result.ALREADY_CONSISTENT, None
        else:
            require_inside(commit.base, storage_roots)
            outcome = _apply(
                monitor,
                undo,
                plan,
                disk,
                entry=find_node(nodes, base_node),
                source_nodes=source_nodes,
            )
            result = Result.RECONCILED
    except BaseException:
        failed = True
        raise
    finally:
        leftovers = undo.run()
        if leftovers and not failed:
            raise CleanupFailed(domain or disk.target, leftovers)
    return Reconciliation(
        plan=plan, result=result, outcome=outcome, untrusted=untrusted, why_untrusted=why
    )


def _attach(
    monitor: Monitor, undo: _Undo, plan: Plan, base: NodeBitmaps, *, path: str, node: str
) -> None:
    try:
        monitor.execute(blockdev_add(node, path, read_only=True))
    except QMPError as error:
        if (
            "permission denied" in error.description.lower()
            and plan.first_unusable(base.bitmaps) is None
        ):
            raise CommitUnverifiable(
                path,
                "QEMU may not open this committed layer (confined by libvirt's security "
                "driver?), so the merge libvirt made cannot be verified; the base holds every "
                f"bitmap concerned: {error.description}",
            ) from error
        raise image_error_from_qemu(path, error.description) from error
    undo.push(f"detach {node}", blockdev_del(node))


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


def _already_consistent(
    monitor: Monitor, undo: _Undo, plan: Plan, base: NodeBitmaps, source_nodes: dict[str, str]
) -> bool:
    if any(merge.create_in_base for merge in plan.merges):
        return False
    base_node = base.node
    probes = {}
    for merge in plan.merges:
        copy = find_bitmap(base.bitmaps, merge.bitmap)
        if copy is None:
            return False
        probes[merge.bitmap] = (f"{PROBE_PREFIX}{secrets.token_hex(6)}", copy.granularity)
    names = [probe for probe, _ in probes.values()]
    monitor.execute(
        probe_transaction(plan, base_node=base_node, source_nodes=source_nodes, probes=probes)
    )
    undo.push(f"remove probes from {base_node}", remove_bitmaps(base_node, names))
    after = node_bitmaps(monitor.execute(query_nodes()), base_node)
    monitor.execute(remove_bitmaps(base_node, names))
    undo.pop()
    return all(
        after.dirty_bytes[probe] == after.dirty_bytes[bitmap]
        for bitmap, (probe, _) in probes.items()
    )


def _backing_node(disk: Disk, base_layer: Layer) -> str | None:
    """The node the base's backing is, exactly; refuses when the chain below is not known."""
    below = disk.layers[disk.layers.index(base_layer) + 1 :]
    if not below:
        if not disk.complete:
            raise RepairRefused(
                base_layer.path,
                "libvirt does not describe the chain below this base, so it cannot be reopened "
                "without changing what the guest reads; not repaired",
            )
        return None
    if below[0].format_node is None:
        raise RepairRefused(
            base_layer.path, f"its backing {below[0].path} has no node libvirt names; not repaired"
        )
    return below[0].format_node


def _apply(
    monitor: Monitor,
    undo: _Undo,
    plan: Plan,
    disk: Disk,
    *,
    entry: JSON,
    source_nodes: dict[str, str],
) -> Outcome:
    """Apply ``plan`` to the base, whose ``query-named-block-nodes`` entry is ``entry``."""
    base_node = str(entry["node-name"])
    before = node_bitmaps([entry], base_node).dirty_bytes
    base_layer = disk.layer(plan.base)
    assert base_layer is not None and base_layer.storage_node is not None
    read_only = bool(entry.get("ro"))
    if read_only:  # a backing node: its bitmaps cannot be changed until it is writable
        if base_layer.unreproducible or disk.metadata_cache:
            options = ", ".join(base_layer.unreproducible) or "a metadata cache size"
            raise RepairRefused(
                plan.base,
                f"libvirt opened this base with options a reopen cannot repeat ({options}); "
                "not repaired",
            )
        backing = _backing_node(disk, base_layer)

        def reopen(read_only: bool) -> JSON:
            return blockdev_reopen(
                node=base_node,
                file_node=str(base_layer.storage_node),
                backing_node=backing,
                read_only=read_only,
                current=entry,
                discard=disk.discard,
            )

        monitor.execute(reopen(read_only=False))
        undo.push(f"reopen {base_node} read-only", reopen(read_only=True))
    try:
        monitor.execute(transaction(plan, base_node=base_node, source_nodes=source_nodes))
    except QMPError as error:
        raise TransactionRefused(plan.base, error.description) from error
    after = node_bitmaps(monitor.execute(query_nodes()), base_node)
    unusable = plan.first_unusable(after.bitmaps)
    if unusable is not None:
        raise BitmapUnusableAfter(plan.base, unusable)
    return Outcome.from_counts(plan, before, after.dirty_bytes)
