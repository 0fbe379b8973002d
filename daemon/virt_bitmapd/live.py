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

from . import images
from .domain_xml import Disk
from .errors import (
    ChainError,
    CleanupFailed,
    CommitUnverifiable,
    QMPError,
)
from .model import Chain, Image, Plan, Reconciliation, Result
from .monitor_steps import Monitor, Undo, already_consistent, apply_plan
from .planner import plan as make_plan
from .qemu_messages import image_error_from_qemu
from .qmp import JSON, OWN_PREFIX, blockdev_add, blockdev_del
from .qmp_nodes import NodeBitmaps, find_node, node_bitmaps, query_nodes
from .storage_roots import require_inside
from .tracking import Commit

__all__ = ["Monitor", "live_images", "reconcile_live"]


CREATED_AFTER_PIVOT = (
    "the base is the guest's active layer since the commit's pivot: a bitmap created there now "
    "cannot know what the guest wrote since, so it was not created"
)


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
    base_node, from_base = live_images(disk, commit.base, nodes)
    # keep libvirt's spelling of each path: the plan speaks of the chain as libvirt names it
    removed = tuple(replace(read_image(path), path=path) for path in commit.removed)
    plan = make_plan(Chain(removed + from_base), commit.top, commit.base, base_before=base_before)
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
    undo = Undo(monitor)
    failed = False
    try:
        base_now = node_bitmaps(nodes, base_node)
        for path, node in source_nodes.items():
            _attach(monitor, undo, plan, base_now, path=path, node=node)
        # attaching layers changed nothing of the base: the first look at the nodes still holds
        if already_consistent(monitor, undo, plan, base_now, source_nodes):
            result, outcome = Result.ALREADY_CONSISTENT, None
        else:
            require_inside(commit.base, storage_roots)
            outcome = apply_plan(
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
    monitor: Monitor, undo: Undo, plan: Plan, base: NodeBitmaps, *, path: str, node: str
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


def live_images(disk: Disk, base: str, nodes: list[JSON]) -> tuple[str, tuple[Image, ...]]:
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
